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


# --------------------------------------------------------------------------------------------
# Non-simultaneous recordings: one timeline from the stimulus events of both sessions
# --------------------------------------------------------------------------------------------

#: ``trial_type`` values that mark the onset of a stimulus segment (e.g. a part of a movie).
STIMULUS_EVENT_NAMES = ("movie_segment",)
#: Largest spread (s) of the per-segment offsets between the two sessions that one offset may
#: absorb (presentation jitter); beyond it the sessions did not play the stimulus the same way.
STIMULUS_TOLERANCE_S = 0.1


def read_stimulus_events(events_tsv, names: Sequence[str] = STIMULUS_EVENT_NAMES) -> pd.DataFrame:
    """Stimulus-segment rows of a BIDS ``events.tsv``: ``segment``, ``onset``, ``duration``.

    A row is a segment onset when its ``trial_type`` is one of ``names``. The segment is named
    by its ``stim_file`` (the BIDS column for the presented file); without that column, by its
    rank (``#1``, ``#2`` ... in onset order). ``duration`` is NaN where the table has none.

    Raises :class:`SambaMissingInputError` (no such file) or :class:`SambaInputError` naming
    the file: unreadable table, no ``onset``/``trial_type`` column, no stimulus event, a
    segment listed twice, an onset that is n/a.
    """
    from samba_pipeline.errors import SambaMissingInputError

    path = os.fspath(events_tsv)
    if not os.path.isfile(path):
        raise SambaMissingInputError(
            "events.tsv with the stimulus-segment onsets not found (needed to align "
            "recordings from different sessions)", path=path)
    try:
        table = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False, dtype=str)
    except Exception as exc:  # pandas' parser errors have many types
        raise SambaInputError(f"cannot read the events table: {exc}", path=path) from None
    missing = [c for c in ("onset", "trial_type") if c not in table.columns]
    if missing:
        raise SambaInputError(
            f"events table lacks the column(s) {missing}; stimulus segments are rows with "
            f"'onset' and trial_type one of {list(names)}", path=path)
    kinds = table["trial_type"].fillna("n/a").astype(str).str.strip()
    rows = table[kinds.isin([str(n).strip() for n in names])]
    if rows.empty:
        found = sorted(set(kinds))[:10]
        raise SambaInputError(
            f"no stimulus-segment events (trial_type {', '.join(map(repr, names))}) in the "
            f"events table (trial types found: {', '.join(found) or 'none'}); name yours with "
            "--stimulus-event", path=path)
    onset = pd.to_numeric(rows["onset"], errors="coerce").to_numpy(float)
    if not np.isfinite(onset).all():
        raise SambaInputError(f"{int((~np.isfinite(onset)).sum())} stimulus event(s) have no "
                              "valid onset", path=path)
    duration = (pd.to_numeric(rows["duration"], errors="coerce").to_numpy(float)
                if "duration" in rows.columns else np.full(onset.size, np.nan))
    order = np.argsort(onset, kind="stable")
    if "stim_file" in rows.columns and rows["stim_file"].notna().all():
        segment = rows["stim_file"].astype(str).str.strip().to_numpy()[order]
    else:
        segment = np.array([f"#{i + 1}" for i in range(onset.size)])
    dup = sorted({s for s in segment if (segment == s).sum() > 1})
    if dup:
        raise SambaInputError(f"stimulus segment(s) {dup} start more than once; one onset per "
                              "segment is needed to align the sessions", path=path)
    return pd.DataFrame({"segment": segment, "onset": onset[order], "duration": duration[order]})


