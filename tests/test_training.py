"""Training: derivatives loading, leak-free splits, z-scoring, metrics, the training loop,
checkpoints/resume, model files, and a short training run on the demo data."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from samba_pipeline.bids.derivatives import read_tsv, write_tsv
from samba_pipeline.errors import SambaInputError, SambaMissingInputError, SambaNoMatchError, SambaUsageError
from samba_pipeline.models.base import TranslationModel
from samba_pipeline.models.registry import available_models, get_model_class, register
from samba_pipeline.training import (
    Normalizer,
    RunData,
    Segment,
    Split,
    TrainingStopped,
    TrainSettings,
    WindowDataset,
    baseline_predictions,
    check_split,
    collate_windows,
    compare_configs,
    evaluate,
    evaluate_baselines,
    load_checkpoint,
    load_model,
    load_runs,
    make_datasets,
    make_dims,
    pearson,
    predict,
    predict_run,
    resolve_amp,
    resolve_device,
    save_model,
    score,
    seed_everything,
    spearman,
    split_by_subject,
    split_by_time,
    train,
    write_metrics,
)

# ---------------------------------------------------------------------------------------------
# Small models of the tests (the real ones are plugins under samba_pipeline.models)
# ---------------------------------------------------------------------------------------------


class PoolLinear(TranslationModel):
    """Source averaged into the target's time steps, then a linear map between nodes (+ dropout,
    so that the RNG state matters for reproducibility and resume)."""

    plugin_name = "test-poollinear"

    @classmethod
    def default_config(cls):
        return {"dropout": 0.2}

    def __init__(self, config, dims):
        super().__init__(config, dims)
        self.mix = nn.Linear(dims.n_source, dims.n_target)
        self.drop = nn.Dropout(config["dropout"])

    def forward(self, batch):
        pooled = F.adaptive_avg_pool1d(batch.source, self.dims.target_len)  # [B, S, T]
        return self.mix(self.drop(pooled.transpose(1, 2))).transpose(1, 2)


def _canonical_hrf(tr: float, taps: int) -> torch.Tensor:
    t = np.arange(taps) * tr
    h = stats.gamma.pdf(t, 6.0) - stats.gamma.pdf(t, 16.0) / 6.0
    return torch.tensor(h / np.abs(h).sum(), dtype=torch.float32)


class EnvelopeHRF(TranslationModel):
    """EEG -> fMRI in a few hundred parameters: log band power per channel and TR (FFT of each
    TR's samples), centred per window, a low-rank linear map to the parcels, then a causal
    per-parcel HRF (initialised canonical, learned)."""

    plugin_name = "test-envelope"
    directions = ("ephys2fmri",)

    @classmethod
    def default_config(cls):
        # The demo's neurovascular bands (alpha, beta, gamma; samba_pipeline.simulate.neural).
        return {"bands": [[8, 12], [15, 25], [40, 60]], "hrf_s": 24.0, "rank": 16, "dropout": 0.5}

    def __init__(self, config, dims):
        super().__init__(config, dims)
        self.spf = dims.source_len // dims.target_len
        freqs = torch.fft.rfftfreq(self.spf, 1.0 / dims.source_sfreq)
        self.bins = [torch.nonzero((freqs >= lo) & (freqs < hi)).ravel() for lo, hi in config["bands"]]
        self.bins = [(int(i[0]), int(i[-1]) + 1) for i in self.bins]
        self.register_buffer("taper", torch.hann_window(self.spf, periodic=False))
        n_feat = dims.n_source * len(config["bands"])
        self.down = nn.Linear(n_feat, config["rank"])
        self.up = nn.Linear(config["rank"], dims.n_target)
        self.drop = nn.Dropout(config["dropout"])
        taps = max(2, round(config["hrf_s"] / dims.tr))
        self.hrf = nn.Parameter(_canonical_hrf(dims.tr, taps).repeat(dims.n_target, 1))

    def forward(self, batch):
        x = batch.source
        b, c, s = x.shape
        t = s // self.spf
        x = x[..., : t * self.spf].reshape(b, c, t, self.spf) * self.taper
        spec = torch.fft.rfft(x)
        spec = spec.real.square() + spec.imag.square()
        power = torch.stack([spec[..., lo:hi].mean(-1) for lo, hi in self.bins], -1)  # [B, C, T, bands]
        feats = torch.log(power + 1e-6)
        feats = feats - feats.mean(dim=2, keepdim=True)
        feats = feats.permute(0, 2, 1, 3).reshape(b, t, -1)
        z = self.up(self.drop(self.down(self.drop(feats)))).transpose(1, 2)  # [B, N, T]
        k = self.hrf.shape[1]
        lagged = F.pad(z, (k - 1, 0)).unfold(-1, k, 1)  # [B, N, T, K]: z[t-K+1 .. t]
        return torch.einsum("bntk,nk->bnt", lagged, self.hrf.flip(1))  # causal per-parcel HRF


register(PoolLinear.plugin_name, PoolLinear)
register(EnvelopeHRF.plugin_name, EnvelopeHRF)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def synthetic_runs(n_runs=1, *, minutes=4.0, tr=1.0, sfreq=8.0, n_source=4, n_target=3, seed=0,
                   subjects=None, offset_after_s=None):
    """Small runs whose target is a linear mix of the source's slow part (learnable)."""
    rng = np.random.default_rng(seed)
    runs = []
    for i in range(n_runs):
        n_vol = int(round(minutes * 60 / tr))
        spv = int(round(tr * sfreq))
        slow = rng.standard_normal((n_source, n_vol))
        ephys = np.repeat(slow, spv, axis=1) + 0.3 * rng.standard_normal((n_source, n_vol * spv))
        mix = rng.standard_normal((n_target, n_source))
        fmri = mix @ slow + 0.1 * rng.standard_normal((n_target, n_vol))
        if offset_after_s is not None:
            k = int(offset_after_s / tr)
            fmri[:, k:] += 100.0
            ephys[:, k * spv:] += 50.0
        sub = subjects[i] if subjects else f"{i + 1:02d}"
        runs.append(RunData.from_arrays(ephys, fmri, ephys_sfreq=sfreq, tr=tr, subject=sub, task="rest"))
    return runs


@pytest.fixture(scope="module")
def demo_derivatives(tmp_path_factory):
    """Participant-level derivatives of a 1-subject, 10-minute demo (about 50 s to build).

    One long subject rather than the session's 2 x 3 minutes: a within-subject time split with
    60 s windows and 30 s gaps needs train + 2 gaps + val + test >= 6 minutes, and the training
    test needs several minutes of training data to learn anything.
    """
    from samba_pipeline.simulate import generate_demo_dataset

    root = tmp_path_factory.mktemp("training")
    bids, truth = generate_demo_dataset(root / "demo", subjects=1, minutes=10.0, seed=7)
    out = root / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "samba_pipeline.cli", str(bids), str(out), "participant",
         "-w", str(root / "work"), "--config-file", str(truth / "samba-bids-demo.toml"),
         "--skip-bids-validation", "--nprocs", "2"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_load_runs_and_dims(demo_derivatives):
    runs = load_runs(demo_derivatives)
    assert len(runs) == 1
    run = runs[0]
    assert run.key == "sub-01_task-rest"
    assert run.source.shape == (32, 120000) and run.target.shape == (50, 300)
    assert run.source_sfreq == 200.0 and run.target_sfreq == 0.5 and run.tr == 2.0
    assert run.target_valid.all()
    assert run.source_graph.shape == (32, 32) and run.target_graph.shape == (50, 50)
    assert run.region_map is not None and run.region_map.shape == (50, 20)  # read, but ...
    dims = make_dims(runs, window_s=60.0)
    assert dims.region_map is None  # ... not applicable: the EEG is in sensor space
    assert (dims.n_source, dims.n_target, dims.source_len, dims.target_len) == (32, 50, 12000, 30)
    assert make_dims(runs, window_s=15.0).window_s == 16.0  # whole volumes, as windows.tsv
    reverse = make_dims(runs, window_s=60.0, direction="fmri2ephys")
    assert (reverse.n_source, reverse.n_target, reverse.source_len, reverse.target_len) == (50, 32, 30, 12000)
    assert load_runs(demo_derivatives, direction="fmri2ephys")[0].target.shape == (32, 120000)
    with pytest.raises(SambaNoMatchError):
        load_runs(demo_derivatives, subjects=["99"])


def _corrupt(out, how):
    sub = out / "sub-01"
    eeg = next((sub / "eeg").glob("*_desc-preproc_timeseries.tsv.gz"))
    bold = next((sub / "func").glob("*_stat-mean_timeseries.tsv"))
    if how == "missing_eeg":
        eeg.unlink()
        return SambaMissingInputError, eeg.name
    if how == "short_bold":
        table = read_tsv(bold)
        write_tsv(bold, table.iloc[:-3])
        return SambaInputError, bold.name
    if how == "text_in_bold":
        text = bold.read_text().splitlines()
        cells = text[5].split("\t")
        cells[2] = "oops"
        text[5] = "\t".join(cells)
        bold.write_text("\n".join(text) + "\n")
        return SambaInputError, bold.name
    if how == "no_sfreq":
        sidecar = eeg.with_name(eeg.name.replace(".tsv.gz", ".json"))
        meta = json.loads(sidecar.read_text())
        del meta["SamplingFrequency"]
        sidecar.write_text(json.dumps(meta))
        return SambaInputError, eeg.name
    if how == "graph_nodes":
        graph = next((sub / "eeg").glob("*_relmat.tsv"))
        table = read_tsv(graph)
        table = table.rename(columns={table.columns[3]: "XX"})
        write_tsv(graph, table)
        return SambaInputError, graph.name
    if how == "no_alignment":
        for path in sub.glob("*_alignment.json"):
            path.unlink()
        return SambaMissingInputError, out.name
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["missing_eeg", "short_bold", "text_in_bold", "no_sfreq", "graph_nodes",
                                 "no_alignment"])
