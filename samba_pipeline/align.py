"""One common timeline for simultaneous EEG/MEG and fMRI.

All times are in seconds on the ephys clock (ephys sample 0 is t = 0).

* :func:`find_volume_triggers` picks the scanner volume markers (Brain Products ``R128`` and
  friends) out of annotations or ``events.tsv`` rows.
* :func:`estimate_alignment` places fMRI volume k at ``t_k = offset_s + k * TR`` with
  ``offset_s`` = the first (non-skipped) trigger, keeps the volumes whose whole span
  ``[t_k, t_k + TR)`` lies inside the ephys recording, and gives the ephys sample range that
  covers exactly those volumes.
* :func:`make_windows` cuts the cropped, aligned series into whole-volume windows (60 s
  "minute" and 15 s "second" windows by default).

Sample indices use round-half-up, ``sample(t) = floor(t * sfreq + 0.5)``, everywhere (Python's
``round`` rounds halves to even, which would make ``sample(t + n * TR)`` differ from
``sample(t) + sample(n * TR)``). When ``TR * sfreq`` is an integer ``s``, every volume covers
exactly ``s`` samples and ``ephys_stop = ephys_start + n_kept * s``. Otherwise each volume k
covers samples ``[sample(t_k), sample(t_k + TR))``, whose lengths differ by at most one sample;
``integer_samples_per_volume`` in the result says which case applies, and a downstream step that
needs equal-length volumes should resample the ephys data to a rate with an integer number of
samples per TR.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

from samba_pipeline.errors import SambaInputError

LOGGER = logging.getLogger(__name__)

VOLUME_TRIGGER_NAMES = (
    "R128",
    "R 128",
    "Response/R128",
    "Stimulus/R128",
    "volume",
    "TR",
    "Volume",
    "scanner",
)

WINDOW_COLUMNS = [
    "window_id",
    "length_s",
    "label",
    "onset_s",
    "duration_s",
    "fmri_start",
    "fmri_stop",
    "ephys_start",
    "ephys_stop",
]


def to_sample(t, sfreq: float):
    """Sample index of time ``t`` (s) at ``sfreq`` (Hz), rounding halves up."""
    # The 1e-9 guards against products such as 0.1 * 3 * 250 = 74.99999999999999.
    return np.floor(np.asarray(t, dtype=float) * sfreq + 0.5 + 1e-9).astype(np.int64)


def find_volume_triggers(
    onsets, descriptions, names: Sequence[str] = VOLUME_TRIGGER_NAMES, *, path=None
) -> np.ndarray:
    """Onsets (s, sorted, unique) of the events whose description is a volume-trigger name.

    Descriptions are compared after stripping surrounding white space; the match is exact and
    case-sensitive (``names`` lists the accepted spellings).
    """
    onsets = np.asarray(onsets, dtype=float).ravel()
    descriptions = np.asarray([str(d).strip() for d in np.asarray(descriptions).ravel()])
    if onsets.shape != descriptions.shape:
        raise SambaInputError(
            f"{onsets.size} event onsets but {descriptions.size} descriptions", path=path
        )
    hit = np.isin(descriptions, [str(n).strip() for n in names])
    triggers = onsets[hit]
    if not np.isfinite(triggers).all():
        raise SambaInputError(
            f"{int((~np.isfinite(triggers)).sum())} volume trigger(s) have no valid onset",
            path=path,
        )
    # The same trigger may be listed under two names (e.g. 'R128' and 'Response/R128').
    return np.unique(np.round(np.sort(triggers), 9))


def find_volume_triggers_in_annotations(
    annotations, names: Sequence[str] = VOLUME_TRIGGER_NAMES, *, path=None
) -> np.ndarray:
    """Volume triggers of an :class:`mne.Annotations` (or of a Raw's annotations).

    With a Raw, onsets are returned relative to its first sample (``raw.times`` clock).
    """
    import mne

    offset = 0.0
    if isinstance(annotations, mne.io.BaseRaw):
        raw = annotations
        annotations = raw.annotations
        if annotations.orig_time is not None:
            offset = raw.first_time
        if path is None and raw.filenames and raw.filenames[0] is not None:
            path = raw.filenames[0]
    if not isinstance(annotations, mne.Annotations):
        raise SambaInputError(
            f"expected mne Annotations or Raw, got {type(annotations).__name__}", path=path
        )
    return find_volume_triggers(
        np.asarray(annotations.onset) - offset, annotations.description, names, path=path
    )


def estimate_alignment(
    trigger_onsets,
    n_volumes: int,
    tr: float,
    ephys_duration: float,
    ephys_sfreq: float,
    *,
    require_triggers: bool = True,
    tr_tolerance: float = 0.05,
    skip_triggers: int = 0,
    ephys_file: str | os.PathLike | None = None,
) -> dict:
    """Align fMRI volumes to the ephys clock and crop both to their overlap.

    Parameters
    ----------
    trigger_onsets
        Volume-trigger times (s, ephys clock), e.g. from :func:`find_volume_triggers`.
    n_volumes
        Number of volumes in the BOLD series.
    tr
        Repetition time (s).
    ephys_duration
        Length of the ephys recording (s), ``n_samples / sfreq``.
    ephys_sfreq
        Ephys sampling frequency (Hz) of the series the sample indices refer to.
    require_triggers
        Without triggers: raise (True), or assume volume 0 starts at ephys t = 0 (False,
        method ``"assumed_simultaneous_start"``, with a warning).
    tr_tolerance
        Relative tolerance on trigger spacing: the median spacing must lie within
        ``tr * (1 +- tr_tolerance)``; single spacings outside it are counted and warned about.
    skip_triggers
        Leading triggers that belong to no saved volume (dummy scans that sent a trigger).
    ephys_file
        The ephys recording, named in errors.

    Returns
    -------
    dict (JSON-serialisable)
        ``method`` ("triggers": a trigger for every volume acquired while the ephys recording
        ran; "first_trigger+TR": fewer, volume times extrapolated from the first trigger;
        "assumed_simultaneous_start"),
        ``offset_s`` (ephys time of volume 0), ``tr``, ``n_volumes``, ``n_triggers``,
        ``skip_triggers``, ``n_extra_triggers`` (triggers beyond ``n_volumes``, ignored),
        ``n_missing_triggers``, ``first_volume``/``last_volume`` (inclusive) and
        ``fmri_start``/``fmri_stop`` (slice) of the kept volumes, ``n_volumes_kept``,
        ``start_time_s`` (ephys time of the first kept volume), ``duration_s``,
        ``ephys_sfreq``, ``n_ephys_samples``, ``ephys_start_sample``/``ephys_stop_sample``
        (slice covering the kept volumes), ``samples_per_volume``,
        ``integer_samples_per_volume``, ``trigger_spacing_median_s``,
        ``trigger_spacing_max_deviation_s`` (max |spacing - TR|), ``n_irregular_spacings``,
        ``max_trigger_drift_s`` (max |trigger_k - t_k| over matched volumes), ``warnings``.
    """
    n_volumes = _positive_int(n_volumes, "number of volumes", ephys_file)
    tr = _positive_float(tr, "repetition time", ephys_file)
    ephys_duration = _positive_float(ephys_duration, "ephys recording duration", ephys_file)
    sfreq = _positive_float(ephys_sfreq, "ephys sampling frequency", ephys_file)
    tr_tolerance = _positive_float(tr_tolerance, "tr_tolerance", ephys_file)
    skip = int(skip_triggers)
    if skip < 0:
        raise SambaInputError(f"skip_triggers must be >= 0, not {skip_triggers}", path=ephys_file)

    warn: list[str] = []
    trig = np.sort(np.asarray(trigger_onsets, dtype=float).ravel())
    if not np.isfinite(trig).all():
        raise SambaInputError("volume trigger onsets contain NaN/Inf", path=ephys_file)
    outside = (trig < 0) | (trig > ephys_duration)
    if outside.all() and trig.size:
        raise SambaInputError(
            f"EEG/MEG and fMRI do not overlap in time: all {trig.size} volume triggers "
            f"({trig[0]:g}-{trig[-1]:g} s) lie outside the recording [0, {ephys_duration:g}] s",
            path=ephys_file,
        )
    if outside.any():
        warn.append(
            f"{int(outside.sum())} volume trigger(s) lie outside the ephys recording "
            f"[0, {ephys_duration:g}] s and were ignored"
        )
        trig = trig[~outside]
    if skip:
        if skip >= trig.size and trig.size:
            raise SambaInputError(
                f"skip_triggers={skip} but only {trig.size} volume trigger(s) were found",
                path=ephys_file,
            )
        trig = trig[skip:]
    n_trig = int(trig.size)

    spacing_median = spacing_maxdev = drift = None
    n_irregular = 0
    if n_trig >= 2:
        diffs = np.diff(trig)
        spacing_median = float(np.median(diffs))
        spacing_maxdev = float(np.max(np.abs(diffs - tr)))
        if abs(spacing_median - tr) > tr_tolerance * tr:
            raise SambaInputError(
                f"volume trigger spacing (median {spacing_median:.4f} s) is inconsistent with "
                f"the repetition time {tr:g} s",
                path=ephys_file,
            )
        n_irregular = int(np.count_nonzero(np.abs(diffs - tr) > tr_tolerance * tr))
        if n_irregular:
            warn.append(
                f"{n_irregular} trigger interval(s) deviate from TR={tr:g} s by more than "
                f"{100 * tr_tolerance:g}% (largest deviation {spacing_maxdev:.4f} s); volume "
                "times follow the first trigger plus multiples of TR"
            )

    if n_trig == 0:
        if require_triggers:
            raise SambaInputError(
                "no scanner volume triggers found in the ephys recording", path=ephys_file
            )
        method = "assumed_simultaneous_start"
        offset = 0.0
        n_recordable = n_volumes
        warn.append("no volume triggers: assuming fMRI volume 0 starts at ephys t = 0")
    else:
        offset = float(trig[0])
        # Volumes whose trigger would fall inside the recording (a recording that stops
        # before the run ends cannot hold the later triggers).
        n_recordable = int(
            np.count_nonzero(offset + tr * np.arange(n_volumes) <= ephys_duration + 1e-9)
        )
        if n_trig >= n_recordable:
            method = "triggers"
            if n_trig > n_volumes:
                warn.append(
                    f"{n_trig - n_volumes} more volume trigger(s) than volumes ({n_trig} vs "
                    f"{n_volumes}); volume 0 is taken at the first trigger and the trailing "
                    "triggers are ignored (use skip_triggers for dummy scans before the run)"
                )
        else:
            method = "first_trigger+TR"
            warn.append(
                f"only {n_trig} volume trigger(s) for {n_recordable} volumes acquired during "
                "the ephys recording: volume times are extrapolated from the first trigger "
                "with the TR"
            )
        n_match = min(n_trig, n_volumes)
        drift = float(np.max(np.abs(trig[:n_match] - (offset + tr * np.arange(n_match)))))

    k = np.arange(n_volumes)
    t_k = offset + k * tr
    n_samples = int(to_sample(ephys_duration, sfreq))
    start_k = to_sample(t_k, sfreq)
    stop_k = to_sample(t_k + tr, sfreq)
    kept = (start_k >= 0) & (stop_k <= n_samples)
    n_kept = int(kept.sum())
    if n_kept == 0:
        raise SambaInputError(
            f"EEG and fMRI do not overlap in time: the volumes span "
            f"[{t_k[0]:g}, {t_k[-1] + tr:g}] s, the ephys recording [0, {ephys_duration:g}] s",
            path=ephys_file,
        )
    if n_kept < 2:
        raise SambaInputError(
            f"only {n_kept} fMRI volume overlaps the ephys recording (at least 2 needed)",
            path=ephys_file,
        )
    first = int(np.argmax(kept))
    last = first + n_kept - 1
    if n_kept < n_volumes:
        warn.append(
            f"{first} volume(s) before and {n_volumes - 1 - last} after the ephys recording "
            "were cropped"
        )
    t_first = float(t_k[first])
    ephys_start = int(to_sample(t_first, sfreq))
    ephys_stop = int(to_sample(t_first + n_kept * tr, sfreq))
    spv = tr * sfreq

    for message in warn:
        LOGGER.warning("%s%s", f"{ephys_file}: " if ephys_file else "", message)
    return {
        "method": method,
        "offset_s": offset,
        "tr": tr,
        "n_volumes": n_volumes,
        "n_triggers": n_trig,
        "skip_triggers": skip,
        "n_extra_triggers": max(0, n_trig - n_volumes),
        "n_missing_triggers": max(0, n_recordable - n_trig),
        "first_volume": first,
        "last_volume": last,
        "fmri_start": first,
        "fmri_stop": last + 1,
        "n_volumes_kept": n_kept,
        "start_time_s": t_first,
        "duration_s": n_kept * tr,
        "ephys_sfreq": sfreq,
        "n_ephys_samples": n_samples,
        "ephys_start_sample": ephys_start,
        "ephys_stop_sample": ephys_stop,
        "samples_per_volume": spv,
        "integer_samples_per_volume": bool(abs(spv - round(spv)) < 1e-6),
        "trigger_spacing_median_s": spacing_median,
        "trigger_spacing_max_deviation_s": spacing_maxdev,
        "n_irregular_spacings": n_irregular,
        "max_trigger_drift_s": drift,
        "warnings": warn,
    }


def window_label(length_s: float) -> str:
    """'minute' for 60 s, 'second' for 15 s, else e.g. '30s'."""
    if math.isclose(length_s, 60.0):
        return "minute"
    if math.isclose(length_s, 15.0):
        return "second"
    return f"{length_s:g}s"


def make_windows(
    n_volumes: int,
    tr: float,
    ephys_sfreq: float,
    lengths_s: Sequence[float] = (60.0, 15.0),
    *,
    step_s: float | None = None,
) -> pd.DataFrame:
    """Whole-volume windows over the cropped, aligned series.

    Each window length is rounded (halves up) to the nearest whole number of volumes
    (``duration_s = n * TR``), as is the step. Windows start every ``step_s`` (default: the window length,
    i.e. non-overlapping), from volume 0; a trailing partial window is dropped. Indices are
    relative to the cropped series (0 = first kept volume / ephys sample at its onset) and
    stops are exclusive. ``ephys_start``/``ephys_stop`` are ``sample(onset_s)`` and
    ``sample(onset_s + duration_s)`` (see the module docstring on rounding).

    ``window_id`` is ``"<label>-<nnn>"``, numbered per length.
    """
    n_volumes = _positive_int(n_volumes, "number of volumes", None)
    tr = _positive_float(tr, "repetition time", None)
    sfreq = _positive_float(ephys_sfreq, "ephys sampling frequency", None)
    frames = []
    for length in lengths_s:  # a handful of lengths; numerics below are vectorised
        length = _positive_float(length, "window length", None)
        n_win = math.floor(length / tr + 0.5 + 1e-9)
        if n_win < 1:
            raise SambaInputError(f"window length {length:g} s is shorter than the TR {tr:g} s")
        step = (
            n_win
            if step_s is None
            else math.floor(_positive_float(step_s, "step", None) / tr + 0.5 + 1e-9)
        )
        if step < 1:
            raise SambaInputError(f"window step {step_s:g} s is shorter than the TR {tr:g} s")
        starts = np.arange(0, n_volumes - n_win + 1, step, dtype=np.int64)
        label = window_label(length)
        if starts.size == 0:
            LOGGER.warning(
                "no %s window fits in %d volumes (%g s) of TR %g s",
                label,
                n_volumes,
                n_volumes * tr,
                tr,
            )
        onset = starts * tr
        frames.append(
            pd.DataFrame(
                {
                    "window_id": [f"{label}-{i:03d}" for i in range(starts.size)],
                    "length_s": float(length),
                    "label": label,
                    "onset_s": onset,
                    "duration_s": n_win * tr,
                    "fmri_start": starts,
                    "fmri_stop": starts + n_win,
                    "ephys_start": to_sample(onset, sfreq),
                    "ephys_stop": to_sample(onset + n_win * tr, sfreq),
                }
            )
        )
    if not frames:
        return pd.DataFrame({c: [] for c in WINDOW_COLUMNS})
    return pd.concat(frames, ignore_index=True)[WINDOW_COLUMNS]


def _positive_float(value, what, path) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise SambaInputError(f"{what} must be a number, not {value!r}", path=path) from None
    if not np.isfinite(out) or out <= 0:
        raise SambaInputError(f"{what} must be positive, not {value!r}", path=path)
    return out


def _positive_int(value, what, path) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise SambaInputError(f"{what} must be an integer, not {value!r}", path=path) from None
    if out != value or out < 1:
        raise SambaInputError(f"{what} must be a positive integer, not {value!r}", path=path)
    return out
