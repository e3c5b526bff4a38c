"""Withhold the fMRI of demo subjects: EEG-only subjects for trying a trained model on.

``withhold_fmri(bids_root, truth_dir, ["04"])`` moves sub-04's raw BOLD and its fMRIPrep-like
derivatives into ``truth_dir/sub-04/withheld/`` (keeping their relative paths) and drops them
from ``sub-04_scans.tsv``, so the dataset stays valid BIDS with EEG only for that subject, while
the noise-free truth (``sub-04_task-rest_truth.npz``) still holds the BOLD the model should
predict.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable

import pandas as pd

from samba_pipeline.errors import SambaUsageError


def withhold_fmri(bids_root, truth_dir, subjects: Iterable[str]) -> list[Path]:
    """Move the listed subjects' fMRI out of the dataset (see the module docstring)."""
    bids_root, truth_dir = Path(bids_root), Path(truth_dir)
    moved = []
    for label in subjects:
        label = str(label).removeprefix("sub-")
        if not (bids_root / f"sub-{label}").is_dir():
            raise SambaUsageError(f"no subject sub-{label} in the demo dataset", path=bids_root)
        keep = truth_dir / f"sub-{label}" / "withheld"
        sub_dir = bids_root / f"sub-{label}"
        for folder in (sub_dir / "func", *sorted(sub_dir.glob("ses-*/func")),
                       bids_root / "derivatives" / "fmriprep" / f"sub-{label}"):
            if folder.is_dir():
                dest = keep / folder.relative_to(bids_root)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(folder), str(dest))
                moved.append(dest)
        for scans in sorted(sub_dir.glob("**/sub-*_scans.tsv")):
            table = pd.read_csv(scans, sep="\t", dtype=str)
            table = table[~table["filename"].str.startswith("func/")]
            table.to_csv(scans, sep="\t", index=False)
    return moved


__all__ = ["withhold_fmri"]