def match_stimulus_segments(ephys_segments: pd.DataFrame, fmri_segments: pd.DataFrame, *,
                            tolerance_s: float = STIMULUS_TOLERANCE_S,
                            ephys_events_file=None, fmri_events_file=None) -> dict:
    """Match the stimulus segments of two sessions by name and check that one offset fits.

    Returns ``segments`` (shared names, fMRI order), ``ephys_onset``/``fmri_onset``/
    ``ephys_duration``/``fmri_duration`` (arrays), ``offset_s`` (mean of the per-segment
    ``ephys_onset - fmri_onset``), ``residual_s`` and ``warnings``; raises
    :class:`SambaInputError` naming the events files (see
    :func:`estimate_stimulus_alignment`).
    """
    tolerance_s = _positive_float(tolerance_s, "stimulus tolerance", ephys_events_file)
    both = f"{ephys_events_file or 'EEG/MEG events'} and {fmri_events_file or 'fMRI events'}"
    where = ephys_events_file or fmri_events_file
    warn: list[str] = []

    eph = ephys_segments.set_index("segment")
    fmr = fmri_segments.set_index("segment")
    ranked = [str(s).startswith("#") for s in (*eph.index, *fmr.index)]
    if any(ranked) and len(eph) != len(fmr):
        raise SambaInputError(
            f"the stimulus segments have no names (no stim_file column) and their numbers "
            f"differ ({len(eph)} vs {len(fmr)} in {both}): add stim_file to both tables",
            path=where)
    common = [s for s in fmr.index if s in eph.index]
    if not common:
        raise SambaInputError(
            f"no stimulus segment is shared by {both} (EEG/MEG: {', '.join(map(str, eph.index[:5]))}; "
            f"fMRI: {', '.join(map(str, fmr.index[:5]))}): the sessions did not present the same "
            "stimulus", path=where)
    only = sorted(set(eph.index) ^ set(fmr.index))
    if only:
        warn.append(f"{len(only)} stimulus segment(s) appear in one session only and are not "
                    f"used: {', '.join(map(str, only[:5]))}")
    on_e = eph.loc[common, "onset"].to_numpy(float)
    on_f = fmr.loc[common, "onset"].to_numpy(float)
    dur_e = eph.loc[common, "duration"].to_numpy(float)
    dur_f = fmr.loc[common, "duration"].to_numpy(float)
    both_dur = np.isfinite(dur_e) & np.isfinite(dur_f)
    bad_dur = both_dur & (np.abs(dur_e - dur_f) > tolerance_s)
    if bad_dur.any():
        i = int(np.argmax(bad_dur))
        raise SambaInputError(
            f"stimulus segment {common[i]!r} lasts {dur_e[i]:g} s in the EEG/MEG session but "
            f"{dur_f[i]:g} s in the fMRI session ({both}): not the same stimulus", path=where)
    if np.any(np.diff(on_e) <= 0):
        raise SambaInputError(
            f"the shared stimulus segments play in a different order in {both}; samba-bids "
            "aligns sessions with one time offset", path=where)
    offsets = on_e - on_f
    offset = float(offsets.mean())
    residual = offsets - offset
    spread = float(offsets.max() - offsets.min())
    if spread > tolerance_s:
        raise SambaInputError(
            f"the stimulus segments are spaced differently in the two sessions (per-segment "
            f"offsets EEG/MEG - fMRI range {offsets.min():.3f} to {offsets.max():.3f} s, more "
            f"than the tolerance {tolerance_s:g} s) in {both}; samba-bids aligns sessions with "
            "one time offset (raise --stimulus-tolerance only for presentation jitter)",
            path=where)
    return {"segments": common, "ephys_onset": on_e, "fmri_onset": on_f,
            "ephys_duration": dur_e, "fmri_duration": dur_f, "offset_s": offset,
            "residual_s": residual, "warnings": warn}


