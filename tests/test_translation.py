"""Training and inference inside the pipeline: group level, --model-file, resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from samba_pipeline.bids.derivatives import read_tsv
from samba_pipeline.errors import SambaInputError
from samba_pipeline.training import load_checkpoint, make_datasets, make_dims, split_by_time_and_subject
from samba_pipeline.training.pipeline import paint_parcels, predict_series, score_run, write_run_prediction
from samba_pipeline.training.splits import check_split, withheld_sets

from test_training import PoolLinear, synthetic_runs  # noqa: E402  (tests/ is on sys.path)


def _cli(*args, timeout=900, **kwargs):
    return subprocess.run([sys.executable, "-m", "samba_pipeline.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, **kwargs)


# ---------------------------------------------------------------------------------------------
# Units
# ---------------------------------------------------------------------------------------------
def test_time_and_subject_split_keeps_test_subject_out_of_training():
    runs = synthetic_runs(3, minutes=6.0, tr=1.0, sfreq=8.0)
    split = split_by_time_and_subject(runs, ["03"], window_s=20.0, gap_s=30.0)
    check_split(split, runs)
    parts = {(runs[s.run].subject, s.part) for s in split.segments}
    assert ("03", "test") in parts and ("03", "train") not in parts and ("03", "val") not in parts
    assert {("01", "train"), ("01", "val"), ("01", "test"), ("02", "test")} <= parts
    sets = withheld_sets(runs, split, ["03"])
    assert {runs[s.run].subject for s in sets["withheld_subjects"]} == {"03"}
    assert {runs[s.run].subject for s in sets["withheld_windows"]} == {"01", "02"}
    with pytest.raises(Exception, match="none is left"):
        split_by_time_and_subject(runs, ["01", "02", "03"], window_s=20.0)


def test_painted_nifti_matches_nilearn_parcel_means(tmp_path):
    """Painting parcel series onto the atlas grid, then averaging with nilearn, returns them."""
    from nilearn.maskers import NiftiLabelsMasker

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=(6, 7, 5)).astype(np.int16)
    labels[0, 0, 0] = 4
    atlas = tmp_path / "atlas.nii.gz"
    nib.save(nib.Nifti1Image(labels, np.diag([3.0, 3.0, 3.0, 1.0])), atlas)
    table = tmp_path / "atlas.tsv"
    pd.DataFrame({"index": [1, 2, 3, 4], "name": ["A", "B", "C", "D"]}).to_csv(table, sep="\t", index=False)
    names = ["C", "A", "D", "B"]  # model order differs from the atlas order
    values = rng.standard_normal((4, 11)).astype(np.float32)
    out = paint_parcels(values, names, atlas, table, tmp_path / "pred.nii.gz", tr=2.0)
    img = nib.load(out)
    assert img.shape == (6, 7, 5, 11) and img.header.get_zooms()[3] == pytest.approx(2.0)
    masker = NiftiLabelsMasker(str(atlas), strategy="mean").fit()
    means = masker.transform(img)  # [time, labels 1..4]
    order = {"A": 0, "B": 1, "C": 2, "D": 3}
    for row, name in enumerate(names):
        np.testing.assert_allclose(means[:, order[name]], values[row], atol=1e-6)
    assert np.all(np.asarray(img.dataobj)[labels == 0] == 0)
    with pytest.raises(SambaInputError, match="not in the atlas table"):
        paint_parcels(values, ["A", "B", "C", "Z"], atlas, table, tmp_path / "bad.nii.gz", tr=2.0)


def _small_model(dropout=0.3):
    runs = synthetic_runs(2, minutes=4.0, tr=1.0, sfreq=8.0)
    dims = make_dims(runs, window_s=20.0)
    torch.manual_seed(0)
    from samba_pipeline.models.samba.ele2hemo import SambaEphys2Fmri

    net = SambaEphys2Fmri.build({"hidden_size": 8, "lstm_hidden": 8, "heads": 1, "dropout": dropout}, dims)
    return net, runs


def test_mc_dropout_gives_spread_and_is_seeded():
    net, runs = _small_model()
    source = runs[0].source
    det, no_std = predict_series(net, source)
    assert no_std is None and det.shape == (runs[0].target.shape[0], runs[0].n_volumes)
    mean, std = predict_series(net, source, mc_dropout=8, seed=3)
    again, std2 = predict_series(net, source, mc_dropout=8, seed=3)
    np.testing.assert_array_equal(mean, again)
    np.testing.assert_array_equal(std, std2)
    assert std.shape == mean.shape and np.all(std >= 0) and std.mean() > 1e-4
    assert not net.training  # back in evaluation mode
    # Deterministic prediction unchanged by the sampling (dropout switched off again).
    np.testing.assert_array_equal(predict_series(net, source)[0], det)
    net0, _ = _small_model(dropout=0.0)
    with pytest.raises(Exception, match="needs a model with dropout"):
        predict_series(net0, source, mc_dropout=4)


def test_run_prediction_refuses_missing_channels(tmp_path):
    net, runs = _small_model()
    names = list(net.dims.source_names)
    src = pd.DataFrame(runs[0].source.T, columns=names).drop(columns=names[:2])
    path = tmp_path / "source.tsv"
    src.to_csv(path, sep="\t", index=False)
    card = {"PluginVersion": "1"}
    with pytest.raises(SambaInputError, match="2 are missing") as err:
        write_run_prediction(net, card, tmp_path / "stage", source_file=path, entities={"subject": "01"},
                             model_name="samba")
    assert str(err.value.path) == str(path)


def test_score_run_uses_valid_parcels_only():
    rng = np.random.default_rng(1)
    target = rng.standard_normal((3, 120))
    pred = target + 0.1 * rng.standard_normal((3, 120))
    target[1] = np.nan  # a parcel below the coverage threshold
    summary, per_node = score_run(pred, target, 0.5, ["a", "b", "c"])
    assert summary["n_valid_nodes"] == 2 and summary["pearson_minute"] > 0.95
    assert np.isnan(per_node.loc[1, "pearson_minute"])


# ---------------------------------------------------------------------------------------------
# The pipeline: 3 subjects train, a 4th (EEG only) gets a prediction
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """4-subject, 4-minute demo with sub-04's fMRI withheld; participant + group levels run."""
    root = tmp_path_factory.mktemp("translation")
    bids, truth = root / "bids", root / "truth"
    proc = subprocess.run([sys.executable, "-m", "samba_pipeline.cli.demo", str(bids), "--subjects", "4",
                           "--minutes", "4", "--seed", "11", "--truth-dir", str(truth), "--eeg-only", "04",
                           "-q"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out, work = root / "out", root / "work"
    common = ["-w", work, "--config-file", truth / "samba-bids-demo.toml", "--skip-bids-validation",
              "--nprocs", "2"]
    proc = _cli(bids, out, "participant", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _cli(bids, out, "group", *common, "--epochs", "25", "--learning-rate", "0.003",
                "--train-window", "30", "--mc-dropout", "4", "--test-subjects", "03")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"bids": bids, "truth": truth, "out": out, "work": work, "common": common}


STEM = "model-samba_direction-ephys2fmri"


def test_group_level_writes_model_metrics_and_predictions(trained):
    out = trained["out"]
    group = out / "group"
    card = json.loads((group / f"{STEM}_model.json").read_text())
    assert card["Plugin"] == "samba" and card["Dims"]["direction"] == "ephys2fmri"
    meta = card["Metadata"]
    assert meta["WithheldSubjects"] == ["03"] and meta["Subjects"] == ["01", "02", "03"]
    for key in ("Normalizer", "PackageVersions", "TrainSettings", "ModelSettings", "EphysPreprocessing",
                "RepetitionTime", "EphysSamplingFrequency", "Seed", "Metrics"):
        assert key in meta, key
    assert {"torch", "numpy", "mne", "nipype", "samba-bids"} <= set(meta["PackageVersions"])
    assert (group / f"{STEM}_model.safetensors").stat().st_size > 1000

    metrics = read_tsv(group / f"{STEM}_metrics.tsv")
    assert set(metrics["test_set"]) == {"withheld_windows", "withheld_subjects"}
    assert {"samba", "baseline:mean", "baseline:persistence"} <= set(metrics["predictor"])
    assert np.isfinite(metrics.loc[metrics.predictor == "samba", "spearman_second"]).all()
    for desc in ("withheldWindows", "withheldSubjects"):
        nodes = read_tsv(group / f"{STEM}_desc-{desc}_metrics.tsv")
        assert len(nodes) == card["Dims"]["n_target"]
    history = read_tsv(group / f"{STEM}_history.tsv")
    assert len(history) >= 1 and np.isfinite(history["train_loss"]).all()
    hrf = read_tsv(group / f"{STEM}_desc-hrfParameters_interpretation.tsv")
    assert len(hrf) == card["Dims"]["n_source"]
    wav = read_tsv(group / f"{STEM}_desc-waveletAttention_interpretation.tsv")
    assert np.isclose(wav["weight"].sum(), 1.0, atol=1e-3)
    runs = read_tsv(group / f"{STEM}_desc-runs_metrics.tsv")
    assert list(runs["role"]) == ["training subject", "training subject", "withheld subject"]

    for sub in ("01", "02", "03"):
        func = out / f"sub-{sub}" / "func"
        stem = f"sub-{sub}_task-rest_space-MNI152NLin2009cAsym_atlas-DemoNested_scale-50_desc-samba"
        pred = read_tsv(func / f"{stem}_stat-mean_predicted.tsv")
        std = read_tsv(func / f"{stem}_stat-std_predicted.tsv")
        assert pred.shape == std.shape and (std.to_numpy() >= 0).all()
        img = nib.load(func / f"{stem}_stat-mean_predicted.nii.gz")
        assert img.shape[3] == len(pred)
        run_metrics = json.loads((func / f"{stem}_metrics.json").read_text())
        assert run_metrics["IncludesTrainingData"] == (sub != "03")

    # pybids indexes the outputs with samba-bids' naming rules.
    from bids import BIDSLayout

    layout = BIDSLayout(out, validate=False, config=["bids", "derivatives", str(out / "layout_config.json")])
    found = layout.get(suffix="predicted", extension=".nii.gz", desc="samba")
    assert sorted(f.entities["subject"] for f in found) == ["01", "02", "03"]


def test_model_file_predicts_an_eeg_only_subject(trained):
    out = trained["out"]
    proc = _cli(trained["bids"], out, "participant", *trained["common"], "--participant-label", "04",
                "--model-file", out / "group" / f"{STEM}_model.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    func = out / "sub-04" / "func"
    stem = ("sub-04_task-rest_space-MNI152NLin2009cAsym_atlas-DemoNested_scale-50_desc-samba"
            "_stat-mean_predicted")
    meta = json.loads((func / f"{stem}.json").read_text())
    assert meta["Alignment"].startswith("first scanner volume trigger")
    img = nib.load(func / f"{stem}.nii.gz")
    assert img.shape[3] == 120  # 4 minutes at TR 2 s, from the first trigger
    assert not (out / "sub-04" / "sub-04_task-rest_alignment.json").exists()  # not training material

    from samba_pipeline.simulate.score import score_predictions

    table = score_predictions(out, trained["truth"]).set_index("subject")
    r = table.loc["04", "pearson_run"]
    print(f"\nsub-04 (EEG only) predicted BOLD vs noise-free truth: Pearson {r:.3f}")
    # A model that learned nothing predicts noise around the mean: |r| ~ N(0, 1/sqrt(120)),
    # i.e. the parcel average stays within about +-0.03. The band-power coupling of the demo is
    # learned within these epochs (about 0.1-0.2 on 4-minute runs), so 0.05 is a real margin.
    assert r > 0.05
    demo = subprocess.run([sys.executable, "-m", "samba_pipeline.simulate.score", str(out),
                           str(trained["truth"])], capture_output=True, text=True, timeout=120)
    assert demo.returncode == 0 and "04" in demo.stdout


def test_group_level_refuses_bad_model_options(trained):
    proc = _cli(trained["bids"], trained["out"], "group", *trained["common"], "--model", "nosuchmodel")
    assert proc.returncode == 64 and "unknown model 'nosuchmodel'" in proc.stderr
    proc = _cli(trained["bids"], trained["out"], "group", *trained["common"], "--model-file",
                trained["out"] / "group" / f"{STEM}_model.json")
    assert proc.returncode == 64 and "participant level" in proc.stderr
    proc = _cli(trained["bids"], trained["out"], "group", *trained["common"], "--test-subjects", "09")
    assert proc.returncode != 0 and "09" in proc.stderr
    if not torch.cuda.is_available():
        proc = _cli(trained["bids"], trained["out"], "group", *trained["common"], "--device", "cuda")
        assert proc.returncode == 64 and "no CUDA GPU" in proc.stderr


def test_untrusted_or_broken_model_files_are_refused(trained, tmp_path):
    src = trained["out"] / "group" / f"{STEM}_model"
    bad = tmp_path / "bad_model"
    (tmp_path / "bad_model.json").write_text(Path(str(src) + ".json").read_text())
    # A pickle disguised as weights: safetensors never unpickles, it refuses the header.
    torch.save({"x": torch.zeros(3)}, tmp_path / "bad_model.safetensors")
    proc = _cli(trained["bids"], trained["out"], "participant", *trained["common"],
                "--participant-label", "04", "--model-file", str(bad) + ".json")
    assert proc.returncode == 65, proc.stderr
    assert "bad_model.safetensors" in proc.stderr and "Traceback" not in proc.stderr


def test_group_training_resumes_after_kill(trained, tmp_path):
    """kill -9 the group level during training; the rerun resumes from the last checkpoint."""
    work = tmp_path / "work"
    out = tmp_path / "out"
    import shutil

    shutil.copytree(trained["out"], out, ignore=shutil.ignore_patterns("group"))
    common = ["-w", work, "--config-file", trained["truth"] / "samba-bids-demo.toml",
              "--skip-bids-validation", "--nprocs", "1", "--epochs", "12", "--patience", "0",
              "--train-window", "30"]
    args = [sys.executable, "-m", "samba_pipeline.cli", trained["bids"], out, "group", *common]
    ckpt = work / "checkpoints" / "samba_ephys2fmri.pt"
    proc = subprocess.Popen(list(map(str, args)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            if ckpt.is_file():
                state = load_checkpoint(ckpt)
                if 2 <= state["epoch"] < 12:
                    break
            time.sleep(0.2)
        else:
            pytest.fail(f"no mid-training checkpoint (exit {proc.poll()})")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    killed_at = load_checkpoint(ckpt)["epoch"]
    assert not (out / "group" / f"{STEM}_model.json").exists()  # nothing half-published
    rerun = _cli(trained["bids"], out, "group", *common, "-v")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    card = json.loads((out / "group" / f"{STEM}_model.json").read_text())
    training = card["Metadata"]["Training"]
    assert training["resumed_from_epoch"] >= killed_at >= 2
    assert training["epochs_run"] == 12
    history = read_tsv(out / "group" / f"{STEM}_history.tsv")
    assert list(history["epoch"]) == list(range(1, 13))


def test_make_datasets_for_mixed_split_normalises_with_training_windows_only():
    from samba_pipeline.training import collate_windows

    runs = synthetic_runs(3, minutes=6.0, tr=1.0, sfreq=8.0)
    split = split_by_time_and_subject(runs, ["02"], window_s=20.0, gap_s=30.0)
    ds = make_datasets(runs, split, window_s=20.0)
    assert set(ds) == {"train", "val", "test"}
    assert runs[1].key not in ds["train"].normalizer.stats  # the withheld subject has no statistics
    model = PoolLinear.build({}, make_dims(runs, window_s=20.0))
    batch = collate_windows([ds["test"][0], ds["test"][1]])
    assert model(batch).shape == batch.target.shape


def test_fmri_to_ephys_in_the_pipeline_and_on_an_fmri_only_subject(trained, tmp_path):
    """--direction fmri2ephys trains the reverse model (with band-envelope metrics) and its model
    file predicts the EEG of a subject that has only fMRI."""
    import shutil

    out, bids = tmp_path / "out", tmp_path / "bids"
    shutil.copytree(trained["out"], out, ignore=shutil.ignore_patterns("group"))
    common = ["-w", tmp_path / "work", "--config-file", trained["truth"] / "samba-bids-demo.toml",
              "--skip-bids-validation", "--nprocs", "2"]
    proc = _cli(trained["bids"], out, "group", *common, "--direction", "fmri2ephys", "--epochs", "2",
                "--train-window", "30")
    assert proc.returncode == 0, proc.stderr[-3000:]
    stem = "model-samba_direction-fmri2ephys"
    metrics = read_tsv(out / "group" / f"{stem}_metrics.tsv")
    model_rows = metrics[metrics.predictor == "samba"]
    assert np.isfinite(model_rows["envelope_spearman_second"]).all()
    assert np.isfinite(model_rows["spearman_second"]).all()
    pred = read_tsv(out / "sub-01" / "eeg" / "sub-01_task-rest_desc-samba_stat-mean_predicted.tsv.gz")
    card = json.loads((out / "group" / f"{stem}_model.json").read_text())
    assert list(pred.columns) == card["Dims"]["target_names"]  # EEG channels
    assert abs(len(pred) / card["Dims"]["target_sfreq"] - 240.0) < 1.0  # 4 minutes of EEG

    # An fMRI-only subject: sub-02 without its EEG.
    shutil.copytree(trained["bids"], bids)
    shutil.rmtree(bids / "sub-02" / "eeg")
    proc = _cli(bids, out, "participant", *common, "--participant-label", "02", "--model-file",
                out / "group" / f"{stem}_model.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((out / "sub-02" / "eeg" / "sub-02_task-rest_desc-samba_stat-mean_predicted.json")
                      .read_text())
    assert meta["Direction"] == "fmri2ephys" and meta["Alignment"] == "first volume of the BOLD series"


def test_training_and_inference_are_gpu_nodes_when_on_cuda(trained, tmp_path):
    """Nipype's MultiProc schedules nodes whose ``use_gpu`` is set within ``n_gpu_procs``."""
    from samba_pipeline.cli.parser import parse_args
    from samba_pipeline.workflows.group import init_group_wf

    settings = parse_args([str(trained["bids"]), str(tmp_path / "o"), "group", "-w", str(tmp_path / "w"),
                           "--direction", "both", "--n-gpu-procs", "1"])
    for use_gpu in (False, True):
        wf = init_group_wf(settings, inputs_digest="x", use_gpu=use_gpu)
        names = [n for n in wf.list_node_names() if n.startswith(("train_", "apply_"))]
        assert sorted(names) == ["apply_samba_ephys2fmri", "apply_samba_fmri2ephys",
                                 "train_samba_ephys2fmri", "train_samba_fmri2ephys"]
        assert all(wf.get_node(n).is_gpu_node() == use_gpu for n in names)
        assert not wf.get_node("group_summary").is_gpu_node()


def test_killed_and_resumed_training_equals_an_uninterrupted_one(trained, tmp_path):
    """CPU, seeded: kill -9 mid-training and resume gives the same weights, history and metrics as a
    run that was never interrupted (the checkpoint holds the model, optimiser and every RNG state)."""
    import shutil

    from safetensors.torch import load_file

    epochs = 8
    runs = {}
    for name in ("uninterrupted", "resumed"):
        out, work = tmp_path / name / "out", tmp_path / name / "work"
        shutil.copytree(trained["out"], out, ignore=shutil.ignore_patterns("group"))
        common = ["-w", work, "--config-file", trained["truth"] / "samba-bids-demo.toml",
                  "--skip-bids-validation", "--nprocs", "1", "--epochs", str(epochs), "--patience", "0",
                  "--train-window", "30", "--device", "cpu"]
        if name == "resumed":
            args = [sys.executable, "-m", "samba_pipeline.cli", trained["bids"], out, "group", *common]
            ckpt = work / "checkpoints" / "samba_ephys2fmri.pt"
            proc = subprocess.Popen(list(map(str, args)), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                deadline = time.time() + 600
                while time.time() < deadline and proc.poll() is None:
                    if ckpt.is_file() and 2 <= load_checkpoint(ckpt)["epoch"] < epochs:
                        break
                    time.sleep(0.1)
                else:
                    pytest.fail(f"no mid-training checkpoint (exit {proc.poll()})")
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
            assert not (out / "group").exists() or not list((out / "group").glob("*_model.*"))
        done = _cli(trained["bids"], out, "group", *common)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = out / "group"
    card = json.loads((runs["resumed"] / f"{STEM}_model.json").read_text())
    assert card["Metadata"]["Training"]["resumed_from_epoch"] >= 2
    a = load_file(str(runs["uninterrupted"] / f"{STEM}_model.safetensors"))
    b = load_file(str(runs["resumed"] / f"{STEM}_model.safetensors"))
    assert sorted(a) == sorted(b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    for table in ("metrics", "history", "desc-withheldWindows_metrics", "desc-withheldSubjects_metrics"):
        x = read_tsv(runs["uninterrupted"] / f"{STEM}_{table}.tsv")
        y = read_tsv(runs["resumed"] / f"{STEM}_{table}.tsv")
        keep = [c for c in x.columns if c not in ("seconds", "time_s", "elapsed_s")]  # wall-clock times
        pd.testing.assert_frame_equal(x[keep], y[keep])
