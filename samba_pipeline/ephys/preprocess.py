"""EEG/MEG sensor-space preprocessing as pure functions (MNE; no Nipype).

Processing order of :func:`preprocess_raw` and why
--------------------------------------------------
1. **pick** the data channels of ``ch_types`` (plus stim channels; annotations always stay);
2. **bads from channels.tsv** are those already in ``raw.info["bads"]`` (MNE-BIDS put them there);
3. **notch** at the line frequency and its harmonics, at the *original* rate. Doing it before
   decimation means no line harmonic can alias into the pass band (with a 60 Hz line and a
   200 Hz target, 180 Hz would fold onto 20 Hz; the resampler's anti-alias filter only
   attenuates by about 50 dB). It is cheap: MNE applies all notches as one FIR kernel by
   overlap-add FFT convolution;
4. **resample** to ``raw_resample_sfreq`` (polyphase, which low-pass filters against aliasing;
   annotations are kept in seconds by MNE). Every later step runs on 5x (1 kHz) to 25x (5 kHz)
   fewer samples; the 0.5 Hz high-pass, whose FIR kernel is the longest (3.3 / 0.5 Hz = 6.6 s),
   profits most;
5. **detect bad channels** (flat, noisy, low correlation; union with the known bads). The
   criteria look at a 1-40 Hz band-passed copy, which steps 3-4 leave unchanged, so detecting
   here gives the same result as on the raw recording, at a fifth of the cost;
6. **band-pass** ``l_freq``-``h_freq`` (zero-phase FIR, firwin/hamming, MNE's automatic
   transition bands), ``h_freq`` capped at 0.45 x the new sampling rate;
7. **interpolate** the bad channels (spherical splines for EEG, which need electrode positions;
   without positions the bad channels are dropped instead, with a warning);
8. **re-reference** EEG (``eeg_reference``, default the average of the good channels), last, so
   that no bad channel leaks into the reference and the result has zero channel mean.

MNE calls use ``n_jobs=1`` (no nested parallelism inside Nipype workers).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import mne
import numpy as np
import pandas as pd
from scipy import signal

from samba_pipeline.errors import SambaInputError, SambaUsageError

LOGGER = logging.getLogger(__name__)

_CH_TYPE_CHOICES = ("eeg", "meg", "mag", "grad")
_SPACE_CHOICES = ("sensor", "source")

#: Band used by the bad-channel criteria (Hz); it excludes slow drifts and line noise.
DETECTION_BAND = (1.0, 40.0)
#: Window length (s) of the correlation criterion.
CORRELATION_WINDOW_S = 1.0
#: A channel is flat if its 1-40 Hz standard deviation is below this fraction of the median
#: channel's (-40 dB; real channels, even those next to the recording reference, stay well
#: above it) ...
FLAT_RELATIVE = 1e-2
#: ... or below these absolute values (numerically zero; physical units of MNE: V, T, T/m).
FLAT_ABSOLUTE = {"eeg": 1e-10, "mag": 1e-16, "grad": 1e-14}
#: Smallest spread (in natural-log units of the channel standard deviation) the robust z-score
#: of the noisy criterion divides by: with very homogeneous channels the MAD can be tiny, and
#: then a channel 30 % above the median would count as "noisy". With this floor and the default
#: threshold 5.0 a channel needs > exp(0.5) = 1.65 x the median amplitude to be flagged.
NOISY_MIN_SPREAD = 0.1


# --------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------


@dataclass
class EphysSettings:
    """EEG/MEG preprocessing options, named as in MNE-BIDS-Pipeline's ``_config.py``.

    ``noisy_z_threshold`` defaults to 5.0, the deviation threshold of the PREP pipeline
    (Bigdely-Shamlo et al. 2015, Front. Neuroinform. 9:16) whose criteria these follow: for
    normally distributed log amplitudes, a robust z above 5 happens by chance with
    p = 3e-7 per channel, so clean data of even 300 sensors is practically never flagged,
    while broken electrodes (usually several times the median amplitude) are.
    ``correlation_threshold`` 0.4 is PREP's as well: neighbouring scalp channels correlate far
    above it because volume conduction mixes every source into many sensors.
    """

    ch_types: tuple[str, ...] = ("eeg",)
    space: str = "sensor"
    l_freq: float | None = 0.5
    h_freq: float | None = 80.0
    l_trans_bandwidth: float | str = "auto"
    h_trans_bandwidth: float | str = "auto"
    notch_freq: str | float | Sequence[float] | None = "auto"
    notch_widths: float | Sequence[float] | None = None
    notch_trans_bandwidth: float = 1.0
    raw_resample_sfreq: float | None = 200.0
    eeg_reference: str | Sequence[str] | None = "average"
    eeg_template_montage: str | None = None
    find_flat_channels: bool = True
    find_noisy_channels: bool = True
    noisy_z_threshold: float = 5.0
    correlation_threshold: float | None = 0.4
    interpolate_bads: bool = True
    # source space (samba_pipeline.ephys.source): template head, inverse, parcel extraction
    inverse_method: str = "eLORETA"
    source_extract: str = "pca"
    noise_cov: str | Sequence[float | None] = "empirical"
    inverse_snr: float = 3.0
    depth: float | None = 0.8
    source_spacing: float = 8.0
    # head model (samba_pipeline.ephys.headmodel): "auto" = an fsaverage BEM when its files
    # are there, else the 3-shell sphere; subjects_dir (else $SUBJECTS_DIR) for fsaverage's
    # 3-layer BEM; bem_file: a BEM solution (fsaverage MRI coordinates) given explicitly
    head_model: str = "auto"
    subjects_dir: str | None = None
    bem_file: str | None = None
    # MR artifacts of simultaneous EEG-fMRI (samba_pipeline.ephys.artifacts): "auto" corrects
    # when the volume- / heartbeat-locked mean explains > 10 % of the variance; False = off
    gradient_correction: bool | str = "auto"
    bcg_correction: bool | str = "auto"
    ecg_channel: str | None = None
    artifact_template_epochs: int = 21
    gradient_upsample: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.ch_types, str):
            self.ch_types = (self.ch_types,)
        self.ch_types = tuple(str(c).lower() for c in self.ch_types)
        if not self.ch_types or set(self.ch_types) - set(_CH_TYPE_CHOICES):
            raise SambaUsageError(
                f"ch_types={list(self.ch_types)} is invalid; use any of {list(_CH_TYPE_CHOICES)}"
            )
        if self.space not in _SPACE_CHOICES:
            raise SambaUsageError(f"space={self.space!r}; choose from {list(_SPACE_CHOICES)}")
        self._check_source_options()
        for name in ("l_freq", "h_freq", "raw_resample_sfreq"):
            value = getattr(self, name)
            if value is not None:
                value = _positive_float(name, value)
                setattr(self, name, value)
        if self.l_freq is not None and self.h_freq is not None and self.l_freq >= self.h_freq:
            raise SambaUsageError(f"l_freq={self.l_freq} must be below h_freq={self.h_freq}")
        for name in ("l_trans_bandwidth", "h_trans_bandwidth"):
            value = getattr(self, name)
            if value != "auto":
                setattr(self, name, _positive_float(name, value))
        self.notch_trans_bandwidth = _positive_float(
            "notch_trans_bandwidth", self.notch_trans_bandwidth
        )
        if isinstance(self.notch_freq, str):
            if self.notch_freq != "auto":
                raise SambaUsageError(
                    f"notch_freq={self.notch_freq!r}; use 'auto', None, a number or a list"
                )
        elif self.notch_freq is not None:
            freqs = np.atleast_1d(np.asarray(self.notch_freq, dtype=float))
            if freqs.ndim != 1 or freqs.size == 0 or np.any(~np.isfinite(freqs) | (freqs <= 0)):
                raise SambaUsageError(f"notch_freq={self.notch_freq!r} must be positive numbers")
        if self.notch_widths is not None:
            widths = np.atleast_1d(np.asarray(self.notch_widths, dtype=float))
            if np.any(~np.isfinite(widths) | (widths <= 0)):
                raise SambaUsageError(f"notch_widths={self.notch_widths!r} must be positive")
        if isinstance(self.eeg_reference, str):
            if self.eeg_reference != "average":
                # a single channel name is allowed, as in MNE
                self.eeg_reference = (self.eeg_reference,)
        elif self.eeg_reference is not None:
            self.eeg_reference = tuple(str(c) for c in self.eeg_reference)
        self.noisy_z_threshold = _positive_float("noisy_z_threshold", self.noisy_z_threshold)
        if self.correlation_threshold is not None:
            value = float(self.correlation_threshold)
            if not 0.0 < value < 1.0:
                raise SambaUsageError(
                    f"correlation_threshold={self.correlation_threshold!r} must lie in (0, 1)"
                )
            self.correlation_threshold = value

    def _check_source_options(self) -> None:
        from samba_pipeline.ephys.source import EXTRACT_MODES, INVERSE_METHODS, NOISE_COV_CHOICES

        if self.inverse_method not in INVERSE_METHODS:
            raise SambaUsageError(
                f"inverse_method={self.inverse_method!r}; choose from {list(INVERSE_METHODS)}")
        if self.source_extract not in EXTRACT_MODES:
            raise SambaUsageError(
                f"source_extract={self.source_extract!r}; choose from {list(EXTRACT_MODES)}")
        cov = self.noise_cov
        if isinstance(cov, str):
            if cov not in NOISE_COV_CHOICES:
                raise SambaUsageError(f"noise_cov={cov!r}; use {list(NOISE_COV_CHOICES)} or a "
                                      "baseline [tmin, tmax] in seconds")
        else:
            try:
                pair = [None if v is None else float(v) for v in cov]
            except (TypeError, ValueError):
                pair = []
            if len(pair) != 2 or (None not in pair and pair[0] >= pair[1]):
                raise SambaUsageError(f"noise_cov={cov!r}; a baseline is [tmin, tmax] in seconds "
                                      "(tmin < tmax; null for the recording's start or end)")
            self.noise_cov = tuple(pair)
        self.inverse_snr = _positive_float("inverse_snr", self.inverse_snr)
        if self.depth is not None:
            self.depth = float(self.depth)
            if not 0.0 <= self.depth <= 1.0:
                raise SambaUsageError(f"depth={self.depth} must lie in [0, 1] (or null)")
        self.source_spacing = _positive_float("source_spacing", self.source_spacing)
        from samba_pipeline.ephys.headmodel import HEAD_MODELS

        if self.head_model not in HEAD_MODELS:
            raise SambaUsageError(f"head_model={self.head_model!r}; choose from {list(HEAD_MODELS)}")
        for name in ("subjects_dir", "bem_file"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (str, os.PathLike)) or not str(value)):
                raise SambaUsageError(f"{name}={value!r} must be a path (or null)")
            setattr(self, name, None if value is None else str(value))
        for name in ("gradient_correction", "bcg_correction"):
            if getattr(self, name) not in (True, False, "auto"):
                raise SambaUsageError(f"{name}={getattr(self, name)!r}; use true, false or 'auto'")
        for name in ("artifact_template_epochs", "gradient_upsample"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SambaUsageError(f"{name}={value!r} must be a positive integer")

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | None) -> EphysSettings:
        """Build settings from a mapping (e.g. the ``[ephys]`` table of a TOML file)."""
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise SambaUsageError(
                f"unknown EEG/MEG option(s) {unknown}; valid options: {sorted(known)}"
            )
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/TOML-friendly dict (tuples become lists)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


def _positive_float(name: str, value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise SambaUsageError(f"{name}={value!r} must be a number") from None
    if not math.isfinite(out) or out <= 0:
        raise SambaUsageError(f"{name}={value!r} must be a positive number")
    return out


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _source_name(raw: mne.io.BaseRaw) -> str | None:
    names = [f for f in (getattr(raw, "filenames", None) or []) if f]
    return str(names[0]) if names else None


def _data_picks(info: mne.Info, ch_types: Sequence[str], exclude: Any = ()) -> np.ndarray:
    """Indices of the data channels of ``ch_types`` (``meg`` = ``mag`` + ``grad``)."""
    meg: bool | str = False
    if "meg" in ch_types or {"mag", "grad"} <= set(ch_types):
        meg = True
    elif "mag" in ch_types:
        meg = "mag"
    elif "grad" in ch_types:
        meg = "grad"
    return mne.pick_types(info, meg=meg, eeg="eeg" in ch_types, ref_meg=False, exclude=exclude)


def _robust_z(values: np.ndarray, reference: np.ndarray, min_spread: float) -> np.ndarray:
    """(values - median) / max(1.4826 * MAD, min_spread), statistics over ``reference``."""
    if reference.size == 0:
        return np.zeros_like(values)
    med = np.median(reference)
    mad = 1.4826 * np.median(np.abs(reference - med))
    return (values - med) / max(mad, min_spread)


def _median_max_abs_correlation(
    x: np.ndarray, win: int, partner_ok: np.ndarray, max_elements: int = 2**24
) -> np.ndarray:
    """Per channel: median over windows of the max |correlation| with the other channels.

    ``x`` is (n_channels, n_times); ``partner_ok`` (n_channels,) says which channels may serve
    as the "other" channel. Vectorised over channels; windows are handled in blocks so the
    (block, n_ch, n_ch) correlation stack stays below ``max_elements``.
    """
    n_ch, n_times = x.shape
    n_win = n_times // win
    if n_win == 0:
        win, n_win = n_times, 1
    seg = x[:, : n_win * win].reshape(n_ch, n_win, win).transpose(1, 0, 2)
    # bound both the (block, n_ch, win) segment copy and the (block, n_ch, n_ch) stack
    block = max(1, int(max_elements // max(1, n_ch * n_ch, n_ch * win)))
    out = np.empty((n_win, n_ch))
    mask = np.broadcast_to(partner_ok[None, :], (n_ch, n_ch)) & ~np.eye(n_ch, dtype=bool)
    for start in range(0, n_win, block):
        s = seg[start : start + block]
        s = s - s.mean(axis=-1, keepdims=True)
        norm = np.sqrt(np.einsum("wct,wct->wc", s, s))
        with np.errstate(invalid="ignore", divide="ignore"):
            s = s / np.where(norm > 0, norm, np.inf)[..., None]
        corr = np.abs(s @ s.transpose(0, 2, 1))
        corr = np.where(mask[None], corr, 0.0)
        out[start : start + block] = corr.max(axis=-1)
    return np.median(out, axis=0)


def _detection_copy(data: np.ndarray, sfreq: float) -> tuple[np.ndarray, float]:
    """1-40 Hz band-passed copy (decimated to about 200 Hz first when sfreq is high)."""
    x = data - data.mean(axis=-1, keepdims=True)
    down = int(sfreq // 200.0)
    if down >= 2:
        x = signal.resample_poly(x, 1, down, axis=-1, padtype="line")
        sfreq = sfreq / down
    l_freq, h_freq = DETECTION_BAND
    h_freq = min(h_freq, 0.4 * sfreq)
    l_freq = min(l_freq, 0.5 * h_freq)
    if x.shape[-1] > 3 * int(sfreq * 3.3 / l_freq):
        x = mne.filter.filter_data(
            x, sfreq, l_freq, h_freq, n_jobs=1, method="fir", phase="zero", verbose=False
        )
        trim = round(sfreq)  # the first and last second carry filter edge effects
        if x.shape[-1] > 10 * trim:
            x = x[:, trim:-trim]
    else:  # too short for the FIR high-pass: low-pass only, and remove the linear drift
        x = mne.filter.filter_data(
            signal.detrend(x, axis=-1), sfreq, None, h_freq, n_jobs=1, verbose=False
        )
    return x, sfreq


# --------------------------------------------------------------------------------------------
# bad channels
# --------------------------------------------------------------------------------------------


def detect_bad_channels(
    raw: mne.io.BaseRaw, settings: EphysSettings | None = None
) -> dict[str, Any]:
    """Find flat, noisy and uncorrelated channels (PREP-style criteria, vectorised).

    Criteria, each computed per channel type (EEG, magnetometers, gradiometers) on a 1-40 Hz
    band-passed copy (so slow drifts and line noise do not dominate):

    * **flat**: standard deviation below ``FLAT_RELATIVE`` x the median channel's, or below
      the absolute ``FLAT_ABSOLUTE`` floor;
    * **noisy**: robust z-score (median / 1.4826 MAD, spread floored at ``NOISY_MIN_SPREAD``)
      of the log standard deviation above ``settings.noisy_z_threshold``;
    * **low_correlation**: in 1 s windows, the largest |correlation| with any other good
      channel; its median over windows below ``settings.correlation_threshold``.

    Channels already in ``raw.info["bads"]`` are scored but do not count in the reference
    statistics (median, MAD) nor as correlation partners. Flat channels are only reported as
    flat.

    Returns
    -------
    dict
        ``flat``, ``noisy``, ``low_correlation``: lists of channel names;
        ``scores``: DataFrame indexed by channel name with columns ``ch_type``, ``std``
        (1-40 Hz, SI units), ``log_std_z``, ``max_abs_corr`` and the three boolean flags.
    """
    settings = settings or EphysSettings()
    picks = _data_picks(raw.info, settings.ch_types, exclude=())
    names = [raw.ch_names[i] for i in picks]
    types = np.array(raw.get_channel_types(picks=picks)) if len(picks) else np.array([])
    n = len(picks)
    scores = pd.DataFrame(
        {
            "ch_type": types,
            "std": np.full(n, np.nan),
            "log_std_z": np.full(n, np.nan),
            "max_abs_corr": np.full(n, np.nan),
            "flat": np.zeros(n, bool),
            "noisy": np.zeros(n, bool),
            "low_correlation": np.zeros(n, bool),
        },
        index=pd.Index(names, name="name"),
    )
    if n == 0 or not (settings.find_flat_channels or settings.find_noisy_channels):
        return {"flat": [], "noisy": [], "low_correlation": [], "scores": scores}

    data = raw.get_data(picks=picks)
    band, band_sfreq = _detection_copy(data, float(raw.info["sfreq"]))
    std = band.std(axis=-1)
    known_bad = np.isin(names, raw.info["bads"])
    win = max(2, round(CORRELATION_WINDOW_S * band_sfreq))

    flat = np.zeros(n, bool)
    noisy = np.zeros(n, bool)
    lowcorr = np.zeros(n, bool)
    z = np.full(n, np.nan)
    corr = np.full(n, np.nan)
    for ch_type in np.unique(types):
        idx = np.flatnonzero(types == ch_type)
        g_std = std[idx]
        ref = ~known_bad[idx]
        if not ref.any():
            ref = np.ones(idx.size, bool)
        med_std = np.median(g_std[ref])
        g_flat = (g_std < FLAT_RELATIVE * med_std) | (
            g_std < FLAT_ABSOLUTE.get(ch_type, 0.0)
        )
        if settings.find_flat_channels:
            flat[idx] = g_flat
        usable = ~g_flat
        ref &= usable
        if usable.sum() < 3:
            if settings.find_noisy_channels:
                LOGGER.warning(
                    "fewer than 3 usable %s channels: noisy/correlation criteria skipped",
                    ch_type,
                )
            continue
        with np.errstate(divide="ignore"):
            log_std = np.log(g_std)
        z[idx] = _robust_z(log_std, log_std[ref], NOISY_MIN_SPREAD)
        corr[idx] = _median_max_abs_correlation(band[idx], win, partner_ok=ref)
        if settings.find_noisy_channels:
            noisy[idx] = usable & (z[idx] > settings.noisy_z_threshold)
            if settings.correlation_threshold is not None:
                lowcorr[idx] = usable & (corr[idx] < settings.correlation_threshold)
    if not settings.find_flat_channels:
        flat[:] = False
    scores["std"] = std
    scores["log_std_z"] = z
    scores["max_abs_corr"] = corr
    scores["flat"] = flat
    scores["noisy"] = noisy
    scores["low_correlation"] = lowcorr
    pick = np.asarray(names, dtype=object)
    return {
        "flat": list(pick[flat]),
        "noisy": list(pick[noisy]),
        "low_correlation": list(pick[lowcorr]),
        "scores": scores,
    }


# --------------------------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------------------------


def _notch_frequencies(
    settings: EphysSettings, line_freq: float | None, sfreq: float
) -> tuple[np.ndarray | None, np.ndarray | float | None]:
    """Frequencies (and widths) to notch below Nyquist at ``sfreq``."""
    if settings.notch_freq is None:
        return None, None
    nyq = sfreq / 2.0
    if isinstance(settings.notch_freq, str):  # "auto"
        if not line_freq:
            LOGGER.warning(
                "line frequency unknown (no PowerLineFrequency in the sidecar): notch skipped"
            )
            return None, None
        freqs = line_freq * np.arange(1, int(nyq // line_freq) + 1)
    else:
        freqs = np.atleast_1d(np.asarray(settings.notch_freq, dtype=float))
    widths = settings.notch_widths
    w = freqs / 200.0 if widths is None else np.atleast_1d(np.asarray(widths, float))
    if w.size not in (1, freqs.size):
        raise SambaUsageError(
            f"notch_widths has {w.size} values but there are {freqs.size} notch frequencies"
        )
    w = np.broadcast_to(w, freqs.shape)
    keep = freqs + w / 2.0 + settings.notch_trans_bandwidth / 2.0 < nyq
    if not keep.all():
        LOGGER.info("notch: %s Hz at or above Nyquist (%g Hz) skipped", freqs[~keep], nyq)
    if not keep.any():
        return None, None
    freqs = freqs[keep]
    return freqs, (None if widths is None else w[keep].copy())


def _picked_copy(raw: mne.io.BaseRaw, keep: np.ndarray) -> mne.io.BaseRaw:
    """Preloaded copy of ``raw`` restricted to ``keep``, holding one copy of the data only.

    ``raw.copy().pick(keep)`` would briefly hold the full copy *and* the picked one.
    """
    if len(keep) == len(raw.ch_names):
        out = raw.copy()
        if not out.preload:
            out.load_data(verbose=False)
        return out
    info = mne.pick_info(raw.info, keep)
    data = raw.get_data(picks=keep)
    out = mne.io.RawArray(data, info, first_samp=raw.first_samp, copy=None, verbose=False)
    ann = raw.annotations
    # onsets relative to the first sample, orig_time None: MNE re-anchors them to the new raw
    # the same way whether or not there is a meas_date
    out.set_annotations(
        mne.Annotations(
            onset=np.asarray(ann.onset) - raw.first_time,
            duration=ann.duration,
            description=ann.description,
            orig_time=None,
            ch_names=ann.ch_names,
        )
    )
    return out


def _has_positions(info: mne.Info, picks: np.ndarray) -> bool:
    if len(picks) == 0:
        return True
    loc = np.array([info["chs"][i]["loc"][:3] for i in picks])
    return bool(np.all(np.isfinite(loc)) and np.all(np.linalg.norm(loc, axis=1) > 0))


# One FIR design for every filter (MNE's defaults, made explicit); n_jobs=1 because Nipype
# already runs nodes in parallel (nested parallelism oversubscribes the CPUs).
_FIR_KWARGS = dict(method="fir", phase="zero", fir_window="hamming", fir_design="firwin",
                   n_jobs=1, verbose=False)


def preprocess_raw(
    raw: mne.io.BaseRaw, settings: EphysSettings | None = None,
    volume_onsets: np.ndarray | None = None, qc_excerpt: dict | None = None,
) -> tuple[mne.io.BaseRaw, dict[str, Any]]:
    """Preprocess one continuous EEG/MEG recording in sensor space.

    ``raw`` is not modified. See the module docstring for the order of the steps and why.
    ``qc_excerpt``, when a dict, receives ``before``/``after`` (n_channels, n) arrays of
    ``QC_EXCERPT_S`` seconds from the middle of the data channels around the MR artifact
    correction, and ``sfreq`` (for :func:`samba_pipeline.ephys.artifacts.artifact_qc_figure`).

    Returns
    -------
    raw_clean : mne.io.Raw
        Data channels of ``settings.ch_types`` (bad channels interpolated, or dropped when
        interpolation is impossible) plus stim channels, resampled, filtered, re-referenced,
        with the original annotations.
    report : dict
        JSON-serialisable summary: sampling rates, bad channels per criterion, interpolated /
        dropped channels, reference, filter settings, line frequency used, channel count,
        duration, per-step timings and the per-channel scores (``channel_scores``).
    """
    settings = settings or EphysSettings()
    if not isinstance(settings, EphysSettings):
        raise TypeError(f"settings must be EphysSettings, not {type(settings)}")
    source = _source_name(raw)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def _tick(step: str) -> None:
        nonlocal t0
        now = time.perf_counter()
        timings[step] = round(now - t0, 3)
        t0 = now

    # 1. pick data channels (+ stim)
    data_picks = _data_picks(raw.info, settings.ch_types, exclude=())
    if len(data_picks) == 0:
        raise SambaInputError(
            f"no channels of type {list(settings.ch_types)} in the recording "
            f"(found {sorted(set(raw.get_channel_types()))})",
            path=source,
        )
    stim_picks = mne.pick_types(raw.info, meg=False, stim=True, exclude=())
    ecg_picks = mne.pick_types(raw.info, meg=False, ecg=True, exclude=())
    if settings.ecg_channel is not None and settings.ecg_channel in raw.ch_names:
        ecg_picks = np.array([raw.ch_names.index(settings.ecg_channel)])
    keep = np.union1d(np.union1d(data_picks, stim_picks), ecg_picks)
    raw = _picked_copy(raw, keep)
    sfreq_orig = float(raw.info["sfreq"])
    n_times_orig = raw.n_times
    if raw.n_times < 2:
        raise SambaInputError("recording has fewer than 2 samples", path=source)
    if settings.eeg_template_montage and "eeg" in raw:
        montage = mne.channels.make_standard_montage(settings.eeg_template_montage)
        raw.set_montage(montage, match_case=False, on_missing="warn", verbose=False)
    _tick("pick")

    # 1b. MR artifacts (gradient, then ballistocardiogram), at the original rate, unfiltered
    mr_report = _correct_mr_artifacts(raw, settings, volume_onsets, source, qc_excerpt)
    ecg_names = [raw.ch_names[i] for i in mne.pick_types(raw.info, meg=False, ecg=True, exclude=())]
    if settings.ecg_channel in raw.ch_names and settings.ecg_channel not in ecg_names:
        ecg_names.append(settings.ecg_channel)
    data_names = [raw.ch_names[i] for i in _data_picks(raw.info, settings.ch_types, exclude=())]
    ecg_names = [c for c in ecg_names if c not in data_names]
    if ecg_names:
        raw.drop_channels(ecg_names)
    _tick("mr_artifacts")

    # 2. bads already known (channels.tsv via MNE-BIDS)
    bads_known = [b for b in raw.info["bads"] if b in raw.ch_names]
    raw.info["bads"] = bads_known

    # 3. notch at the original rate
    line_freq = raw.info.get("line_freq")
    line_freq = float(line_freq) if line_freq else None
    notch_freqs, notch_widths = _notch_frequencies(settings, line_freq, sfreq_orig)
    if notch_freqs is not None:
        raw.notch_filter(
            notch_freqs,
            picks="data",
            notch_widths=notch_widths,
            trans_bandwidth=settings.notch_trans_bandwidth,
            **_FIR_KWARGS,
        )
    _tick("notch")

    # 4. resample (polyphase: anti-alias low-pass included)
    target = settings.raw_resample_sfreq
    if target is not None and not math.isclose(target, sfreq_orig):
        raw.resample(target, method="polyphase", n_jobs=1, verbose=False)
    sfreq = float(raw.info["sfreq"])
    _tick("resample")

    # 5. bad channels
    detection = detect_bad_channels(raw, settings)
    bads = list(dict.fromkeys(
        bads_known + detection["flat"] + detection["noisy"] + detection["low_correlation"]
    ))
    raw.info["bads"] = bads
    n_data = len(_data_picks(raw.info, settings.ch_types, exclude=()))
    if len(bads) >= n_data:
        raise SambaInputError(
            f"all {n_data} data channels are bad (flat: {len(detection['flat'])}, noisy: "
            f"{len(detection['noisy'])}, uncorrelated: {len(detection['low_correlation'])})",
            path=source,
        )
    if len(bads) > 0.3 * n_data:
        LOGGER.warning("%d of %d channels are bad: %s", len(bads), n_data, bads)
    _tick("detect_bads")

    # 6. band-pass at the new rate
    h_freq = settings.h_freq
    h_cap = 0.45 * sfreq
    if h_freq is not None and h_freq > h_cap:
        LOGGER.info("h_freq %g Hz capped to %g Hz (0.45 x %g Hz)", h_freq, h_cap, sfreq)
        h_freq = h_cap
    l_freq = settings.l_freq
    if l_freq is not None and h_freq is not None and l_freq >= h_freq:
        raise SambaUsageError(
            f"l_freq={l_freq} Hz is not below h_freq={h_freq:g} Hz at {sfreq:g} Hz"
        )
    if l_freq is not None or h_freq is not None:
        raw.filter(
            l_freq,
            h_freq,
            picks="data",
            l_trans_bandwidth=settings.l_trans_bandwidth,
            h_trans_bandwidth=settings.h_trans_bandwidth,
            **_FIR_KWARGS,
        )
    _tick("bandpass")

    # 7. interpolate (or drop) bad channels
    interpolated: list[str] = []
    dropped: list[str] = []
    if bads and settings.interpolate_bads:
        eeg_picks = mne.pick_types(raw.info, meg=False, eeg=True, exclude=())
        eeg_bads = [raw.ch_names[i] for i in eeg_picks if raw.ch_names[i] in bads]
        if eeg_bads and not _has_positions(raw.info, eeg_picks):
            LOGGER.warning(
                "no electrode positions: bad EEG channels %s are dropped, not interpolated "
                "(set eeg_template_montage or provide *_electrodes.tsv)", eeg_bads
            )
            raw.drop_channels(eeg_bads)
            dropped = eeg_bads
        to_interp = [b for b in raw.info["bads"] if b in raw.ch_names]
        if to_interp:
            raw.interpolate_bads(reset_bads=True, mode="accurate", origin="auto",
                                 verbose=False)
            interpolated = to_interp
    _tick("interpolate")

    # 8. EEG reference
    reference: str | list[str] | None = None
    if "eeg" in raw and settings.eeg_reference is not None:
        if settings.eeg_reference == "average":
            raw.set_eeg_reference("average", projection=False, ch_type="eeg", verbose=False)
            reference = "average"
        else:
            ref = list(settings.eeg_reference)
            missing = [c for c in ref if c not in raw.ch_names]
            if missing:
                raise SambaInputError(
                    f"eeg_reference channel(s) {missing} not in the recording", path=source
                )
            raw.set_eeg_reference(ref, projection=False, ch_type="eeg", verbose=False)
            reference = ref
    _tick("reference")

    scores = detection["scores"].reset_index()
    report: dict[str, Any] = {
        "ch_types": list(settings.ch_types),
        "space": settings.space,
        "sfreq_original": sfreq_orig,
        "sfreq": sfreq,
        "n_times_original": int(n_times_orig),
        "n_times": int(raw.n_times),
        "duration_s": float(raw.n_times / sfreq),
        "n_channels": len(_data_picks(raw.info, settings.ch_types, exclude=())),
        "bads": {
            "channels_tsv": bads_known,
            "flat": detection["flat"],
            "noisy": detection["noisy"],
            "low_correlation": detection["low_correlation"],
        },
        "bad_channels": bads,
        "interpolated": interpolated,
        "dropped": dropped,
        "reference": reference,
        "line_freq": line_freq,
        "filter": {
            "notch_freqs": None if notch_freqs is None else [float(f) for f in notch_freqs],
            "notch_widths": None if notch_widths is None else
            [float(w) for w in np.atleast_1d(notch_widths)],
            "notch_trans_bandwidth": settings.notch_trans_bandwidth,
            "l_freq": l_freq,
            "h_freq": None if h_freq is None else float(h_freq),
            "h_freq_requested": settings.h_freq,
            "l_trans_bandwidth": settings.l_trans_bandwidth,
            "h_trans_bandwidth": settings.h_trans_bandwidth,
            "method": "fir",
            "phase": "zero",
            "fir_window": "hamming",
            "fir_design": "firwin",
            "resample_method": "polyphase",
        },
        "mr_artifacts": mr_report,
        "processing_order": [
            "pick", "mr_artifacts", "notch", "resample", "detect_bads", "bandpass", "interpolate", "reference"
        ],
        "thresholds": {
            "noisy_z_threshold": settings.noisy_z_threshold,
            "correlation_threshold": settings.correlation_threshold,
            "flat_relative": FLAT_RELATIVE,
            "detection_band_hz": list(DETECTION_BAND),
        },
        "timings_s": timings,
        "channel_scores": _records(scores),
        "settings": settings.to_dict(),
    }
    return raw, report


#: Length (s) of the before/after excerpt of the MR artifact QC figure.
QC_EXCERPT_S = 20.0


def _correct_mr_artifacts(raw: mne.io.BaseRaw, settings: EphysSettings,
                          volume_onsets: np.ndarray | None, source: str | None,
                          qc_excerpt: dict | None = None) -> dict[str, Any]:
    """Gradient and ballistocardiogram correction of ``raw`` in place (artifacts module)."""
    from samba_pipeline.ephys import artifacts

    sfreq = float(raw.info["sfreq"])
    report: dict[str, Any] = {}
    data_picks = _data_picks(raw.info, settings.ch_types, exclude=())
    n_qc = min(raw.n_times, int(QC_EXCERPT_S * sfreq))
    qc_start = (raw.n_times - n_qc) // 2
    before = None
    if qc_excerpt is not None:  # a short excerpt only: the full copy would double the memory
        before = raw.get_data(picks=data_picks, start=qc_start, stop=qc_start + n_qc)
    ecg_picks = mne.pick_types(raw.info, meg=False, ecg=True, exclude=())
    if settings.ecg_channel in raw.ch_names:
        ecg_picks = np.union1d(ecg_picks, [raw.ch_names.index(settings.ecg_channel)])
    grad_picks = np.union1d(data_picks, ecg_picks).astype(int)
    if settings.gradient_correction is False:
        report["gradient"] = {"applied": False, "reason": "gradient_correction = false"}
    elif volume_onsets is None or len(volume_onsets) < 3:
        if settings.gradient_correction is True:
            raise SambaInputError("gradient_correction = true needs the scanner volume triggers",
                                  path=source)
        report["gradient"] = {"applied": False, "reason": "no volume triggers"}
    else:
        def _grad(x):
            x, report["gradient"] = artifacts.remove_gradient_artifact(
                x, sfreq, volume_onsets, n_template=settings.artifact_template_epochs,
                upsample=settings.gradient_upsample, mode=settings.gradient_correction,
                source=source)
            return x

        raw.apply_function(_grad, picks=grad_picks, channel_wise=False, verbose=False)
    if settings.bcg_correction is False:
        report["bcg"] = {"applied": False, "reason": "bcg_correction = false"}
    elif len(ecg_picks) == 0 and settings.bcg_correction == "auto":
        report["bcg"] = {"applied": False, "reason": "no ECG channel"}
    else:
        peaks, ecg_name = artifacts.find_r_peaks(raw, settings.ecg_channel, source)

        def _bcg(x):
            x, report["bcg"] = artifacts.remove_bcg_artifact(
                x, sfreq, peaks, n_template=settings.artifact_template_epochs,
                mode=settings.bcg_correction, source=source)
            return x

        raw.apply_function(_bcg, picks=data_picks, channel_wise=False, verbose=False)
        report["bcg"]["ecg_channel"] = ecg_name
    if qc_excerpt is not None:
        qc_excerpt.update(before=before, sfreq=sfreq, start_s=qc_start / sfreq,
                          after=raw.get_data(picks=data_picks, start=qc_start,
                                             stop=qc_start + n_qc))
    return report


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    out = []
    for rec in df.to_dict(orient="records"):
        clean = {}
        for key, value in rec.items():
            if isinstance(value, np.generic):
                value = value.item()
            if isinstance(value, float) and not math.isfinite(value):
                value = None
            clean[key] = value
        out.append(clean)
    return out


# --------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------


def ephys_timeseries(
    raw: mne.io.BaseRaw, start_sample: int | None = None, stop_sample: int | None = None
) -> tuple[np.ndarray, list[str], float]:
    """Sensor (or parcel) time series as a (n_times, n_channels) float32 array.

    Good EEG/MEG data channels only (channels still marked bad and stim channels are left
    out), in SI units (V, T, T/m). A recording without EEG/MEG channels holds source-space
    parcel time courses (``misc`` channels, see :mod:`samba_pipeline.ephys.source`); those are
    returned instead. ``start_sample``/``stop_sample`` index samples of ``raw`` counted from
    its first sample (0 = ``raw.times[0]``), stop exclusive.
    """
    picks = mne.pick_types(raw.info, meg=True, eeg=True, ref_meg=False, exclude="bads")
    if len(picks) == 0:
        picks = mne.pick_types(raw.info, misc=True, exclude="bads")
    start = 0 if start_sample is None else int(start_sample)
    stop = raw.n_times if stop_sample is None else int(stop_sample)
    if not 0 <= start < stop <= raw.n_times:
        raise ValueError(
            f"sample range [{start_sample}, {stop_sample}) outside [0, {raw.n_times})"
        )
    data = raw.get_data(picks=picks, start=start, stop=stop)
    names = [raw.ch_names[i] for i in picks]
    return np.ascontiguousarray(data.T, dtype=np.float32), names, float(raw.info["sfreq"])


#: Peak working set of reading + :func:`preprocess_raw`, in float64 copies of the input data,
#: and the interpreter with MNE imported. Measured on 64 channels x 10 min at 1 kHz (0.29 GiB
#: of data): peak RSS 0.85 GB, i.e. 0.13 GB + 2.5 copies; rounded up.
_MEM_COPIES = 3.0
_MEM_BASE_GB = 0.5


def estimate_ephys_mem_gb(n_channels: int, n_samples: int) -> float:
    """Memory (GB) to declare for a node that reads and preprocesses one recording.

    Interpreter, MNE and Nipype (about 0.5 GB) plus three float64 copies of the
    (n_channels x n_samples) recording: the loaded data, the picked working copy and the
    notch filter's output (the later steps run on the resampled, smaller data).
    """
    n_channels = max(int(n_channels), 0)
    n_samples = max(int(n_samples), 0)
    data_gb = n_channels * n_samples * 8 / 1024**3
    return round(_MEM_BASE_GB + _MEM_COPIES * data_gb, 3)
