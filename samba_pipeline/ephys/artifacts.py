"""MR artifact correction for simultaneous EEG-fMRI (pure functions; NumPy and MNE).

Both corrections are average artifact subtraction (AAS; Allen et al. 1998, 2000), vectorised
over channels and epochs, and run on the raw recording before any filter or resampling (the
gradient artifact is far larger than the EEG and has energy up to the sampling limit; filtering
first would smear it across the epoch boundaries).

**Gradient artifact** (:func:`remove_gradient_artifact`): epochs of one volume (the median
trigger interval) start at each volume trigger. The EEG and scanner clocks are not
synchronised, so each epoch's artifact sits a fraction of a sample away from the trigger: each
epoch is aligned to the mean artifact with sub-sample precision (cross-correlation on a grid
upsampled ``upsample`` times, refined by a parabola through the peak, on the channel with
the largest artifact), shifted by that amount
(an exact band-limited shift by an FFT phase ramp), and the template for epoch k is the mean of
the ``n_template`` aligned epochs centred on it (a sliding template, which follows slow changes
of the artifact with head position). The template is shifted back and subtracted.

**Ballistocardiogram** (:func:`remove_bcg_artifact`): R peaks of the ECG channel found with
MNE (``mne.preprocessing.find_ecg_events``); epochs from ``-0.25`` to ``+0.75`` of the median RR
interval around each peak, cut short at the next epoch's start so that none overlap; sliding
template of ``n_template`` beats, subtracted.

``artifact_variance_ratio`` decides "auto": the share of the epochs' variance that the mean
epoch explains. Without a locked artifact it is about 1 / n_epochs (under 0.02 for a minute of
data); with one it is far above ``AUTO_THRESHOLD``.
"""

from __future__ import annotations

import logging
from typing import Any

import mne
import numpy as np

from samba_pipeline.errors import SambaInputError

LOGGER = logging.getLogger(__name__)

#: "auto" corrects when the locked mean explains more than this share of the epochs' variance.
AUTO_THRESHOLD = 0.1
#: BCG epoch around each R peak, as fractions of the median RR interval.
BCG_WINDOW = (-0.25, 0.75)


