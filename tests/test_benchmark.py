"""Benchmark mode: entries, the shuffled null, cross-subject rows, stimulus classification and
the Table-I-style outputs on tiny synthetic data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from samba_pipeline.bids.derivatives import read_tsv
from samba_pipeline.errors import SambaUsageError
from samba_pipeline.training import make_datasets, split_by_time
from samba_pipeline.training.benchmark import (
    MispairedDataset,
    classification_accuracy,
    cross_subject_predictions,
    expand_entries,
    parse_entry,
    run_benchmark,
)

from test_training import synthetic_runs  # noqa: E402  (tests/ is on sys.path)


def test_entries_and_ablations():
    names = expand_entries(["default", "ridge"])
    assert names[0] == "samba" and names.count("ridge") == 1 and "shuffled:samba" in names
    e = parse_entry("samba:fixed_hrf", "ephys2fmri")
    assert e.plugin == "samba" and e.config == {"learn_hrf": False} and e.kind == "ablation"
    assert parse_entry("samba:fixed_hrf", "fmri2ephys") is None  # the other direction's ablation
    assert parse_entry("samba:no_skip_loss", "fmri2ephys").config == {"lambda_match": 1.0}
    assert parse_entry("calhas", "fmri2ephys") is None  # EEG -> fMRI only
    s = parse_entry("shuffled:samba:mse", "ephys2fmri")
    assert s.shuffled and s.kind == "null_model" and s.config == {"loss": "mse"}
    with pytest.raises(SambaUsageError):
        parse_entry("samba:no_such_thing", "ephys2fmri")
    with pytest.raises(SambaUsageError):
        parse_entry("nosuchmodel", "ephys2fmri")


def test_mispaired_windows_never_keep_their_own_target():
    runs = synthetic_runs(1, minutes=6.0)
    ds = make_datasets(runs, split_by_time(runs, window_s=20.0, gap_s=10.0), window_s=20.0)["train"]
    mis = MispairedDataset(ds, seed=3)
    assert len(mis) == len(ds) and (mis.partner != np.arange(len(ds))).all()
    w = ds.windows
    far = np.abs(w.onset_s.to_numpy() - w.onset_s.to_numpy()[mis.partner]) >= ds.window_s
    assert far.all()  # one run here: partners at least a window apart in time
    runs3 = synthetic_runs(2, minutes=6.0)
    ds3 = make_datasets(runs3, split_by_time(runs3, window_s=20.0, gap_s=10.0), window_s=20.0)["train"]
    mis3 = MispairedDataset(ds3, seed=0)
    w3 = ds3.windows
    assert (w3.run.to_numpy() != w3.run.to_numpy()[mis3.partner]).all()  # another run when possible
    i = 2
    assert np.array_equal(mis[i]["source"], ds[i]["source"])
    assert np.array_equal(mis[i]["target"], ds[int(mis.partner[i])]["target"])


def test_subject_mean_is_the_other_subjects_mean():
    runs = synthetic_runs(3, minutes=6.0, seed=1)
    split = split_by_time(runs, window_s=20.0, gap_s=10.0)
    ds = make_datasets(runs, split, window_s=20.0)["test"]
    mean, per = cross_subject_predictions(ds)
    assert len(per) == 2
    row = ds.windows.iloc[0]
    others = [r for r in range(3) if r != row.run]
    expect = np.mean([ds.normalizer.transform(runs[r])[1][:, row.fmri_start:row.fmri_stop]
                      for r in others], axis=0)
    assert np.allclose(mean[0], expect)


def test_classification_head_finds_a_separable_condition():
    rng = np.random.default_rng(0)
    y = np.repeat(["a", "b"], 100)
    x = rng.standard_normal((200, 5))
    x[y == "b", 0] += 4.0
    acc = classification_accuracy(x[::2], y[::2], x[1::2], y[1::2])
    assert acc > 0.9
    assert np.isnan(classification_accuracy(x, np.full(200, "a"), x, y))  # one class: undefined


def test_benchmark_writes_table_i(tmp_path):
    runs = synthetic_runs(3, minutes=6.0, tr=1.0, sfreq=32.0, n_source=4, n_target=3, seed=2)
    bids = tmp_path / "bids"
    for run in runs:  # func events with two conditions in 20 s blocks
        folder = bids / f"sub-{run.subject}" / "func"
        folder.mkdir(parents=True)
        onsets = np.arange(0, run.duration_s, 20.0)
        pd.DataFrame({"onset": onsets, "duration": 20.0,
                      "trial_type": ["cond1" if i % 2 else "cond2" for i in range(len(onsets))]}
                     ).to_csv(folder / f"{run.key}_events.tsv", sep="\t", index=False)
    out = run_benchmark(tmp_path / "out", tmp_path / "stage",
                        entries=["ridge", "mlp", "calhas", "samba:no_lstm", "shuffled:ridge"],
                        directions=["ephys2fmri", "fmri2ephys"], runs=runs, bids_dir=bids, seed=0,
                        settings={"epochs": 2, "train_window": 20.0, "split": "both", "test_subjects": ["03"],
                                  "model_config": {"hidden_size": 8, "lstm_hidden": 8}})
    table = read_tsv(out["tsv"])
    group = tmp_path / "stage" / "group"
    assert (group / "desc-benchmark_metrics.md").is_file()
    assert (group / "desc-benchmark_metrics.svg").read_text().lstrip().startswith("<?xml")
    e2f = table[table.direction == "ephys2fmri"]
    f2e = table[table.direction == "fmri2ephys"]
    assert {"ridge", "mlp", "calhas", "samba:no_lstm", "shuffled:ridge", "baseline:mean",
            "baseline:persistence", "null:subject_mean", "baseline:input", "chance"} <= set(e2f.predictor)
    assert "calhas" not in set(f2e.predictor) and "samba:no_lstm" not in set(f2e.predictor)
    assert set(table.test_set) == {"withheld_windows", "withheld_subjects"}
    models = e2f[e2f.kind.isin(["model", "ablation"])]
    assert np.isfinite(models[["spearman_second", "rmse", "ssim", "accuracy"]]).all().all()
    assert (e2f.loc[e2f.predictor == "ridge", "epochs"] == 0).all()  # closed form
    ranks = e2f.loc[(e2f.test_set == "withheld_windows") & e2f["rank"].notna(), "rank"]
    assert sorted(ranks)[0] == 1
    md = (group / "desc-benchmark_metrics.md").read_text()
    assert "## ephys2fmri" in md and "## fmri2ephys" in md and "`calhas`" in md


def test_cli_benchmark_option(tmp_path):
    import json

    from samba_pipeline.cli.parser import parse_args

    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "x", "BIDSVersion": "1.10.0"}))
    settings = parse_args([str(bids), str(tmp_path / "out"), "group", "--skip-bids-validation", "--benchmark",
                           "samba,samba:no_lstm,shuffled:ridge", "--benchmark-epochs", "5"])
    assert settings.model.benchmark == ["samba", "samba:no_lstm", "shuffled:ridge"]
    assert settings.model.benchmark_epochs == 5


def test_demo_stimulus_conditions(tmp_path):
    """--conditions writes func events and raises one network's band power in its blocks."""
    from samba_pipeline.simulate import generate_demo_dataset

    bids, truth = generate_demo_dataset(tmp_path / "demo", subjects=1, minutes=2.0, conditions=2, seed=3)
    events = read_tsv(bids / "sub-01" / "func" / "sub-01_task-rest_events.tsv")
    assert set(events.trial_type) == {"cond1", "cond2", "rest"}
    assert np.allclose(np.diff(events.onset), 20.0)
    data = np.load(truth / "sub-01" / "sub-01_task-rest_truth.npz")
    power = np.log(data["band_power"])  # [n_coarse, n_bands, n_volumes] at the volume onsets
    power = power.reshape(-1, power.shape[-1])  # [parcels x bands, volumes]
    t = np.arange(power.shape[-1]) * 2.0 + 1.0
    label = np.full(t.size, "", dtype=object)
    for ev in events.itertuples():
        label[(t >= ev.onset) & (t < ev.onset + ev.duration)] = ev.trial_type
    diff = power[:, label == "cond1"].mean(1) - power[:, label == "rest"].mean(1)
    assert diff.max() > 0.5  # the parcels of condition 1's network (1.5 log-power SD)
    with pytest.raises(Exception, match="conditions"):
        generate_demo_dataset(tmp_path / "demo2", subjects=1, minutes=2.0, conditions=2,
                              non_simultaneous=True)