def test_bad_derivatives_give_clear_errors(demo_derivatives, tmp_path, how):
    out = tmp_path / "out"
    shutil.copytree(demo_derivatives, out, ignore=shutil.ignore_patterns("figures", "log", "sourcedata"))
    error, name = _corrupt(out, how)
    with pytest.raises(error) as info:
        load_runs(out)
    assert name in str(info.value)


def test_inconsistent_runs_are_refused():
    runs = synthetic_runs(2)
    runs[1].ephys_names[0] = "other"
    with pytest.raises(SambaInputError, match="EEG/MEG nodes differ"):
        make_dims(runs)
    runs = synthetic_runs(2)
    runs[1].tr = 2.0
    with pytest.raises(SambaInputError, match="TR"):
        make_dims(runs)
    with pytest.raises(SambaInputError, match="not aligned"):
        RunData.from_arrays(np.zeros((2, 10)), np.zeros((3, 20)), ephys_sfreq=8.0, tr=1.0)


# ---------------------------------------------------------------------------------------------
# Splits and z-scoring
# ---------------------------------------------------------------------------------------------
def _window_spans(ds):
    return [(row.run, row.part, row.fmri_start * ds.tr, row.fmri_stop * ds.tr)
            for row in ds.windows.itertuples(index=False)]


