"""Pairing EEG/MEG recordings with fMRI runs, and the raw-BOLD fallback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from samba_pipeline.bids.layout import collect_pairs
from samba_pipeline.cli.parser import parse_args
from samba_pipeline.errors import SambaMissingInputError, SambaNoMatchError


@pytest.fixture
def demo_copy(demo_dataset, tmp_path):
    src, truth = demo_dataset
    bids = tmp_path / "bids"
    shutil.copytree(src, bids)
    return bids, truth


def _settings(bids: Path, tmp_path: Path, *extra: str):
    return parse_args([str(bids), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"),
                       "--skip-bids-validation", *extra])


def test_pairs_found_and_unpaired_runs_reported(demo_copy, tmp_path):
    bids, _ = demo_copy
    eeg = bids / "sub-01" / "eeg"
    # An EEG recording of another task, with no fMRI run: reported as skipped, not guessed.
    for path in list(eeg.glob("sub-01_task-rest_eeg.*")):
        shutil.copy(path, eeg / path.name.replace("task-rest", "task-nback"))
    report = collect_pairs(_settings(bids, tmp_path))
    assert [p.name for p in report.pairs] == ["sub-01_task-rest", "sub-02_task-rest"]
    pair = report.pairs[0]
    assert pair.ephys_file.endswith("sub-01_task-rest_eeg.vhdr")
    assert "desc-preproc_bold" in pair.bold_file and pair.bold_source == "fmriprep"
    assert pair.confounds_file.endswith("desc-confounds_timeseries.tsv")
    assert pair.mask_file.endswith("desc-brain_mask.nii.gz")
    assert any("sub-01_task-nback_eeg.vhdr" in s and "no fMRI run" in s for s in report.skipped)
    assert "skipped" in report.summary()


def test_filters_select_and_reject(demo_copy, tmp_path):
    bids, _ = demo_copy
    report = collect_pairs(_settings(bids, tmp_path, "--participant-label", "02"))
    assert [p.subject for p in report.pairs] == ["02"]
    with pytest.raises(SambaNoMatchError):
        collect_pairs(_settings(bids, tmp_path, "-t", "nback"))
    flt = tmp_path / "filter.json"
    flt.write_text(json.dumps({"bold": {"space": "MNI152NLin6Asym"}}))
    with pytest.raises(SambaNoMatchError, match="no preprocessed BOLD"):
        collect_pairs(_settings(bids, tmp_path, "--bids-filter-file", str(flt)))


def test_without_fmriprep_needs_the_raw_bold_flag(demo_copy, tmp_path):
    bids, _ = demo_copy
    shutil.rmtree(bids / "derivatives" / "fmriprep")
    with pytest.raises(SambaMissingInputError, match="--use-raw-bold"):
        collect_pairs(_settings(bids, tmp_path))
    report = collect_pairs(_settings(bids, tmp_path, "--use-raw-bold"))
    assert all(p.bold_source == "raw" and p.confounds_file is None for p in report.pairs)


@pytest.mark.slow
def test_raw_bold_run_says_so_in_outputs(demo_copy, tmp_path):
    bids, truth = demo_copy
    shutil.rmtree(bids / "derivatives" / "fmriprep")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "samba_pipeline.cli", str(bids), str(out), "participant",
         "--participant-label", "01", "--use-raw-bold", "--skip-bids-validation",
         "-w", str(tmp_path / "work"), "--config-file", str(truth / "samba-bids-demo.toml")],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sidecar = next((out / "sub-01" / "func").glob("*_stat-mean_timeseries.json"))
    meta = json.loads(sidecar.read_text())
    assert "raw BOLD" in meta["BoldSource"] and "no fMRIPrep" in meta["BoldSource"]
    assert meta["Sources"][0].startswith("bids:raw:sub-01/func/")
    assert meta["Confounds"]["strategy"] == "none"


def test_inspect_pair_reads_timing_and_estimates_memory(demo_copy, tmp_path):
    from samba_pipeline.cli.participant import inspect_pair

    bids, truth = demo_copy
    settings = _settings(bids, tmp_path)
    report = collect_pairs(settings)
    facts = inspect_pair(report.pairs[0], report.layout, settings.workflow.volume_trigger)
    info = json.loads((truth / "sub-01" / "sub-01_task-rest_truth.json").read_text())
    assert facts["tr"] == 2.0 and facts["n_volumes"] == info["n_volumes"]
    import nibabel as nb

    shape = nb.load(report.pairs[0].bold_file).shape
    # Memory is declared from the data size (the streamed BOLD's labelled voxels, plus overhead).
    assert facts["bold_mem_gb"] >= 0.3 + 0.75 * 4 * shape[0] * shape[1] * shape[2] * shape[3] / 1e9 - 0.01
    assert facts["ephys_mem_gb"] >= 0.5
