"""Multi-process (multi-GPU, multi-node) training with torchrun and DistributedDataParallel.

:func:`train_distributed` is what the group level calls with ``--train-nproc N``: it writes a
*job folder* (``spec.json``, the runs as ``runs.npz`` + ``runs.json``, the initial weights as
safetensors), starts ``torchrun --standalone --nproc-per-node N -m samba_pipeline.training.ddp
JOB/spec.json`` and reads back the trained weights and history. Nothing in the job folder is
pickled.

Each worker (``python -m samba_pipeline.training.ddp SPEC``, started by torchrun) joins the
process group (NCCL on CUDA, one GPU per local rank; gloo on CPU), rebuilds the same datasets
and model, and runs :func:`samba_pipeline.training.trainer.train`, which shards the windows and
averages the gradients. Rank 0 writes the checkpoint every epoch and the result at the end.

Several nodes: run the worker under torchrun on every node with the same job folder (on a
shared filesystem), e.g. in an sbatch script (README, 'Running on a cluster')::

    srun torchrun --nnodes "$SLURM_NNODES" --nproc-per-node 4 --rdzv-backend c10d \\
         --rdzv-endpoint "$HEAD:29500" --rdzv-id "$SLURM_JOB_ID" \\
         -m samba_pipeline.training.ddp WORK/checkpoints/ddp_samba_ephys2fmri/spec.json

``samba-bids ... group --train-launcher "srun torchrun --nnodes 2 ..."`` does exactly that from
inside a multi-node allocation: the group-level training node writes the job folder (under
``WORK/checkpoints/``) and runs the launcher command with the worker module appended.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from samba_pipeline.errors import SambaError, SambaInputError
from samba_pipeline.models.base import DataDims
from samba_pipeline.training.data import RunData
from samba_pipeline.training.splits import Split, make_datasets
from samba_pipeline.training.trainer import TrainResult, TrainSettings, resolve_device, train

LOGGER = logging.getLogger("samba_pipeline.training")


# ---------------------------------------------------------------------------------------------
# Runs <-> files without pickle
# ---------------------------------------------------------------------------------------------
def save_runs(runs: Sequence[RunData], folder) -> None:
    """Arrays in ``runs.npz`` (no object arrays), everything else in ``runs.json``."""
    folder = Path(folder)
    arrays: dict[str, np.ndarray] = {}
    meta = []
    for i, run in enumerate(runs):
        arrays[f"ephys_{i}"] = run.ephys
        arrays[f"fmri_{i}"] = run.fmri
        for name in ("ephys_graph", "fmri_graph"):
            if getattr(run, name) is not None:
                arrays[f"{name}_{i}"] = np.asarray(getattr(run, name))
        rmap = run.region_map
        if rmap is not None:
            arrays[f"region_map_{i}"] = rmap.to_numpy(dtype=np.float64)
        meta.append({
            "ephys_sfreq": run.ephys_sfreq, "tr": run.tr, "ephys_names": run.ephys_names,
            "fmri_names": run.fmri_names, "direction": run.direction, "subject": run.subject,
            "session": run.session, "task": run.task, "acquisition": run.acquisition, "run": run.run,
            "ephys_space": run.ephys_space, "files": run.files,
            "region_map_index": None if rmap is None else [str(x) for x in rmap.index],
            "region_map_columns": None if rmap is None else [str(x) for x in rmap.columns],
        })
    np.savez(folder / "runs.npz", **arrays)
    (folder / "runs.json").write_text(json.dumps(meta))


def load_saved_runs(folder) -> list[RunData]:
    folder = Path(folder)
    meta = json.loads((folder / "runs.json").read_text())
    runs = []
    with np.load(folder / "runs.npz", allow_pickle=False) as arrays:
        for i, m in enumerate(meta):
            rmap = None
            if f"region_map_{i}" in arrays:
                rmap = pd.DataFrame(arrays[f"region_map_{i}"], index=m["region_map_index"],
                                    columns=m["region_map_columns"])
            runs.append(RunData(
                ephys=arrays[f"ephys_{i}"], fmri=arrays[f"fmri_{i}"], ephys_sfreq=m["ephys_sfreq"],
                tr=m["tr"],
                ephys_names=m["ephys_names"], fmri_names=m["fmri_names"], direction=m["direction"],
                subject=m["subject"], session=m["session"], task=m["task"], acquisition=m["acquisition"],
                run=m["run"], ephys_space=m["ephys_space"], files=m["files"], region_map=rmap,
                ephys_graph=arrays[f"ephys_graph_{i}"] if f"ephys_graph_{i}" in arrays else None,
                fmri_graph=arrays[f"fmri_graph_{i}"] if f"fmri_graph_{i}" in arrays else None))
    return runs


# ---------------------------------------------------------------------------------------------
# The launcher (group level)
# ---------------------------------------------------------------------------------------------
def write_job(folder, *, runs: Sequence[RunData], split: Split, window_s: float, model,
              plugin: str, settings: TrainSettings, train_step_s: float | None = None) -> Path:
    """Write a job folder for :func:`worker` and return its ``spec.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_runs(runs, folder)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(folder / "initial.safetensors"))
    spec = {"plugin": plugin, "config": dict(model.config), "dims": model.dims.to_dict(),
            "split": json.loads(split.to_json()), "window_s": float(window_s), "train_step_s": train_step_s,
            "settings": asdict(settings), "result": str(folder / "result")}
    path = folder / "spec.json"
    path.write_text(json.dumps(spec, indent=1))
    return path


