"""Neural source activity of the coarse parcels, on the EEG clock.

Every coarse parcel carries one source time course (a current dipole moment, A·m, once scaled
by the EEG module)::

    s_c(t) = b_c(t) + sum_b sqrt(P_cb(t)) * x_cb(t)

* ``b_c`` is 1/f ("pink") background activity with unit variance;
* ``x_cb`` is unit-variance Gaussian noise with the spectral shape of band ``b`` (alpha and beta
  peaks, broadband gamma), i.e. an oscillation with a random phase;
* ``P_cb(t) = P0_cb * exp(L_cb(t) - sigma^2 / 2)`` is the band's power envelope. The log-power
  process ``L_cb = sigma * (sqrt(rho) * g_{network(c), b} + sqrt(1 - rho) * e_cb)`` is a slow
  Gaussian process (time scales ~5-40 s: the frequencies BOLD can follow) with a component
  ``g`` shared by all parcels of the same network and a parcel-specific component ``e``.

``P_cb(t)`` is the ground-truth band power; the z-scored log band power ``L_cb / sigma`` drives
the BOLD signal (see :mod:`samba_pipeline.simulate.bold`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import fft as sp_fft

#: Frequency bands (Hz) of the simulated oscillations. Alpha and beta are spectral peaks
#: (Gaussian power profile at the band centre, +-2 SD = the band); gamma is broadband (a
#: plateau over the band with raised-cosine edges 4 Hz wide).
BAND_NAMES = ("alpha", "beta", "gamma")
BANDS = np.array([[8.0, 12.0], [15.0, 25.0], [40.0, 60.0]])
BAND_SHAPES = ("peak", "peak", "plateau")
#: Mean in-band power of each oscillation relative to the 1/f background's power in that band.
BAND_SNR = np.array([5.0, 2.5, 2.5])
#: Extra factor on BAND_SNR for the networks where the rhythm is strongest at rest.
BAND_SNR_NETWORK_GAIN = {"alpha": {"Vis": 2.0}, "beta": {"SomMot": 2.0}, "gamma": {}}
#: Standard deviation of the natural-log band power and share of it common to a network.
LOG_POWER_SD = 0.5
NETWORK_SHARE = 0.5
#: Envelope grid step (s) and how long the simulated past extends before EEG sample 0 (s), so
#: that the first volumes have a full hemodynamic history.
ENV_DT = 0.1
ENV_PAST_S = 40.0
#: Pass band (Hz) of the slow log-power processes: periods of about 6 to 40 s.
ENV_BAND = (1.0 / 40.0, 1.0 / 6.0)


@dataclass
class NeuralSimulation:
    sources: np.ndarray  # (n_coarse, n_samples) unit-free; scaled to A·m by the EEG module
    sfreq: float
    env_times: np.ndarray  # (n_env,) seconds on the EEG clock (starts before 0)
    log_power: np.ndarray  # (n_coarse, n_bands, n_env) L_cb, natural-log units, mean ~0
    base_power: np.ndarray  # (n_coarse, n_bands) P0_cb (unit-free)

    def band_power_at(self, times: np.ndarray) -> np.ndarray:
        """P_cb at ``times`` (s): (n_coarse, n_bands, n_times), unit-free."""
        logp = interp_rows(self.env_times, self.log_power, times)
        return self.base_power[..., None] * np.exp(logp - LOG_POWER_SD**2 / 2)

    def log_power_z_at(self, times: np.ndarray) -> np.ndarray:
        """Standardised log band power L_cb / sigma at ``times``."""
        return interp_rows(self.env_times, self.log_power, times) / LOG_POWER_SD


def interp_rows(x: np.ndarray, y: np.ndarray, xnew: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``y[..., x]`` at ``xnew`` along the last axis (vectorised)."""
    x = np.asarray(x, dtype=float)
    xnew = np.asarray(xnew, dtype=float)
    idx = np.clip(np.searchsorted(x, xnew, side="right") - 1, 0, len(x) - 2)
    frac = np.clip((xnew - x[idx]) / (x[idx + 1] - x[idx]), 0.0, 1.0)
    return y[..., idx] * (1.0 - frac) + y[..., idx + 1] * frac