def _sliding_mean(epochs: np.ndarray, width: int) -> np.ndarray:
    """Mean over the ``width`` epochs centred on each epoch (axis 0; shrinks at the ends)."""
    n = epochs.shape[0]
    width = max(1, min(int(width), n))
    csum = np.concatenate([np.zeros((1,) + epochs.shape[1:]), np.cumsum(epochs, axis=0)])
    start = np.clip(np.arange(n) - width // 2, 0, n - width)
    stop = start + width
    return (csum[stop] - csum[start]) / width


def _fractional_shift(epochs: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Delay each epoch (axis 0) by ``shift`` samples (circularly; FFT phase ramp, last axis)."""
    n = epochs.shape[-1]
    freqs = np.fft.rfftfreq(n)
    ramp = np.exp(-2j * np.pi * freqs[None, :] * shift[:, None])
    spec = np.fft.rfft(epochs, axis=-1)
    ramp = ramp.reshape(ramp.shape[:1] + (1,) * (epochs.ndim - 2) + ramp.shape[1:])
    return np.fft.irfft(spec * ramp, n=n, axis=-1)


def subsample_lags(epochs: np.ndarray, reference: np.ndarray, upsample: int = 10,
                   max_lag: float = 1.0) -> np.ndarray:
    """Lag (samples) of each epoch (n_epochs, n) against ``reference`` (n,): the circular
    cross-correlation peak on a grid upsampled ``upsample`` times, refined by a parabola."""
    n = epochs.shape[-1]
    spec = np.fft.rfft(epochs, axis=-1) * np.conj(np.fft.rfft(reference))[None, :]
    m = n * int(upsample)
    xcorr = np.fft.irfft(spec, n=m, axis=-1) * upsample  # zero-padded spectrum = upsampled
    lags = np.fft.fftfreq(m, d=1.0 / m) / upsample  # in original samples
    window = np.abs(lags) <= max_lag
    best = np.argmax(np.where(window[None, :], xcorr, -np.inf), axis=-1)
    # parabola through the peak and its neighbours on the upsampled grid refines it further
    rows = np.arange(len(best))
    y0, y1, y2 = xcorr[rows, best - 1], xcorr[rows, best], xcorr[rows, (best + 1) % m]
    denom = y0 - 2 * y1 + y2
    with np.errstate(invalid="ignore", divide="ignore"):
        delta = np.where(denom < 0, 0.5 * (y0 - y2) / denom, 0.0)
    return lags[best] + np.clip(delta, -0.5, 0.5) / upsample


def artifact_variance_ratio(epochs: np.ndarray) -> float:
    """Share of the epochs' (n_epochs, n_channels, n) variance explained by their mean."""
    centred = epochs - epochs.mean(axis=-1, keepdims=True)
    total = float((centred ** 2).mean())
    if total <= 0:
        return 0.0
    return float((centred.mean(axis=0) ** 2).mean() / total)


def remove_gradient_artifact(data: np.ndarray, sfreq: float, onsets_s: np.ndarray, *,
                             n_template: int = 21, upsample: int = 10, mode: Any = "auto",
                             source: str | None = None) -> tuple[np.ndarray, dict]:
    """Subtract the volume-locked gradient artifact from ``data`` (n_channels, n_times), in
    place; ``onsets_s`` are the volume triggers (s from the first sample). See module doc."""
    onsets = np.sort(np.asarray(onsets_s, dtype=float))
    report: dict[str, Any] = {"applied": False, "n_volumes": int(onsets.size)}
    if onsets.size < 3:
        raise SambaInputError(f"gradient artifact correction needs volume triggers; found "
                              f"{onsets.size}", path=source)
    starts = np.rint(onsets * sfreq).astype(np.int64)
    length = int(np.median(np.diff(starts)))
    if length < 8:
        raise SambaInputError(f"volume triggers only {length} samples apart", path=source)
    valid = (starts >= 0) & (starts + length <= data.shape[1])
    starts = starts[valid]
    if starts.size < 3:  # the triggers lie outside the recording (the alignment reports why)
        if mode is True:
            raise SambaInputError(f"only {starts.size} of {onsets.size} volume triggers lie inside the "
                                  "recording; cannot correct the gradient artifact", path=source)
        report["reason"] = f"only {starts.size} volume trigger(s) inside the recording"
        return data, report
    idx = starts[:, None] + np.arange(length)[None, :]  # (n_ep, L); epochs do not overlap
    epochs = data[:, idx].transpose(1, 0, 2)  # (n_ep, n_ch, L)
    ratio = artifact_variance_ratio(epochs)
    report.update(variance_ratio_before=ratio, epoch_samples=length, n_template=int(n_template),
                  upsample=int(upsample))
    if mode == "auto" and ratio < AUTO_THRESHOLD:
        report["reason"] = f"no volume-locked artifact (explained variance {ratio:.3f})"
        return data, report
    mean = epochs.mean(axis=0)
    ref_ch = int(np.argmax((mean ** 2).sum(axis=-1)))
    lags = subsample_lags(epochs[:, ref_ch, :], mean[ref_ch], upsample)
    aligned = _fractional_shift(epochs, -lags)
    template = _sliding_mean(aligned, n_template)
    template = _fractional_shift(template, lags)
    data[:, idx] = (epochs - template).transpose(1, 0, 2)
    report.update(applied=True, reference_channel=ref_ch,
                  lag_samples={"min": float(lags.min()), "max": float(lags.max())},
                  variance_ratio_after=artifact_variance_ratio(data[:, idx].transpose(1, 0, 2)))
    return data, report


def find_r_peaks(raw: mne.io.BaseRaw, ecg_channel: str | None = None,
                 source: str | None = None) -> tuple[np.ndarray, str]:
    """R-peak samples (from the first sample) of the ECG channel, detected by MNE."""
    if ecg_channel is None:
        ecg = mne.pick_types(raw.info, meg=False, ecg=True, exclude=())
        if len(ecg) == 0:
            raise SambaInputError("ballistocardiogram correction needs an ECG channel (type ECG "
                                  "in channels.tsv, or set ecg_channel)", path=source)
        ecg_channel = raw.ch_names[ecg[0]]
    elif ecg_channel not in raw.ch_names:
        raise SambaInputError(f"ecg_channel {ecg_channel!r} is not in the recording", path=source)
    with mne.utils.use_log_level("error"):
        events, _, _ = mne.preprocessing.find_ecg_events(raw, ch_name=ecg_channel,
                                                         verbose="error")
    return np.asarray(events[:, 0] - raw.first_samp, dtype=np.int64), ecg_channel


def remove_bcg_artifact(data: np.ndarray, sfreq: float, peaks: np.ndarray, *,
                        n_template: int = 21, mode: Any = "auto",
                        source: str | None = None) -> tuple[np.ndarray, dict]:
    """Subtract the heartbeat-locked ballistocardiogram from ``data`` in place (module doc)."""
    peaks = np.sort(np.asarray(peaks, dtype=np.int64))
    report: dict[str, Any] = {"applied": False, "n_beats": int(peaks.size)}
    if peaks.size < 10:
        raise SambaInputError(f"only {peaks.size} heartbeats found in the ECG channel; "
                              "ballistocardiogram correction needs a usable ECG", path=source)
    rr = int(np.median(np.diff(peaks)))
    pre, length = int(round(-BCG_WINDOW[0] * rr)), int(round((BCG_WINDOW[1] - BCG_WINDOW[0]) * rr))
    starts = peaks - pre
    keep = (starts >= 0) & (starts + length <= data.shape[1])
    starts = starts[keep]
    idx = starts[:, None] + np.arange(length)[None, :]
    epochs = data[:, idx].transpose(1, 0, 2)
    ratio = artifact_variance_ratio(epochs)
    report.update(variance_ratio_before=ratio, heart_rate_bpm=60.0 * sfreq / rr,
                  epoch_s=[BCG_WINDOW[0] * rr / sfreq, BCG_WINDOW[1] * rr / sfreq])
    if mode == "auto" and ratio < AUTO_THRESHOLD:
        report["reason"] = f"no heartbeat-locked artifact (explained variance {ratio:.3f})"
        return data, report
    template = _sliding_mean(epochs, n_template)
    # subtract up to the next epoch's start so no sample is corrected twice
    next_start = np.append(starts[1:], np.iinfo(np.int64).max)
    inside = idx < next_start[:, None]
    cleaned = epochs - template
    data[:, idx[inside]] = cleaned.transpose(1, 0, 2)[:, inside]
    report.update(applied=True)
    return data, report


def artifact_qc_figure(before: np.ndarray, after: np.ndarray, sfreq: float, path, *,
                       title: str, marks_hz: list[float] | None = None) -> None:
    """Before/after power spectra (mean over channels) and a 2 s trace of the median channel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.signal import welch

    nper = int(min(before.shape[1], 4 * sfreq))
    f, p0 = welch(before, sfreq, nperseg=nper, axis=-1)
    _, p1 = welch(after, sfreq, nperseg=nper, axis=-1)
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.6))
    ax0.semilogy(f, p0.mean(0), label="before", lw=0.8)
    ax0.semilogy(f, p1.mean(0), label="after", lw=0.8)
    for m in marks_hz or []:
        ax0.axvline(m, color="0.7", lw=0.5, ls=":")
    ax0.set(xlabel="Hz", ylabel="V²/Hz (channel mean)", title=title)
    ax0.legend()
    ch = int(np.argsort(before.std(axis=1))[before.shape[0] // 2])
    n = int(min(before.shape[1], 2 * sfreq))
    mid = before.shape[1] // 2
    t = np.arange(n) / sfreq
    ax1.plot(t, before[ch, mid:mid + n] * 1e6, lw=0.6, label="before")
    ax1.plot(t, after[ch, mid:mid + n] * 1e6, lw=0.6, label="after")
    ax1.set(xlabel="s", ylabel="µV", title=f"channel {ch}, 2 s")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


__all__ = ["artifact_qc_figure", "artifact_variance_ratio", "find_r_peaks",
           "remove_bcg_artifact", "remove_gradient_artifact", "subsample_lags"]
