"""Finding and reading EEG/MEG recordings in a BIDS dataset (through MNE-BIDS).

Pure functions, no Nipype. Every problem a user's data can cause is reported as a
:class:`~samba_pipeline.errors.SambaInputError` or
:class:`~samba_pipeline.errors.SambaMissingInputError` that names the offending file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import mne
import mne_bids
import numpy as np
import pandas as pd
from mne_bids.config import ALLOWED_DATATYPE_EXTENSIONS

from samba_pipeline.errors import (
    SambaInputError,
    SambaMissingInputError,
    SambaUsageError,
)

LOGGER = logging.getLogger(__name__)

#: Data types this module reads.
EPHYS_DATATYPES = ("eeg", "meg")

#: Extensions that hold the recording itself (not sidecars, not BrainVision's .vmrk/.eeg, not
#: EEGLAB's .fdt), per data type, as MNE-BIDS knows them.
DATA_EXTENSIONS = {dt: tuple(ALLOWED_DATATYPE_EXTENSIONS[dt]) for dt in EPHYS_DATATYPES}

# Relative tolerance when the sidecar's SamplingFrequency is compared with the file's.
_SFREQ_RTOL = 1e-4
_SFREQ_ATOL = 1e-2


def _strip_prefix(label: str | None, prefix: str) -> str | None:
    if label is None:
        return None
    return str(label).removeprefix(prefix)


def find_ephys_files(
    bids_root: str | os.PathLike,
    subject: str,
    session: str | None = None,
    task: str | None = None,
    datatypes: Sequence[str] = EPHYS_DATATYPES,
) -> list[mne_bids.BIDSPath]:
    """List the EEG/MEG recordings of one subject.

    Parameters
    ----------
    bids_root
        Root of the BIDS raw dataset.
    subject, session, task
        Entity labels, with or without their ``sub-``/``ses-``/``task-`` prefix. ``None``
        (session, task) matches any value, including recordings without that entity.
    datatypes
        Any of ``"eeg"`` and ``"meg"``.

    Returns
    -------
    list of mne_bids.BIDSPath
        One path per recording (the data file, never a sidecar; for split FIF recordings the
        first split only), sorted by file name. Empty if nothing matches.
    """
    root = Path(bids_root)
    if not root.is_dir():
        raise SambaMissingInputError("BIDS dataset folder not found", path=root)
    if isinstance(datatypes, str):
        datatypes = (datatypes,)
    unknown = sorted(set(datatypes) - set(EPHYS_DATATYPES))
    if unknown:
        raise SambaUsageError(
            f"unsupported ephys data type(s) {unknown}; choose from {list(EPHYS_DATATYPES)}"
        )
    subject = _strip_prefix(subject, "sub-")
    session = _strip_prefix(session, "ses-")
    task = _strip_prefix(task, "task-")

    found: dict[str, mne_bids.BIDSPath] = {}
    for datatype in datatypes:
        paths = mne_bids.find_matching_paths(
            root,
            subjects=subject,
            sessions=session,
            tasks=task,
            datatypes=datatype,
            suffixes=datatype,
            extensions=list(DATA_EXTENSIONS[datatype]),
            ignore_json=True,
        )
        for bp in paths:
            if bp.split is not None and str(bp.split).lstrip("0") != "1":
                continue  # MNE reads the later splits of a FIF recording from the first one
            found[str(bp.fpath)] = bp
    return [found[key] for key in sorted(found)]


def _sidecar_json(bids_path: mne_bids.BIDSPath) -> Path | None:
    suffix = bids_path.suffix or bids_path.datatype
    try:
        sidecar = bids_path.find_matching_sidecar(
            suffix=suffix, extension=".json", on_error="ignore"
        )
    except (RuntimeError, OSError, ValueError):  # ambiguous sidecars: not fatal here
        return None
    return None if sidecar is None else Path(sidecar)


def _check_sidecar_sfreq(raw: mne.io.BaseRaw, bids_path: mne_bids.BIDSPath) -> None:
    sidecar = _sidecar_json(bids_path)
    if sidecar is None or not sidecar.is_file():
        LOGGER.warning("%s: no JSON sidecar found; sampling frequency not cross-checked",
                       bids_path.fpath)
        return
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as err:
        raise SambaInputError(f"cannot parse JSON sidecar ({err})", path=sidecar) from None
    value = meta.get("SamplingFrequency") if isinstance(meta, dict) else None
    if value is None:
        LOGGER.warning("%s: sidecar has no SamplingFrequency (REQUIRED by BIDS)", sidecar)
        return
    try:
        side_sfreq = float(value)
    except (TypeError, ValueError):
        raise SambaInputError(
            f"SamplingFrequency {value!r} is not a number", path=sidecar
        ) from None
    file_sfreq = float(raw.info["sfreq"])
    if not np.isclose(side_sfreq, file_sfreq, rtol=_SFREQ_RTOL, atol=_SFREQ_ATOL):
        raise SambaInputError(
            f"SamplingFrequency {side_sfreq:g} Hz in the sidecar disagrees with "
            f"{file_sfreq:g} Hz in the data file {Path(bids_path.fpath).name}",
            path=sidecar,
        )


def read_ephys(bids_path: mne_bids.BIDSPath) -> mne.io.BaseRaw:
    """Read one EEG/MEG recording through :func:`mne_bids.read_raw_bids`, preloaded.

    ``channels.tsv`` (types, status -> ``info['bads']``), ``events.tsv`` (-> annotations),
    electrode positions and ``PowerLineFrequency`` (-> ``info['line_freq']``) are applied by
    MNE-BIDS. Warnings MNE-BIDS raises while reading are passed to this module's logger.

    Raises
    ------
    SambaMissingInputError
        The data file does not exist.
    SambaInputError
        The file cannot be read, holds no EEG/MEG channels, or its sampling frequency disagrees
        with the sidecar JSON's ``SamplingFrequency``.
    """
    if not isinstance(bids_path, mne_bids.BIDSPath):
        raise TypeError(f"bids_path must be an mne_bids.BIDSPath, not {type(bids_path)}")
    if bids_path.root is None:
        raise SambaUsageError(f"BIDSPath {bids_path.basename} has no root set")
    fpath = Path(bids_path.fpath)
    if not fpath.exists():
        raise SambaMissingInputError("EEG/MEG data file not found", path=fpath)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            raw = mne_bids.read_raw_bids(bids_path, verbose=False)
            raw.load_data(verbose=False)
        except MemoryError:
            raise
        except SambaInputError:
            raise
        except Exception as err:  # any reader failure is a data problem
            msg = " ".join(str(err).split()) or type(err).__name__
            raise SambaInputError(
                f"cannot read EEG/MEG recording ({type(err).__name__}: {msg[:300]})",
                path=fpath,
            ) from err
    for item in caught:
        # participants.tsv columns mne-bids does not map into info (e.g. BIDS 'handedness')
        # are harmless for samba-bids.
        relevant = issubclass(item.category, (RuntimeWarning, UserWarning)) and not str(
            item.message).startswith("Unable to map the following column")
        level = logging.WARNING if relevant else logging.DEBUG
        LOGGER.log(level, "%s: %s", fpath.name, " ".join(str(item.message).split()))

    data_picks = mne.pick_types(raw.info, meg=True, eeg=True, ref_meg=False, exclude=[])
    if len(data_picks) == 0:
        types = sorted(set(raw.get_channel_types()))
        raise SambaInputError(
            f"no EEG or MEG channels in the recording (channel types found: {types})",
            path=fpath,
        )
    _check_sidecar_sfreq(raw, bids_path)
    return raw


def events_path(ephys_file) -> Path:
    """The BIDS ``*_events.tsv`` beside an EEG/MEG recording."""
    return Path(re.sub(r"_(eeg|meg)\.[a-z]+$", "_events.tsv", str(ephys_file)))


def read_bids_events(ephys_file) -> pd.DataFrame | None:
    """The recording's events.tsv as ``onset`` (s from the first sample) and ``description``.

    ``description`` is ``trial_type`` (or ``value``). None when there is no events.tsv; an
    unreadable table, or one without those columns, is a :class:`SambaInputError`.
    """
    path = events_path(ephys_file)
    if not path.is_file() or path == Path(ephys_file):
        return None
    try:
        table = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SambaInputError(f"events table is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                              "BIDS text files must be UTF-8", path=path) from None
    except Exception as exc:  # pandas' parser errors have many types
        raise SambaInputError(f"cannot read the events table: {exc}", path=path) from None
    column = next((c for c in ("trial_type", "value", "description") if c in table.columns), None)
    if "onset" not in table.columns or column is None:
        raise SambaInputError("events table needs 'onset' and 'trial_type' (or 'value') columns",
                              path=path)
    return pd.DataFrame({"onset": table["onset"].astype(float),
                         "description": table[column].astype(str)})


def events_from_raw(raw: mne.io.BaseRaw) -> tuple[np.ndarray, np.ndarray]:
    """Annotations of ``raw`` as (onsets in seconds, descriptions).

    Onsets are relative to the first sample of ``raw``: an annotation at sample ``k`` (counted
    from the first sample that ``raw`` holds) has onset ``k / sfreq``, whatever ``first_samp``
    and ``meas_date`` are. Sorted by onset (stable).
    """
    annotations = raw.annotations
    if len(annotations) == 0:
        return np.zeros(0, dtype=float), np.zeros(0, dtype=object)
    # MNE keeps raw.annotations.orig_time == raw.info["meas_date"]; onsets are then measured
    # from orig_time (or, with no meas_date, from first_samp == 0), so the offset to remove is
    # raw.first_time (first_samp / sfreq) in both cases.
    onsets = np.asarray(annotations.onset, dtype=float) - float(raw.first_time)
    descriptions = np.asarray(annotations.description, dtype=object)
    order = np.argsort(onsets, kind="stable")
    return onsets[order], descriptions[order]

