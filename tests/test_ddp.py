"""Distributed data-parallel training: two gloo processes on CPU, started by torchrun."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from samba_pipeline.models.registry import get_model_class
from samba_pipeline.training import (TrainSettings, make_datasets, make_dims, seed_everything, split_by_time,
                                     train)
from samba_pipeline.training.ddp import load_saved_runs, save_runs, torchrun_command, train_distributed

from test_training import synthetic_runs  # noqa: E402  (tests/ is on sys.path)

CONFIG = {"hidden_size": 8, "lstm_hidden": 8, "heads": 1, "dropout": 0.0, "hrf_hidden": 8,
          "scale_attention_hidden": 8}


@pytest.fixture(scope="module")
def task():
    runs = synthetic_runs(2, minutes=5.0, tr=1.0, sfreq=16.0)
    split = split_by_time(runs, window_s=20.0, gap_s=30.0)
    return runs, split


def _model(runs):
    seed_everything(0)
    return get_model_class("samba").build(CONFIG, make_dims(runs, window_s=20.0))


def test_runs_roundtrip_without_pickle(task, tmp_path):
    runs, _ = task
    save_runs(runs, tmp_path)
    back = load_saved_runs(tmp_path)
    assert [r.key for r in back] == [r.key for r in runs]
    np.testing.assert_array_equal(back[1].ephys, runs[1].ephys)
    np.testing.assert_array_equal(back[0].fmri, runs[0].fmri)
    with np.load(tmp_path / "runs.npz", allow_pickle=False) as data:  # no object arrays inside
        assert all(data[k].dtype != object for k in data.files)


def test_two_gloo_processes_match_one_process_with_the_combined_batch(task, tmp_path):
    """DDP averages gradients: 2 processes x batch 2 take the same steps as 1 process x batch 4
    (windows in a fixed order, no dropout), so the weights agree to float precision."""
    runs, split = task
    settings = TrainSettings(epochs=2, batch_size=2, lr=3e-3, shuffle=False, progress=False, device="cpu",
                             patience=0, scheduler="none", seed=0)
    ddp = train_distributed(_model(runs), runs, split, 20.0, settings, nproc=2, workdir=tmp_path / "job",
                            plugin="samba")
    summary = json.loads((tmp_path / "job" / "result" / "summary.json").read_text())
    assert summary["world_size"] == 2 and ddp.epochs_run == 2

    ds = make_datasets(runs, split, window_s=20.0)
    single = train(_model(runs), ds["train"], ds["val"],
                   TrainSettings(**{**settings.__dict__, "batch_size": 4}))
    a, b = ddp.model.state_dict(), single.model.state_dict()
    assert a.keys() == b.keys()
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    moved = max(float((b[k].float() - _model(runs).state_dict()[k].float()).abs().max()) for k in b)
    assert moved > 1e-3  # training changed the weights ...
    assert diff < 1e-4 * max(1.0, moved)  # ... identically in both set-ups
    np.testing.assert_allclose(ddp.history["train_loss"], single.history["train_loss"], rtol=1e-4)


def test_launcher_command_for_several_nodes():
    launcher = "srun torchrun --nnodes 2 --nproc-per-node 4 --rdzv-endpoint 'h:29500'"
    cmd = torchrun_command("/w/spec.json", 4, launcher)
    assert cmd == ["srun", "torchrun", "--nnodes", "2", "--nproc-per-node", "4", "--rdzv-endpoint", "h:29500",
                   "-m", "samba_pipeline.training.ddp", "/w/spec.json"]
    assert torchrun_command("/w/spec.json", 2)[1:6] == ["-m", "torch.distributed.run", "--standalone",
                                                          "--nproc-per-node=2", "-m"]


def test_failed_worker_reports_the_job(tmp_path, task):
    runs, split = task
    bad = torchrun_command(tmp_path / "missing.json", 1)
    proc = subprocess.run(bad, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "missing.json" in proc.stderr
    with pytest.raises(Exception, match="distributed training failed"):
        train_distributed(_model(runs), runs, split, 20.0,
                          TrainSettings(epochs=1, device="cpu", progress=False), nproc=2,
                          workdir=tmp_path / "job", plugin="no_such_plugin")