def _unit_variance(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=-1, keepdims=True)
    return x / x.std(axis=-1, keepdims=True)


def pink_spectrum(freqs: np.ndarray, f_min: float = 0.5) -> np.ndarray:
    """Power spectral density shape of the background: 1/f above ``f_min``, flat below."""
    return 1.0 / np.maximum(freqs, f_min)


def _shaped_noise(rng: np.random.Generator, n_series: int, n_samples: int, d: float, gain_fn) -> np.ndarray:
    """White Gaussian noise shaped by the amplitude response ``gain_fn(freqs)``, unit variance.

    The noise is generated on a fast FFT length (>= n_samples) and cropped.
    """
    n_fft = sp_fft.next_fast_len(n_samples, real=True)
    freqs = np.fft.rfftfreq(n_fft, d)
    spec = sp_fft.rfft(rng.standard_normal((n_series, n_fft)), axis=-1)
    spec *= gain_fn(freqs)
    return _unit_variance(sp_fft.irfft(spec, n=n_fft, axis=-1)[:, :n_samples])


def pink_noise(rng: np.random.Generator, n_series: int, n_samples: int, sfreq: float) -> np.ndarray:
    """Unit-variance 1/f noise, shape (n_series, n_samples)."""

    def gain(freqs):
        g = np.sqrt(pink_spectrum(freqs))
        g[0] = 0.0
        return g

    return _shaped_noise(rng, n_series, n_samples, 1.0 / sfreq, gain)


def band_gain(freqs: np.ndarray, band, shape: str = "plateau", taper_hz: float = 4.0) -> np.ndarray:
    """Amplitude response of an oscillation's spectral shape over ``band`` (Hz).

    ``"peak"``: Gaussian power profile centred on the band, SD a quarter of the band width;
    ``"plateau"``: flat over the band with raised-cosine edges ``taper_hz`` wide, centred on the
    band edges.
    """
    lo, hi = band
    if shape == "peak":
        centre, sd = 0.5 * (lo + hi), 0.25 * (hi - lo)
        return np.exp(-((freqs - centre) ** 2) / (4.0 * sd**2))  # power: exp(-x^2 / 2 sd^2)
    half = 0.5 * taper_hz
    g = np.zeros_like(freqs)
    g[(freqs >= lo + half) & (freqs <= hi - half)] = 1.0
    up = (freqs > lo - half) & (freqs < lo + half)
    g[up] = 0.5 * (1 - np.cos(np.pi * (freqs[up] - (lo - half)) / taper_hz))
    down = (freqs > hi - half) & (freqs < hi + half)
    g[down] = 0.5 * (1 + np.cos(np.pi * (freqs[down] - (hi - half)) / taper_hz))
    return g


def bandlimited_noise(
    rng: np.random.Generator, n_series: int, n_samples: int, sfreq: float, band, shape: str = "plateau"
) -> np.ndarray:
    """Unit-variance Gaussian noise with the spectral ``shape`` over ``band`` (Hz)."""
    return _shaped_noise(rng, n_series, n_samples, 1.0 / sfreq, lambda f: band_gain(f, band, shape))


def slow_process(
    rng: np.random.Generator, n_series: int, n_times: int, dt: float, band=ENV_BAND
) -> np.ndarray:
    """Unit-variance slow Gaussian process (smooth band-pass between band[0] and band[1] Hz)."""
    f_lo, f_hi = band

    def gain(freqs):
        with np.errstate(divide="ignore"):
            g = 1.0 / np.sqrt(1.0 + (f_lo / freqs) ** 2) / np.sqrt(1.0 + (freqs / f_hi) ** 8)
        g[0] = 0.0
        return g

    return _shaped_noise(rng, n_series, n_times, dt, gain)