def _assert_no_leak(datasets, gap_s):
    spans = [s for ds in datasets.values() for s in _window_spans(ds)]
    assert {s[1] for s in spans} == set(datasets)
    for run, part, start, stop in spans:
        for run2, part2, start2, stop2 in spans:
            if run2 != run or part2 == part:
                continue
            assert stop <= start2 or stop2 <= start, "windows of different parts overlap"
            # Any two parts (train/val, train/test, val/test) lie at least one gap apart.
            distance = start2 - stop if start2 >= stop else start - stop2
            assert distance >= gap_s - 1e-9, f"{part}/{part2} windows only {distance} s apart"


@pytest.mark.parametrize("window_s,gap_s,order", [(60.0, 30.0, ("train", "val", "test")),
                                                  (30.0, 30.0, ("test", "train", "val")),
                                                  (15.0, 45.0, ("val", "test", "train"))])
def test_time_split_respects_gap_and_never_overlaps(window_s, gap_s, order):
    runs = synthetic_runs(2, minutes=8.0, tr=2.0, sfreq=10.0)
    split = split_by_time(runs, window_s=window_s, gap_s=gap_s, order=order)
    check_split(split, runs)
    datasets = make_datasets(runs, split, window_s=window_s, train_step_s=4.0)
    assert all(len(ds) > 0 for ds in datasets.values())
    _assert_no_leak(datasets, gap_s)
    for part in ("val", "test"):  # evaluation windows do not overlap each other
        spans = sorted(_window_spans(datasets[part]))
        assert all(a[0] != b[0] or a[3] <= b[2] for a, b in zip(spans, spans[1:]))
    assert Split.from_json(split.to_json()).segments == split.segments


