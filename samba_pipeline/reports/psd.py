"""Power spectra of an EEG/MEG recording before and after preprocessing (for the report).

:func:`psd_summary` computes Welch spectra of the data channels of the raw recording and of the
preprocessed one; :func:`save_psd_summary` stores them in a small ``.npz`` that the report reads
(``PreprocessEphys`` writes it into its node folder, so the report never re-reads the raw file).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import signal

#: Longest stretch (s) of the recording the spectra are averaged over (from its middle).
MAX_SECONDS = 600.0
#: Welch segment length (s): 0.5 Hz resolution.
SEGMENT_S = 2.0
#: Highest frequency stored (Hz).
FMAX = 250.0


def _data_picks(raw, ch_types: Sequence[str]) -> np.ndarray:
    import mne

    types = set(ch_types)
    if "meg" in types or {"mag", "grad"} <= types:
        meg: bool | str = True
    else:
        meg = "mag" if "mag" in types else "grad" if "grad" in types else False
    return mne.pick_types(raw.info, meg=meg, eeg="eeg" in types, exclude=())


def welch(raw, ch_types: Sequence[str]) -> dict[str, Any]:
    """Welch power spectral density (unit**2/Hz) of the data channels, ``[n_channels, n_freqs]``."""
    picks = _data_picks(raw, ch_types)
    sfreq = float(raw.info["sfreq"])
    n = raw.n_times
    keep = min(n, int(MAX_SECONDS * sfreq))
    start = (n - keep) // 2
    data = raw.get_data(picks=picks, start=start, stop=start + keep)
    nperseg = min(keep, max(8, int(round(SEGMENT_S * sfreq))))
    freqs, psd = signal.welch(data, fs=sfreq, nperseg=nperseg, axis=-1)
    sel = freqs <= min(FMAX, sfreq / 2)
    return {
        "freqs": freqs[sel].astype(np.float32),
        "psd": psd[:, sel].astype(np.float32),
        "names": np.array([raw.ch_names[i] for i in picks]),
        "sfreq": sfreq,
        "types": np.array(raw.get_channel_types(picks=picks)),
    }


def psd_summary(raw_before, raw_after, ch_types: Sequence[str]) -> dict[str, Any]:
    """Spectra of the raw and the preprocessed recording, with the bad channels found."""
    before, after = welch(raw_before, ch_types), welch(raw_after, ch_types)
    out = {f"before_{k}": v for k, v in before.items()}
    out.update({f"after_{k}": v for k, v in after.items()})
    out["bads_before"] = np.array(list(raw_before.info["bads"]), dtype=str)
    return out


def save_psd_summary(raw_before, raw_after, ch_types: Sequence[str], path) -> str:
    """Write :func:`psd_summary` as a compressed ``.npz`` (atomically); returns its path."""
    from samba_pipeline.bids.derivatives import write_bytes

    buf = io.BytesIO()
    np.savez_compressed(buf, **psd_summary(raw_before, raw_after, ch_types))
    return str(write_bytes(Path(path), buf.getvalue()))


def load_psd_summary(path) -> dict[str, Any]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


__all__ = ["load_psd_summary", "psd_summary", "save_psd_summary", "welch"]