def estimate_stimulus_alignment(
    ephys_segments: pd.DataFrame,
    fmri_segments: pd.DataFrame,
    n_volumes: int,
    tr: float,
    ephys_duration: float,
    ephys_sfreq: float,
    *,
    tolerance_s: float = STIMULUS_TOLERANCE_S,
    crop_to_stimulus: bool = True,
    ephys_file: str | os.PathLike | None = None,
    ephys_events_file: str | os.PathLike | None = None,
    fmri_events_file: str | os.PathLike | None = None,
) -> dict:
    """Align an fMRI run to an EEG/MEG recording of *another* session by the stimulus.

    Both sessions presented the same stimulus segments; ``ephys_segments`` and
    ``fmri_segments`` are :func:`read_stimulus_events` tables (ephys onsets in s from the first
    ephys sample; fMRI onsets in s from the start of volume 0, as BIDS defines them). Segments
    are matched by name; each gives one offset ``ephys_onset - fmri_onset``, and their mean
    (least squares) is the ephys time of fMRI volume 0 (``offset_s``). Volume k then lies at
    ``offset_s + k * TR`` on the ephys clock, as with scanner triggers, and the crop follows
    :func:`estimate_alignment`'s rules. With ``crop_to_stimulus`` only the volumes that lie
    entirely within the stimulus (first matched onset to last matched segment's end) are kept:
    outside it the two sessions share nothing.

    Returns the fields of :func:`estimate_alignment` (trigger statistics empty;
    ``method = "stimulus_events"``) plus ``n_segments``, ``segments`` (per matched segment:
    name, both onsets, residual), ``offset_residual_max_s``, ``stimulus_window_s`` (ephys
    clock) and the two events files.

    Raises :class:`SambaInputError` naming the events files when no segment is shared, when a
    matched segment's duration differs between the sessions by more than ``tolerance_s`` or
    when the per-segment offsets spread more than ``tolerance_s`` (the stimulus was not played
    with the same timing in both sessions).
    """
    n_volumes = _positive_int(n_volumes, "number of volumes", ephys_file)
    tr = _positive_float(tr, "repetition time", ephys_file)
    ephys_duration = _positive_float(ephys_duration, "ephys recording duration", ephys_file)
    sfreq = _positive_float(ephys_sfreq, "ephys sampling frequency", ephys_file)
    tolerance_s = _positive_float(tolerance_s, "stimulus tolerance", ephys_file)
    both = f"{ephys_events_file or 'EEG/MEG events'} and {fmri_events_file or 'fMRI events'}"
    where = ephys_events_file or ephys_file
    match = match_stimulus_segments(ephys_segments, fmri_segments, tolerance_s=tolerance_s,
                                    ephys_events_file=ephys_events_file,
                                    fmri_events_file=fmri_events_file)
    common, on_e, on_f, dur_e, dur_f = (match[k] for k in ("segments", "ephys_onset",
                                                            "fmri_onset", "ephys_duration",
                                                            "fmri_duration"))
    offset, residual = match["offset_s"], match["residual_s"]
    warn: list[str] = list(match["warnings"])
    # the stimulus on the ephys clock: first shared onset to the end of the last shared segment
    dur = np.where(np.isfinite(dur_f), dur_f, dur_e)
    last = len(common) - 1
    end_last = on_f[last] + (dur[last] if np.isfinite(dur[last]) else np.nan)
    if not np.isfinite(end_last):
        end_last = n_volumes * tr  # unknown length: the stimulus runs to the end of the run
        warn.append("the last stimulus segment has no duration: assumed to last to the end of "
                    "the fMRI run")
    window = (offset + float(on_f[0]), offset + float(end_last))

    k = np.arange(n_volumes)
    t_k = offset + k * tr
    n_samples = int(to_sample(ephys_duration, sfreq))
    start_k = to_sample(t_k, sfreq)
    stop_k = to_sample(t_k + tr, sfreq)
    kept = (start_k >= 0) & (stop_k <= n_samples)
    if crop_to_stimulus:
        eps = 1e-9
        kept &= (t_k >= window[0] - 0.5 / sfreq - eps) & (t_k + tr <= window[1] + 0.5 / sfreq + eps)
    n_kept = int(kept.sum())
    if n_kept < 2:
        raise SambaInputError(
            f"only {n_kept} fMRI volume(s) of {n_volumes} fall within both the stimulus "
            f"({window[0]:.2f}-{window[1]:.2f} s on the EEG/MEG clock) and the EEG/MEG recording "
            f"[0, {ephys_duration:g}] s (at least 2 needed; {both})", path=where)
    first = int(np.argmax(kept))
    last_kept = first + n_kept - 1
    if n_kept < n_volumes:
        warn.append(f"{first} volume(s) before and {n_volumes - 1 - last_kept} after the "
                    f"{'stimulus' if crop_to_stimulus else 'ephys recording'} were cropped")
    t_first = float(t_k[first])
    spv = tr * sfreq
    for message in warn:
        LOGGER.warning("%s%s", f"{where}: " if where else "", message)
    return {
        "method": "stimulus_events",
        "offset_s": offset,
        "tr": tr,
        "n_volumes": n_volumes,
        "n_triggers": 0,
        "skip_triggers": 0,
        "n_extra_triggers": 0,
        "n_missing_triggers": 0,
        "first_volume": first,
        "last_volume": last_kept,
        "fmri_start": first,
        "fmri_stop": last_kept + 1,
        "n_volumes_kept": n_kept,
        "start_time_s": t_first,
        "duration_s": n_kept * tr,
        "ephys_sfreq": sfreq,
        "n_ephys_samples": n_samples,
        "ephys_start_sample": int(to_sample(t_first, sfreq)),
        "ephys_stop_sample": int(to_sample(t_first + n_kept * tr, sfreq)),
        "samples_per_volume": spv,
        "integer_samples_per_volume": bool(abs(spv - round(spv)) < 1e-6),
        "trigger_spacing_median_s": None,
        "trigger_spacing_max_deviation_s": None,
        "n_irregular_spacings": 0,
        "max_trigger_drift_s": None,
        "n_segments": len(common),
        "segments": [{"segment": str(s), "ephys_onset_s": float(a), "fmri_onset_s": float(b),
                      "residual_s": float(r)} for s, a, b, r in zip(common, on_e, on_f, residual)],
        "offset_residual_max_s": float(np.abs(residual).max()),
        "stimulus_window_s": [float(window[0]), float(window[1])],
        "crop_to_stimulus": bool(crop_to_stimulus),
        "ephys_events_file": None if ephys_events_file is None else os.fspath(ephys_events_file),
        "fmri_events_file": None if fmri_events_file is None else os.fspath(fmri_events_file),
        "warnings": warn,
    }