def test_split_checks_and_too_short_runs():
    runs = synthetic_runs(1, minutes=4.0, tr=1.0)
    with pytest.raises(AssertionError, match="at least 30"):
        check_split(Split([Segment(0, "train", 0, 100), Segment(0, "test", 120, 180)], gap_s=30.0), runs)
    with pytest.raises(AssertionError, match="overlap"):
        check_split(Split([Segment(0, "train", 0, 100), Segment(0, "train", 90, 180)], gap_s=30.0), runs)
    with pytest.raises(SambaInputError, match="too short"):
        split_by_time(runs[:1] and synthetic_runs(1, minutes=3.5), window_s=60.0, gap_s=30.0)  # < 4 min


def test_subject_split():
    runs = synthetic_runs(4, minutes=4.0, subjects=["01", "02", "03", "03"])
    split = split_by_subject(runs, test_subjects=["03"], window_s=30.0)
    table = split.to_frame(runs)
    assert set(table.loc[table.key.str.startswith("sub-03"), "part"]) == {"test"}
    assert set(table.loc[~table.key.str.startswith("sub-03"), "part"]) == {"train", "val"}
    _assert_no_leak(make_datasets(runs, split, window_s=30.0), 30.0)
    split2 = split_by_subject(runs, test_subjects=["sub-03"], val_subjects=["02"])
    assert {(runs[s.run].subject, s.part) for s in split2.segments} == {("01", "train"), ("02", "val"),
                                                                      ("03", "test")}
    with pytest.raises(SambaUsageError):
        split_by_subject(runs, test_subjects=["01", "02", "03"])
    bad = Split([Segment(0, "train", 0, 240), Segment(1, "test", 0, 240)], kind="subject")
    runs[1].subject = "01"
    with pytest.raises(AssertionError, match="both the training and the test"):
        check_split(bad, runs)


