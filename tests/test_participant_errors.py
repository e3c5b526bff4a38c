"""Bad input to the participant level: one clear error naming the file, nothing half-written.

Each case copies the demo dataset, breaks one thing, runs ``samba-bids`` as a user would (a
subprocess, default verbosity) and checks the exit code, that the last line of the output names
the file and the problem, that no traceback is printed, that no temporary or partial output
files are left and that the input dataset is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow

FMRIPREP_FUNC = "derivatives/fmriprep/sub-01/func"
PREPROC = f"{FMRIPREP_FUNC}/sub-01_task-rest_space-MNI152NLin2009cAsym_desc-preproc_bold"


def _drop_repetition_time(bids: Path) -> str:
    for sidecar in (bids / f"{PREPROC}.json", bids / "sub-01/func/sub-01_task-rest_bold.json"):
        meta = json.loads(sidecar.read_text())
        meta.pop("RepetitionTime", None)
        sidecar.write_text(json.dumps(meta))
    return "sub-01_task-rest_space-MNI152NLin2009cAsym_desc-preproc_bold.json"


def _drop_triggers(bids: Path) -> str:
    events = bids / "sub-01/eeg/sub-01_task-rest_events.tsv"
    table = pd.read_csv(events, sep="\t")
    table[table["trial_type"] != "R128"].to_csv(events, sep="\t", index=False, na_rep="n/a")
    return "sub-01_task-rest_events.tsv"


def _no_overlap(bids: Path) -> str:
    events = bids / "sub-01/eeg/sub-01_task-rest_events.tsv"
    table = pd.read_csv(events, sep="\t")
    # Triggers claimed an hour after the EEG ends: the recordings share no time at all.
    table["onset"] = table["onset"] + 3600.0
    table.to_csv(events, sep="\t", index=False, na_rep="n/a")
    return "sub-01_task-rest_eeg.vhdr"


def _atlas_outside(bids: Path) -> str:
    fine = sorted((bids / "derivatives/atlases/tpl-MNI152NLin2009cAsym").glob("*_dseg.nii.gz"),
                  key=lambda p: int(p.name.split("scale-")[1].split("_")[0]))[-1]
    img = nb.load(fine)
    affine = img.affine.copy()
    affine[:3, 3] += 400.0  # 40 cm away from the brain
    nb.Nifti1Image(np.asanyarray(img.dataobj), affine, img.header).to_filename(fine)
    return fine.name


def _nan_in_bold(bids: Path) -> str:
    path = bids / f"{PREPROC}.nii.gz"
    img = nb.load(path)
    data = np.asanyarray(img.dataobj).astype(np.float32)
    data[10:12, 10:12, 10:12, 5] = np.nan
    nb.Nifti1Image(data, img.affine, img.header).to_filename(path)
    return "sub-01_task-rest_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz"


def _short_confounds(bids: Path) -> str:
    path = bids / f"{FMRIPREP_FUNC}/sub-01_task-rest_desc-confounds_timeseries.tsv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-5]) + "\n")
    return "sub-01_task-rest_desc-confounds_timeseries.tsv"


CASES = {
    "bold_without_repetition_time": (_drop_repetition_time, 65, "RepetitionTime"),
    "eeg_without_volume_triggers": (_drop_triggers, 65, "no scanner volume triggers"),
    "eeg_and_fmri_do_not_overlap": (_no_overlap, 65, "do not overlap in time"),
    "atlas_outside_bold_field_of_view": (_atlas_outside, 65, "bounding boxes overlap by only"),
    "nan_in_bold": (_nan_in_bold, 65, "NaN"),
    "confounds_with_fewer_rows": (_short_confounds, 65, "rows"),
}


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_one_clear_error(case, demo_dataset, tmp_path):
    breaker, code, problem = CASES[case]
    src, _ = demo_dataset
    bids = tmp_path / "bids"
    shutil.copytree(src, bids)
    names_file = breaker(bids)
    before = _digest(bids)
    tpl = bids / "derivatives/atlases/tpl-MNI152NLin2009cAsym"
    images = sorted(tpl.glob("*_dseg.nii.gz"), key=lambda p: int(p.name.split("scale-")[1].split("_")[0]))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "samba_pipeline.cli", str(bids), str(out), "participant",
         "--participant-label", "01", "--skip-bids-validation", "-w", str(tmp_path / "work"),
         "--nprocs", "1", "--ephys-atlas", str(images[0]), "--fmri-atlas", str(images[-1])],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == code, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert problem in last, last
    assert names_file in last, last
    assert "Traceback" not in proc.stderr
    assert _digest(bids) == before  # the input dataset is never modified
    if out.exists():
        leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp")]
        assert not leftovers
        assert not list(out.glob("sub-01/func/*_timeseries.tsv"))  # no results for a failed run
