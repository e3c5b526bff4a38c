"""EEG/MEG steps as pure functions (MNE, MNE-BIDS); no Nipype here."""

from samba_pipeline.ephys.preprocess import (
    EphysSettings,
    detect_bad_channels,
    ephys_timeseries,
    estimate_ephys_mem_gb,
    preprocess_raw,
)
from samba_pipeline.ephys.read import events_from_raw, find_ephys_files, read_ephys

__all__ = [
    "EphysSettings",
    "detect_bad_channels",
    "ephys_timeseries",
    "estimate_ephys_mem_gb",
    "events_from_raw",
    "find_ephys_files",
    "preprocess_raw",
    "read_ephys",
]