def simulate_neural(
    rng: np.random.Generator,
    networks: list[str],
    n_samples: int,
    sfreq: float,
    *,
    stimulus=None,
    with_sources: bool = True,
    log_power_offset=None,
) -> NeuralSimulation:
    """Simulate the coarse-parcel sources (see module doc); ``networks`` names each parcel's network.

    ``stimulus`` = ``(Stimulus, start_s)`` (:mod:`samba_pipeline.simulate.stimulus`): while the
    stimulus plays (from ``start_s`` on this clock), a share ``Stimulus.share`` of the log
    band-power variance follows the stimulus (the same in every session and subject that
    watches it) and the rest stays this recording's own. ``with_sources=False`` skips the
    source time courses (``sources`` is None): enough for a session that only drives BOLD.
    """
    n_coarse = len(networks)
    n_bands = len(BANDS)
    net_names = sorted(set(networks))
    net_index = np.array([net_names.index(n) for n in networks])

    duration = n_samples / sfreq
    n_env = int(np.ceil((duration + ENV_PAST_S + 1.0) / ENV_DT)) + 1
    env_times = -ENV_PAST_S + ENV_DT * np.arange(n_env)

    shared = slow_process(rng, len(net_names) * n_bands, n_env, ENV_DT).reshape(
        len(net_names), n_bands, n_env
    )
    own = slow_process(rng, n_coarse * n_bands, n_env, ENV_DT).reshape(n_coarse, n_bands, n_env)
    log_power = LOG_POWER_SD * (
        np.sqrt(NETWORK_SHARE) * shared[net_index] + np.sqrt(1.0 - NETWORK_SHARE) * own
    )
    if stimulus is not None:
        stim, start = stimulus
        stim_t = env_times - float(start)
        playing = (stim_t >= 0.0) & (stim_t < stim.total_s)
        locked = LOG_POWER_SD * interp_rows(stim.times, stim.log_power_z,
                                            np.clip(stim_t, 0.0, stim.times[-1]))
        mixed = np.sqrt(stim.share) * locked + np.sqrt(1.0 - stim.share) * log_power
        log_power = np.where(playing[None, None, :], mixed, log_power)
    if log_power_offset is not None:  # stimulus conditions (simulate.conditions): f(env_times)
        log_power = log_power + log_power_offset(env_times)

    # mean band power relative to the background's in-band power
    freqs = np.fft.rfftfreq(n_samples, 1.0 / sfreq)
    bg = pink_spectrum(freqs)
    bg[0] = 0.0
    base_power = np.empty((n_coarse, n_bands))
    for b, (name, band) in enumerate(zip(BAND_NAMES, BANDS)):
        frac = (bg * band_gain(freqs, band, BAND_SHAPES[b]) ** 2).sum() / bg.sum()
        gains = np.array([BAND_SNR_NETWORK_GAIN[name].get(n, 1.0) for n in networks])
        base_power[:, b] = BAND_SNR[b] * frac * gains

    if not with_sources:
        return NeuralSimulation(sources=None, sfreq=float(sfreq), env_times=env_times,
                                log_power=log_power, base_power=base_power)
    t = np.arange(n_samples) / sfreq
    sources = pink_noise(rng, n_coarse, n_samples, sfreq)
    for b, band in enumerate(BANDS):
        carrier = bandlimited_noise(rng, n_coarse, n_samples, sfreq, band, BAND_SHAPES[b])
        logp = interp_rows(env_times, log_power[:, b, :], t)
        amp = np.sqrt(base_power[:, b, None] * np.exp(logp - LOG_POWER_SD**2 / 2))
        sources += amp * carrier
        del carrier, logp, amp
    return NeuralSimulation(
        sources=sources,
        sfreq=float(sfreq),
        env_times=env_times,
        log_power=log_power,
        base_power=base_power,
    )