def torchrun_command(spec_path, nproc: int, launcher: str | None = None) -> list[str]:
    """``torchrun --standalone --nproc-per-node N -m samba_pipeline.training.ddp SPEC``, or the
    worker module behind a ``launcher`` command (e.g. ``srun torchrun --nnodes 2 ...``)."""
    import shlex

    if launcher:
        return [*shlex.split(launcher), "-m", "samba_pipeline.training.ddp", str(spec_path)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={int(nproc)}",
            "-m", "samba_pipeline.training.ddp", str(spec_path)]


def train_distributed(model, runs: Sequence[RunData], split: Split, window_s: float, settings: TrainSettings,
                      *, nproc: int, workdir, plugin: str, train_step_s: float | None = None,
                      launcher: str | None = None) -> TrainResult:
    """Train ``model`` in ``nproc`` torchrun processes; returns the result as :func:`train` does."""
    import time

    t0 = time.perf_counter()
    folder = Path(workdir)
    spec = write_job(folder, runs=runs, split=split, window_s=window_s, model=model, plugin=plugin,
                     settings=settings, train_step_s=train_step_s)
    cmd = torchrun_command(spec, nproc, launcher)
    LOGGER.info("distributed training: %s", " ".join(cmd))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise SambaError(f"distributed training failed (exit {proc.returncode}); job folder "
                         f"{folder}:\n{tail}", path=spec)
    result_dir = folder / "result"
    state = load_file(str(result_dir / "model.safetensors"))
    model.load_state_dict(state)
    model.eval()
    summary = json.loads((result_dir / "summary.json").read_text())
    history = pd.read_csv(result_dir / "history.tsv", sep="\t")
    return TrainResult(model=model, history=history, best_epoch=summary["best_epoch"],
                       best_val_loss=summary["best_val_loss"], epochs_run=summary["epochs_run"],
                       stopped_early=summary["stopped_early"], device=summary["device"],
                       amp_dtype=summary["amp_dtype"], best_state=state,
                       resumed_from_epoch=summary["resumed_from_epoch"],
                       seconds=time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# The worker (one per process, started by torchrun)
# ---------------------------------------------------------------------------------------------
def worker(spec_path) -> dict[str, Any]:
    """Join the process group, train, and (rank 0) write ``result/``."""
    import torch.distributed as dist

    from samba_pipeline.models.registry import get_model_class

    spec_path = Path(spec_path)
    try:
        spec = json.loads(spec_path.read_text())
    except (OSError, ValueError) as exc:
        raise SambaInputError(f"cannot read the distributed-training job: {exc}", path=spec_path) from None
    settings = TrainSettings(**spec["settings"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(settings.device)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        settings.device = f"cuda:{local_rank}"
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        rank = dist.get_rank()
        runs = load_saved_runs(spec_path.parent)
        split = Split.from_json(json.dumps(spec["split"]))
        datasets = make_datasets(runs, split, window_s=spec["window_s"], train_step_s=spec["train_step_s"])
        cls = get_model_class(spec["plugin"])
        model = cls.build(spec["config"], DataDims.from_dict(spec["dims"]))
        model.load_state_dict(load_file(str(spec_path.parent / "initial.safetensors")))
        if rank > 0:
            settings.progress = False  # the checkpoint is read by every rank, written by rank 0
        result = train(model, datasets["train"], datasets.get("val"), settings)
        if rank == 0:
            out = Path(spec["result"])
            out.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()},
                      str(out / "model.safetensors"))
            result.history.to_csv(out / "history.tsv", sep="\t", index=False)
            summary = dict(result.summary(), world_size=dist.get_world_size())
            (out / "summary.json").write_text(json.dumps(summary))
        dist.barrier()
        return result.summary()
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: torchrun ... -m samba_pipeline.training.ddp SPEC.json", file=sys.stderr)
        return 64
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format="%(asctime)s rank " + os.environ.get("RANK", "0") + " %(message)s")
    try:
        worker(argv[0])
    except SambaError as err:
        print(f"samba-bids ddp worker: error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