def test_zscore_statistics_come_from_training_windows_only():
    # Everything after 150 s is shifted by a large offset; training windows lie before it.
    runs = synthetic_runs(1, minutes=5.0, tr=1.0, sfreq=8.0, offset_after_s=150.0)
    split = Split([Segment(0, "train", 0, 120), Segment(0, "test", 150, 300)], gap_s=30.0)
    ds = make_datasets(runs, split, window_s=20.0, train_step_s=10.0)
    run = runs[0]
    covered = ds["train"].volume_masks()[0]
    assert covered[:120].all() and not covered[120:].any()
    st = ds["train"].normalizer.for_run(run)
    np.testing.assert_allclose(st["fmri_mean"], run.fmri[:, :120].mean(1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(st["fmri_std"], run.fmri[:, :120].std(1), rtol=1e-4)
    np.testing.assert_allclose(st["ephys_mean"], run.ephys[:, :120 * 8].mean(1), rtol=1e-5, atol=1e-5)
    assert ds["test"].normalizer is ds["train"].normalizer
    _, test_target, _ = ds["test"].arrays()
    assert test_target.mean() > 20  # test data were not z-scored with their own statistics
    _, train_target, _ = ds["train"].arrays()
    assert abs(train_target.mean()) < 0.2
    # Runs without training windows (withheld subjects) use the pooled training statistics.
    runs2 = synthetic_runs(2, minutes=5.0)
    norm = Normalizer.fit(runs2, {0: np.ones(runs2[0].n_volumes, bool)})
    assert norm.for_run(runs2[1]) is norm.pooled
    np.testing.assert_allclose(norm.pooled["fmri_mean"], norm.stats[runs2[0].key]["fmri_mean"], atol=1e-9)
    assert Normalizer.from_dict(json.loads(json.dumps(norm.to_dict()))).stats.keys() == norm.stats.keys()


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
def test_spearman_and_pearson_match_scipy():
    rng = np.random.default_rng(3)
    pred = rng.standard_normal((7, 40))
    target = rng.integers(0, 6, size=(7, 40)).astype(float)  # many ties
    pred[3] = np.round(pred[3])
    ours = spearman(pred, target)
    ref = [stats.spearmanr(p, t).statistic for p, t in zip(pred, target)]
    np.testing.assert_allclose(ours, ref, atol=1e-12)
    ref = [stats.pearsonr(p, t).statistic for p, t in zip(pred, target)]
    np.testing.assert_allclose(pearson(pred, target), ref, atol=1e-12)
    # Constant target: undefined (NaN, skipped); constant prediction: 0.
    assert np.isnan(spearman(pred[:1], np.ones((1, 40))))[0]
    assert spearman(np.zeros((1, 40)), target[:1])[0] == 0.0


def test_score_windows_and_baselines():
    rng = np.random.default_rng(0)
    target = rng.standard_normal((3, 5, 30))
    summary, per_node = score(target, target, target_sfreq=0.5)
    assert summary["spearman_minute"] == pytest.approx(1.0) and summary["rmse"] == 0.0
    assert summary["n_minute_windows"] == 3 and summary["n_second_windows"] == 9  # 15 s -> 8 volumes
    mask = np.ones((3, 5), bool)
    mask[:, 4] = False
    noisy = target + rng.standard_normal(target.shape)
    summary, per_node = score(noisy, target, mask, target_sfreq=0.5, node_names=list("abcde"))
    expected = np.mean([spearman(noisy[w, :4], target[w, :4]).mean() for w in range(3)])
    assert summary["spearman_minute"] == pytest.approx(expected)
    assert np.isnan(per_node.loc[4, "spearman_minute"]) and summary["n_valid_nodes"] == 4
    assert score(np.zeros_like(target), target, target_sfreq=0.5)[0]["spearman_second"] == 0.0

    runs = synthetic_runs(1, minutes=5.0)
    ds = make_datasets(runs, Split([Segment(0, "train", 0, 150), Segment(0, "test", 180, 300)]),
                       window_s=30.0)["test"]
    pers = baseline_predictions(ds, "persistence")
    _, fmri = ds.normalizer.transform(runs[0])
    np.testing.assert_array_equal(pers[0], fmri[:, 150:180])  # the window before the first test window
    np.testing.assert_array_equal(pers[1], fmri[:, 180:210])
    base = evaluate_baselines(ds)
    assert base["mean"]["spearman_second"] == 0.0 and base["mean"]["n_second_windows"] == 8
    assert math.isnan(base["mean"]["spearman_minute"])  # 30 s windows hold no 60 s scoring window


def test_write_metrics(tmp_path):
    summary, per_node = score(np.ones((1, 2, 30)) * np.arange(30), np.arange(30.0)[None, None].repeat(2, 1),
                              target_sfreq=0.5)
    written = write_metrics(tmp_path / "sub-01_desc-test_metrics", summary, per_node)
    assert json.loads(written["json"].read_text())["spearman_minute"] == pytest.approx(1.0)
    assert list(read_tsv(written["tsv"])["node"]) == ["node0", "node1"]


# ---------------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_task():
    runs = synthetic_runs(1, minutes=6.0, tr=1.0, sfreq=8.0)
    split = split_by_time(runs, window_s=20.0, gap_s=30.0)
    ds = make_datasets(runs, split, window_s=20.0, train_step_s=5.0)
    return ds, make_dims(runs, window_s=20.0)


def _fit(small_task, **kwargs):
    ds, dims = small_task
    seed_everything(kwargs.get("seed", 0))
    model = PoolLinear.build({}, dims)
    settings = TrainSettings(**{"epochs": 4, "batch_size": 4, "lr": 1e-2, "progress": False, **kwargs})
    return train(model, ds["train"], ds["val"], settings)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_same_seed_same_weights(small_task):
    a, b, c = _fit(small_task), _fit(small_task), _fit(small_task, seed=1)
    assert all(torch.equal(a.model.state_dict()[k], v) for k, v in _state(b.model).items())
    assert not all(torch.equal(a.model.state_dict()[k], v) for k, v in _state(c.model).items())
    pd.testing.assert_frame_equal(a.history.drop(columns="seconds"), b.history.drop(columns="seconds"))


def test_training_learns_and_keeps_best_epoch(small_task):
    ds, _ = small_task
    result = _fit(small_task, epochs=40, scheduler="plateau", patience=5)
    hist = result.history
    assert hist["val_loss"].iloc[-1] < hist["val_loss"].iloc[0]
    assert result.best_epoch == int(hist.loc[hist["val_loss"].idxmin(), "epoch"])
    assert result.best_val_loss == pytest.approx(hist["val_loss"].min())
    for k, v in result.best_state.items():
        assert torch.equal(result.model.state_dict()[k], v)
    assert result.stopped_early == (len(hist) < 40)
    summary, _ = evaluate(result.model, ds["test"])
    assert math.isnan(summary["spearman_minute"])  # 20 s windows hold no 60 s scoring window
    assert summary["spearman_second"] > 0.5  # the synthetic target is a linear mix of the source


def test_checkpoint_resume_equals_uninterrupted(small_task, tmp_path):
    straight = _fit(small_task, epochs=4)
    path = tmp_path / "work" / "checkpoint.pt"

    def interrupt(row):
        if row["epoch"] == 2:
            raise TrainingStopped

    ds, dims = small_task
    seed_everything(0)
    model = PoolLinear.build({}, dims)
    settings = TrainSettings(epochs=4, batch_size=4, lr=1e-2, progress=False, checkpoint_path=str(path))
    with pytest.raises(TrainingStopped):
        train(model, ds["train"], ds["val"], settings, callbacks=[interrupt])
    ckpt = load_checkpoint(path)  # weights_only=True: plain tensors and containers only
    assert ckpt["epoch"] == 2 and not ckpt["done"]
    assert not list(path.parent.glob(".*.tmp"))  # atomic write left no temporary file

    seed_everything(123)  # a fresh process: other initial weights, other RNG state
    fresh = PoolLinear.build({}, dims)
    resumed = train(fresh, ds["train"], ds["val"], settings)
    assert resumed.resumed_from_epoch == 2 and resumed.epochs_run == 4
    for k, v in _state(straight.model).items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    pd.testing.assert_frame_equal(straight.history.drop(columns="seconds"),
                                  resumed.history.drop(columns="seconds"))
    # A finished checkpoint returns at once; other settings are refused.
    again = train(PoolLinear.build({}, dims), ds["train"], ds["val"], settings)
    assert again.epochs_run == 4 and again.best_epoch == straight.best_epoch
    with pytest.raises(SambaUsageError, match="another model, data or training settings"):
        train(PoolLinear.build({}, dims), ds["train"], ds["val"],
              TrainSettings(epochs=4, batch_size=4, lr=5e-3, progress=False, checkpoint_path=str(path)))


def test_guards_device_and_precision(small_task):
    ds, dims = small_task
    model = PoolLinear.build({}, dims)
    with pytest.raises(SambaUsageError, match="test windows"):
        train(model, ds["train"], ds["test"], TrainSettings(progress=False))
    with pytest.raises(SambaUsageError):
        TrainSettings(scheduler="linear")
    assert resolve_device("cpu").type == "cpu"
    assert resolve_amp("auto", torch.device("cpu")) is None  # mixed precision on GPU only
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
        assert resolve_amp("auto", torch.device("cuda")) in (torch.bfloat16, torch.float16)
    else:
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(SambaUsageError, match="no CUDA"):
            resolve_device("cuda")


def test_model_files_roundtrip(small_task, tmp_path):
    ds, dims = small_task
    seed_everything(0)
    model = PoolLinear.build({"dropout": 0.1}, dims).eval()
    files = save_model(tmp_path / "model" / "desc-test_model", model,
                       metadata={"normalizer": ds["train"].normalizer.to_dict()})
    assert files["weights"].suffix == ".safetensors"
    loaded = load_model(tmp_path / "model" / "desc-test_model")
    assert loaded.config["dropout"] == 0.1 and loaded.dims.n_target == dims.n_target
    batch = collate_windows([ds["test"][0]])
    torch.testing.assert_close(loaded(batch), model(batch))


def test_compare_configs_on_one_split():
    runs = synthetic_runs(1, minutes=6.0, tr=1.0, sfreq=8.0)
    split = split_by_time(runs, window_s=20.0, gap_s=30.0)
    table = compare_configs(runs, split, "test-poollinear", {"a": {"dropout": 0.0}, "b": {"dropout": 0.5}},
                            TrainSettings(epochs=3, batch_size=4, lr=1e-2, progress=False),
                            seeds=(0, 1), window_s=20.0, train_step_s=5.0)
    assert list(table["name"]) == ["baseline:mean", "baseline:persistence", "a", "a", "b", "b"]
    assert table.loc[2:, "test_spearman_second"].notna().all()


def test_predict_run_stitches_windows(small_task):
    ds, dims = small_task
    seed_everything(0)
    model = PoolLinear.build({}, dims).eval()
    run = ds["train"].runs[0]
    st = ds["train"].normalizer.for_run(run)
    n = run.ephys.shape[1] - 37  # not a whole number of windows
    series = predict_run(model, run.ephys[:, :n], source_mean=st["ephys_mean"], source_std=st["ephys_std"])
    assert series.shape == (3, int(n / 8.0))
    # Window k of the series is the model's prediction for the window starting at k * 20 s.
    segment = Segment(0, "test", 0, run.n_volumes)
    whole = WindowDataset([run], [segment], window_s=20.0, normalizer=ds["train"].normalizer, part="test")
    expected = predict(model, whole)
    np.testing.assert_allclose(series[:, :20], expected[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(series[:, 40:60], expected[2], rtol=1e-5, atol=1e-6)
    assert np.abs(series[:, -5:]).sum() > 0  # the tail is covered by an end-aligned window
    with pytest.raises(SambaInputError, match="shorter than one model window"):
        predict_run(model, run.ephys[:, :100])


# ---------------------------------------------------------------------------------------------
# A short training run on the demo data
# ---------------------------------------------------------------------------------------------
def test_training_on_demo_beats_trivial_baselines(demo_derivatives):
    """EEG -> fMRI on 10 minutes of simulated simultaneous EEG-fMRI (32 sensors, 50 parcels).

    Split: 300 s training, then 60 s validation, then 60 s test, 30 s gaps between them.
    Threshold: the mean Spearman correlation over the 50 parcels in the two withheld 60 s
    windows must exceed 0.08 and the better baseline by 0.05. Why: the baselines score about
    0 (mean: exactly 0; persistence about +-0.05); with 50 parcels driven by 20 correlated
    sources, the window-averaged Spearman of an unrelated prediction has a standard deviation of
    about 0.03, so 0.08 is more than two standard deviations above chance. The ceiling of such a
    small model is low on this data (sensor-space EEG mixes the 20 simulated sources): with
    training seeds 0-4 it reaches 0.13-0.19 (seed 0: 0.185), and a closed-form ridge regression
    of HRF-convolved sensor band power reaches about 0.14, so the threshold leaves a margin.
    """
    runs = load_runs(demo_derivatives)
    split = split_by_time(runs, window_s=60.0, gap_s=30.0)
    ds = make_datasets(runs, split, window_s=60.0, train_step_s=10.0)
    dims = make_dims(runs, window_s=60.0)
    seed_everything(0)
    model = EnvelopeHRF.build({}, dims)
    result = train(model, ds["train"], ds["val"],
                   TrainSettings(epochs=25, lr=1e-2, batch_size=4, patience=10, progress=False))
    summary, per_node = evaluate(result.model, ds["test"])
    baselines = evaluate_baselines(ds["test"])
    best_baseline = max(b["spearman_minute"] for b in baselines.values())
    print(f"\nwithheld (test) windows: model {summary['spearman_minute']:.3f} (minute), "
          f"{summary['spearman_second']:.3f} (second); baselines "
          + ", ".join(f"{k} {v['spearman_minute']:.3f}/{v['spearman_second']:.3f}"
                      for k, v in baselines.items())
          + f"; best epoch {result.best_epoch}/{result.epochs_run}")
    assert summary["n_minute_windows"] == 2 and len(per_node) == 50
    assert summary["spearman_minute"] > 0.08
    assert summary["spearman_minute"] > best_baseline + 0.05
    assert summary["spearman_second"] > max(b["spearman_second"] for b in baselines.values())


# ---------------------------------------------------------------------------------------------
# SAMBA front ends (when the plugin is installed)
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("front_end", ["paper", "neurovascular"])
def test_samba_front_ends_train_evaluate_and_save(demo_derivatives, front_end, tmp_path):
    """Smoke test of the real plugin through the trainer (2 epochs; the front-end comparison with
    full training is a measurement, reported in the issue, not a unit test)."""
    if "samba" not in available_models():
        pytest.skip("the samba plugin is not installed")
    try:
        cls = get_model_class("samba")
    except Exception as exc:  # the plugin is declared but not importable yet
        pytest.skip(f"the samba plugin cannot be loaded: {exc}")
    runs = load_runs(demo_derivatives)
    split = split_by_time(runs, window_s=60.0, gap_s=30.0)
    ds = make_datasets(runs, split, window_s=60.0, train_step_s=30.0)
    dims = make_dims(runs, window_s=60.0)
    seed_everything(0)
    model = cls.build({"front_end": front_end}, dims)
    result = train(model, ds["train"], ds["val"],
                   TrainSettings(epochs=2, lr=3e-3, batch_size=8, progress=False,
                                 checkpoint_path=str(tmp_path / "checkpoint.pt")))
    assert result.epochs_run == 2 and np.isfinite(result.history["val_loss"]).all()
    summary, per_node = evaluate(result.model, ds["test"])
    assert math.isfinite(summary["spearman_minute"]) and len(per_node) == 50
    save_model(tmp_path / "samba_model", result.model, plugin="samba")
    loaded = load_model(tmp_path / "samba_model")
    assert loaded.config["front_end"] == front_end
    batch = collate_windows([ds["test"][0]])
    batch.target = None
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), result.model(batch))
