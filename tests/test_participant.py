"""End-to-end participant and group levels on the demo dataset, checked against its ground truth."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from samba_pipeline.bids.derivatives import read_tsv

pytestmark = pytest.mark.slow


def checksums(root: Path, skip=("log",)) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not any(part in skip for part in path.relative_to(root).parts):
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def demo_atlas_args(bids: Path) -> list[str]:
    tpl = bids / "derivatives" / "atlases" / "tpl-MNI152NLin2009cAsym"
    images = sorted(tpl.glob("*_dseg.nii.gz"), key=lambda p: int(p.name.split("scale-")[1].split("_")[0]))
    coarse, fine = images[0], images[-1]
    return ["--ephys-atlas", str(coarse), "--fmri-atlas", str(fine)]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "samba_pipeline.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def participant_run(demo_dataset, tmp_path_factory):
    bids, truth = demo_dataset
    root = tmp_path_factory.mktemp("participant")
    out, work = root / "out", root / "work"
    before = checksums(bids)
    # The demo writes a --config-file that points at its atlases (what `make demo` uses).
    proc = run_cli(bids, out, "participant", "-w", work, "--nprocs", "2",
                   "--config-file", truth / "samba-bids-demo.toml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first_outputs = checksums(out)
    return {"bids": bids, "truth": truth, "out": out, "work": work, "proc": proc,
            "inputs_before": before, "first_outputs": first_outputs}


def test_input_dataset_untouched(participant_run):
    assert checksums(participant_run["bids"]) == participant_run["inputs_before"]


def test_expected_derivatives_and_pybids_entities(participant_run):
    from bids import BIDSLayout

    out, bids = participant_run["out"], participant_run["bids"]
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["GeneratedBy"][0]["Name"] == "samba-bids"
    assert desc["GeneratedBy"][0]["ConfigurationHash"]
    assert set(desc["DatasetLinks"]) >= {"raw", "fmriprep"}

    layout = BIDSLayout(str(bids), derivatives=[str(out)], validate=False)
    deriv = layout.derivatives[next(iter(layout.derivatives))] if hasattr(layout, "derivatives") else layout
    for subject in ("01", "02"):
        ts = deriv.get(subject=subject, stat="mean", suffix="timeseries", extension=".tsv")
        assert len(ts) == 1
        ents = ts[0].get_entities()
        assert ents["atlas"] == "DemoNested" and ents["datatype"] == "func"
        assert ents["space"] == "MNI152NLin2009cAsym" and ents["scale"]
        assert len(deriv.get(subject=subject, stat="cosine", suffix="relmat", extension=".tsv")) == 2
        assert len(deriv.get(subject=subject, desc="preproc", suffix="timeseries",
                             extension=".tsv.gz", datatype="eeg")) == 1
        assert len(deriv.get(subject=subject, suffix="alignment", extension=".json")) == 1
        assert len(deriv.get(subject=subject, suffix="windows", extension=".tsv")) == 1
        meta = ts[0].get_metadata()
        assert meta["RepetitionTime"] == pytest.approx(2.0)
        assert meta["Sources"][0].startswith("bids:fmriprep:")
    assert (out / "sourcedata" / "atlases").is_dir()
    assert list(out.glob("atlas-DemoNested_*_stat-regionmap_relmat.tsv"))


def test_derivatives_pass_the_bids_validator(participant_run):
    from samba_pipeline.bids.validate import run_validator

    result = run_validator(participant_run["out"])
    if not result.ran:
        pytest.skip(result.reason)
    assert result.ok, result.summary()


def test_alignment_offset_is_exact(participant_run):
    out, truth = participant_run["out"], participant_run["truth"]
    for subject in ("01", "02"):
        info = json.loads((truth / f"sub-{subject}" / f"sub-{subject}_task-rest_truth.json").read_text())
        align = json.loads((out / f"sub-{subject}" / f"sub-{subject}_task-rest_alignment.json").read_text())
        assert align["method"] == "triggers"
        # The triggers sit exactly on EEG samples, so the recovered offset is exact.
        assert align["offset_s"] == pytest.approx(info["offset_s"], abs=1e-9)
        assert align["n_volumes_kept"] == info["n_volumes"]


def test_series_lengths_rates_and_windows(participant_run):
    out = participant_run["out"]
    sub = out / "sub-01"
    align = json.loads((sub / "sub-01_task-rest_alignment.json").read_text())
    eeg = read_tsv(sub / "eeg" / "sub-01_task-rest_desc-preproc_timeseries.tsv.gz")
    meta = json.loads((sub / "eeg" / "sub-01_task-rest_desc-preproc_timeseries.json").read_text())
    assert meta["SamplingFrequency"] == 200.0 and meta["StartTime"] == 0.0
    assert len(eeg) == align["n_volumes_kept"] * 2.0 * 200
    fmri = read_tsv(next((sub / "func").glob("*_stat-mean_timeseries.tsv")))
    assert len(fmri) == align["n_volumes_kept"]
    windows = read_tsv(sub / "sub-01_task-rest_windows.tsv")
    duration = align["n_volumes_kept"] * 2.0
    assert (windows["label"] == "minute").sum() == int(duration // 60)
    assert (windows["label"] == "second").sum() == int(duration // 16)  # 15 s -> 8 volumes
    assert (windows["ephys_stop"] <= len(eeg)).all() and (windows["fmri_stop"] <= len(fmri)).all()


def test_bad_channel_found(participant_run):
    out, truth = participant_run["out"], participant_run["truth"]
    for subject in ("01", "02"):
        info = json.loads((truth / f"sub-{subject}" / f"sub-{subject}_task-rest_truth.json").read_text())
        eeg_dir = out / f"sub-{subject}" / "eeg"
        channels = read_tsv(eeg_dir / f"sub-{subject}_task-rest_desc-preproc_channels.tsv")
        found = set(channels.loc[channels["status"] == "bad", "name"])
        assert set(info["bad_channels"]) <= found
        assert len(found) <= len(info["bad_channels"]) + 1  # at most one false positive


def test_parcel_series_track_the_noise_free_bold(participant_run):
    """Parcel time series correlate with the simulator's noise-free parcel BOLD.

    The simulator adds voxel noise, drift, motion and scanner noise; after averaging ~10-60 voxels
    per parcel and regressing the confounds, the expected correlation is high but not perfect.
    Parcels near the brain edge lose voxels to the mask. A median above 0.6 and 80% of parcels
    above 0.3 separate a working pipeline from a broken one (wrong parcel order, lost alignment or
    a sign flip give medians near 0 or negative).
    """
    out, truth = participant_run["out"], participant_run["truth"]
    for subject in ("01", "02"):
        gt = np.load(truth / f"sub-{subject}" / f"sub-{subject}_task-rest_truth.npz")
        clean = gt["bold_clean"]
        fmri = read_tsv(next((out / f"sub-{subject}" / "func").glob("*_stat-mean_timeseries.tsv")))
        assert fmri.shape[1] == clean.shape[1]
        data = fmri.to_numpy(float)
        valid = np.isfinite(data).all(axis=0)
        assert valid.mean() > 0.8
        d = data[:, valid] - data[:, valid].mean(0)
        c = clean[:, valid] - clean[:, valid].mean(0)
        r = (d * c).sum(0) / np.sqrt((d ** 2).sum(0) * (c ** 2).sum(0))
        assert np.median(r) > 0.6, np.median(r)
        assert (r > 0.3).mean() > 0.8


def test_rerun_reuses_work_dir_and_gives_identical_outputs(participant_run):
    work = participant_run["work"]
    results = sorted(work.rglob("result_preprocess_ephys.pklz"))
    results += sorted(work.rglob("result_parcellate_bold.pklz"))
    assert len(results) == 4
    stamps = {p: p.stat().st_mtime_ns for p in results}
    bids, out = participant_run["bids"], participant_run["out"]
    proc = run_cli(bids, out, "participant", "-w", work, "--nprocs", "2", "--skip-bids-validation",
                   *demo_atlas_args(bids))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in results} == stamps  # cached nodes were not re-run
    assert checksums(out) == participant_run["first_outputs"]


def test_group_level_summarises_runs(participant_run):
    bids, out, work = participant_run["bids"], participant_run["out"], participant_run["work"]
    proc = run_cli(bids, out, "group", "-w", work, "--skip-bids-validation", "--model", "none",
                   *demo_atlas_args(bids))
    assert proc.returncode == 0, proc.stderr[-3000:]
    qc = read_tsv(out / "group" / "desc-qc_runs.tsv")
    assert sorted(qc["subject"].astype(str).str.zfill(2)) == ["01", "02"]
    assert (qc["alignment_method"] == "triggers").all()
    means = sorted((out / "group").glob("*_desc-*roupmean_stat-cosine_relmat.tsv"))
    assert [m.name.split("_desc-")[1].split("_")[0] for m in means] == ["preprocGroupmean", "groupmean"]
    assert not list((out / "group").glob("model-*"))  # --model none: nothing trained
    table = read_tsv(means[0]).set_index("Node")
    values = table.to_numpy(float)
    assert np.allclose(values, values.T, equal_nan=True)


def test_changed_configuration_refuses_same_output(participant_run, tmp_path):
    bids, out = participant_run["bids"], participant_run["out"]
    proc = run_cli(bids, out, "participant", "-w", tmp_path / "w", "-p", "24P",
                   "--skip-bids-validation", *demo_atlas_args(bids))
    assert proc.returncode == 73
    assert "another configuration" in proc.stderr


def test_killed_run_resumes_without_recomputing_and_gives_identical_outputs(participant_run, tmp_path):
    """kill -9 the participant level once a node has finished; the same command with the same -w
    reuses the finished nodes and writes byte-identical derivatives to an uninterrupted run."""
    import os
    import signal
    import time

    bids, truth = participant_run["bids"], participant_run["truth"]
    out, work = tmp_path / "out", tmp_path / "work"
    args = [sys.executable, "-m", "samba_pipeline.cli", bids, out, "participant", "-w", work, "--nprocs", "2",
            "--config-file", truth / "samba-bids-demo.toml"]
    proc = subprocess.Popen(list(map(str, args)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if list(work.rglob("result_parcellate_bold.pklz")):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"no finished parcellate_bold node before the run ended (exit {proc.poll()})")
        time.sleep(0.5)  # let the node's result file be written completely
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    finished = {p: p.stat().st_mtime_ns for p in work.rglob("result_*.pklz")}
    assert finished
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # nothing half-written
    rerun = run_cli(bids, out, "participant", "-w", work, "--nprocs", "2", "--config-file",
                    truth / "samba-bids-demo.toml")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # finished nodes not recomputed

    def comparable(root: Path, names) -> dict[str, str]:
        """Byte checksums, leaving out the run-specific parts: logs, the workflow graph, and the
        report figures (matplotlib embeds ids in SVGs)."""
        out = {}
        for name in names:
            if name.endswith((".dot", ".html", ".svg", ".png")) or "figures" in name:
                continue
            data = (root / name).read_bytes()
            out[name] = hashlib.sha256(data).hexdigest()
        return out

    reference = comparable(participant_run["out"], participant_run["first_outputs"])
    resumed = comparable(out, checksums(out))
    assert sorted(resumed) == sorted(reference)
    assert [k for k in reference if resumed[k] != reference[k]] == []
