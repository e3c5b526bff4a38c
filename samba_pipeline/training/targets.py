"""Alternative EEG/MEG targets: band-limited amplitude envelopes.

The hemodynamic signal follows the *power* of the electrophysiological oscillations, not their
phase, so an fMRI -> EEG/MEG model can only ever predict the slow part of the raw samples. The
band-limited envelope is what it can predict: the series is band-pass filtered (zero phase) and
the envelope is the magnitude of its analytic signal,

    env(x) = | hilbert( filtfilt(b, 1, x) ) |

with ``b`` a Hamming-window FIR band-pass (:func:`envelope_fir`; transition band as MNE's default:
``min(max(0.25 * low, 2 Hz), low)``, length ``3.3 * sfreq / transition`` taps, odd, capped so
that ``filtfilt``'s odd-extension pad fits the series). The power envelope is its square; both
rank the time points identically, so Spearman correlations are the same for either.

Two implementations of one definition:

* :func:`ephys_envelope` — numpy, with :func:`scipy.signal.filtfilt` and
  :func:`scipy.signal.hilbert` (the reference; used by the metrics);
* :func:`ephys_envelope_torch` — torch, vectorised over every leading axis, on any device (used
  inside models' losses). ``filtfilt`` with an FIR filter is computed exactly: odd extension by
  ``3 * len(b)`` samples, a forward pass whose initial state is the steady state for the first
  sample (``lfilter_zi``: equivalent to prepending ``len(b) - 1`` copies of it), the same on the
  reversed output, then the pad is removed; the convolutions are done by FFT.
  ``tests/test_samba_reverse.py`` checks it against the scipy version.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from scipy.fft import next_fast_len
from scipy.signal import filtfilt, firwin, hilbert

TARGETS = ("raw", "envelope")


def check_band(band, sfreq: float) -> tuple[float, float]:
    """``(low, high)`` in Hz with ``0 < low < high < sfreq / 2``, else ValueError."""
    try:
        low, high = (float(v) for v in band)
    except (TypeError, ValueError):
        raise ValueError(f"envelope band must be [low, high] in Hz, not {band!r}") from None
    nyquist = float(sfreq) / 2.0
    if not (0.0 < low < high < nyquist):
        raise ValueError(f"envelope band [{low:g}, {high:g}] Hz must satisfy 0 < low < high < "
                         f"{nyquist:g} Hz (half the sampling frequency)")
    return low, high


@lru_cache(maxsize=64)
def _fir(sfreq: float, low: float, high: float, n_samples: int | None) -> np.ndarray:
    trans = min(max(0.25 * low, 2.0), low)
    numtaps = int(math.ceil(3.3 * sfreq / trans)) | 1
    if n_samples is not None:
        cap = (int(n_samples) - 1) // 3  # filtfilt pads by 3 * numtaps samples < n_samples
        if cap < 3:
            raise ValueError(f"{n_samples} samples are too few for a band-pass envelope")
        numtaps = min(numtaps, cap if cap % 2 else cap - 1)
    taps = firwin(numtaps, [low, high], pass_zero=False, fs=sfreq, window="hamming")
    taps.setflags(write=False)
    return taps


def envelope_fir(sfreq: float, band, n_samples: int | None = None) -> np.ndarray:
    """Taps of the band-pass FIR filter (odd length, Hamming window; see the module docstring)."""
    low, high = check_band(band, sfreq)
    return _fir(float(sfreq), low, high, None if n_samples is None else int(n_samples))


def ephys_envelope(x, sfreq: float, band, axis: int = -1) -> np.ndarray:
    """Amplitude envelope of ``x`` in ``band`` along ``axis`` (numpy/scipy reference)."""
    x = np.asarray(x, dtype=np.float64)
    taps = envelope_fir(sfreq, band, x.shape[axis])
    y = filtfilt(taps, [1.0], x, axis=axis, padtype="odd", padlen=3 * len(taps))
    return np.abs(hilbert(y, axis=axis))


def _fir_steady(z: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """``scipy.signal.lfilter(taps, 1, z, zi=lfilter_zi(taps, 1) * z[..., 0])`` along the last axis."""
    nb, n = taps.shape[-1], z.shape[-1]
    padded = torch.cat([z[..., :1].expand(*z.shape[:-1], nb - 1), z], dim=-1)
    nfft = next_fast_len(padded.shape[-1] + nb - 1, real=True)
    full = torch.fft.irfft(torch.fft.rfft(padded, n=nfft) * torch.fft.rfft(taps, n=nfft), n=nfft)
    return full[..., nb - 1: nb - 1 + n]


def ephys_envelope_torch(x: torch.Tensor, sfreq: float, band) -> torch.Tensor:
    """Amplitude envelope of ``x [..., n]`` in ``band`` (torch; same numbers as
    :func:`ephys_envelope`). Computed in float64, returned in ``x``'s dtype; no gradient needed."""
    n = x.shape[-1]
    taps_np = envelope_fir(sfreq, band, n)
    xd = x.to(torch.float64)
    taps = torch.tensor(taps_np, dtype=torch.float64, device=x.device)
    pad = 3 * taps.shape[-1]
    left = 2 * xd[..., :1] - xd[..., 1: pad + 1].flip(-1)
    right = 2 * xd[..., -1:] - xd[..., n - pad - 1: n - 1].flip(-1)
    ext = torch.cat([left, xd, right], dim=-1)
    y = _fir_steady(ext, taps)
    y = _fir_steady(y.flip(-1), taps).flip(-1)[..., pad: pad + n]
    # Analytic signal (scipy.signal.hilbert): double the positive frequencies, drop the negative.
    spec = torch.fft.rfft(y)
    gain = torch.full((spec.shape[-1],), 2.0, dtype=torch.float64, device=x.device)
    gain[0] = 1.0
    if n % 2 == 0:
        gain[-1] = 1.0
    analytic = torch.fft.ifft(spec * gain, n=n)  # bins above n // 2 are zero-padded
    return analytic.abs().to(x.dtype)


def standardize_np(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    """z-score along ``axis`` (population SD); constant series become 0."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=axis, keepdims=True)
    std = x.std(axis=axis, keepdims=True)
    return (x - mean) / np.where(std > eps, std, 1.0)
