"""The training loop: AdamW, a learning-rate schedule, early stopping, checkpoints, resume.

``train(model, train_ds, val_ds, settings)`` works with any
:class:`~samba_pipeline.models.base.TranslationModel` and any datasets whose items are dicts with
``source``, ``target`` and ``target_mask`` (e.g. :class:`~samba_pipeline.training.data.WindowDataset`).

* Model selection (best epoch, early stopping, the plateau schedule) uses the validation loss
  only; a dataset whose ``part`` is ``"test"`` is refused as validation set.
* At validation the model gets ``Batch(source, target=None, target_mask)`` (no teacher forcing
  from the measured target); the loss is then computed against the full batch.
* Reproducible: :func:`seed_everything` seeds Python, NumPy and torch (call it before building the
  model); the shuffling uses its own generator; on CPU the same seed gives identical weights.
* Mixed precision on CUDA only (bf16 where supported, else fp16 with a ``GradScaler``).
* With ``settings.checkpoint_path`` a resumable checkpoint (model, optimizer, scheduler, scaler,
  epoch, best state, history, RNG states) is written atomically after every epoch; a later call
  with the same path and settings resumes from it, so an interrupted run finishes with the same
  weights as an uninterrupted one. Checkpoints are read with ``torch.load(weights_only=True)``.
* Distributed data parallel: called in every process of an initialised ``torch.distributed``
  process group (torchrun; see :mod:`samba_pipeline.training.ddp`), ``train`` wraps the model in
  :class:`~torch.nn.parallel.DistributedDataParallel`, shards the training windows with a
  :class:`~torch.utils.data.DistributedSampler` (gradients are averaged across processes, so
  ``N`` processes with batch ``b`` take the steps one process takes with batch ``N*b``), averages
  the epoch losses, and lets rank 0 alone write checkpoints and show progress.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from samba_pipeline.bids.derivatives import atomic_path
from samba_pipeline.errors import SambaInputError, SambaUsageError
from samba_pipeline.models.base import Batch
from samba_pipeline.training.data import collate_windows

LOGGER = logging.getLogger("samba_pipeline.training")

SCHEDULERS = ("cosine", "plateau", "none")
AMP_MODES = ("auto", "bf16", "fp16", "off")
CHECKPOINT_FORMAT = 1


@dataclass
class TrainSettings:
    """Settings of one training run (all have defaults; see the module docstring)."""

    epochs: int = 100
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-2
    #: "cosine" (per epoch, after ``warmup_epochs`` of linear warm-up, down to ``min_lr``),
    #: "plateau" (ReduceLROnPlateau on the validation loss) or "none".
    scheduler: str = "cosine"
    warmup_epochs: int = 0
    min_lr: float = 0.0
    plateau_factor: float = 0.5
    plateau_patience: int = 5
    #: Early stopping: stop after this many epochs without a validation-loss improvement
    #: larger than ``min_delta`` (0 = never stop early).
    patience: int = 15
    min_delta: float = 0.0
    #: Clip the gradient norm to this value (None or 0 = no clipping).
    grad_clip: float | None = 1.0
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    num_workers: int = 0
    progress: bool = True
    #: Shuffle the training windows every epoch (off: fixed order, e.g. to compare runs).
    shuffle: bool = True
    checkpoint_path: str | None = None
    resume: bool = True
    deterministic: bool = True

    def __post_init__(self):
        if self.scheduler not in SCHEDULERS:
            raise SambaUsageError(f"scheduler must be one of {SCHEDULERS}, not {self.scheduler!r}")
        if self.amp not in AMP_MODES:
            raise SambaUsageError(f"amp must be one of {AMP_MODES}, not {self.amp!r}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise SambaUsageError(f"device must be 'auto', 'cpu' or 'cuda[:N]', not {self.device!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise SambaUsageError("epochs and batch_size must be >= 1 and lr > 0")

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change the result (a checkpoint only resumes under the same ones)."""
        skip = {"device", "num_workers", "progress", "checkpoint_path", "resume"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


@dataclass
class TrainResult:
    """What :func:`train` returns; ``model`` holds the best-validation weights."""

    model: torch.nn.Module
    history: pd.DataFrame
    best_epoch: int
    best_val_loss: float
    epochs_run: int
    stopped_early: bool
    device: str
    amp_dtype: str | None
    best_state: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    resumed_from_epoch: int = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch, "best_val_loss": self.best_val_loss,
                "epochs_run": self.epochs_run, "stopped_early": self.stopped_early,
                "device": self.device, "amp_dtype": self.amp_dtype,
                "resumed_from_epoch": self.resumed_from_epoch, "seconds": round(self.seconds, 3)}


class TrainingStopped(Exception):
    """Raise from a callback to stop training after the epoch's checkpoint was written."""


# ---------------------------------------------------------------------------------------------
# Seeds, devices, precision
# ---------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and CUDA)."""
    random.seed(int(seed))
    np.random.seed(int(seed) % 2**32)
    torch.manual_seed(int(seed))


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"``: CUDA when present, else CPU. Asking for CUDA without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise SambaUsageError("device 'cuda' requested but no CUDA GPU is available (use --device auto/cpu)")
    return torch.device(device)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: None on CPU or with ``amp="off"``; bf16 where the GPU supports it."""
    if device.type != "cuda" or amp == "off":
        if amp in ("bf16", "fp16") and device.type != "cuda":
            LOGGER.info("mixed precision (%s) is used on CUDA only; training in float32 on %s", amp, device)
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "shuffle": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(_tuples(state["python"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["shuffle"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(obj):
    if isinstance(obj, list):
        return tuple(_tuples(x) for x in obj)
    if isinstance(obj, tuple):
        return tuple(_tuples(x) for x in obj)
    return obj


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------
def _make_scheduler(optimizer: torch.optim.Optimizer, settings: TrainSettings):
    if settings.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=settings.plateau_factor, patience=settings.plateau_patience,
            min_lr=settings.min_lr)
    if settings.scheduler == "none":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    warm, total = max(0, settings.warmup_epochs), settings.epochs
    floor = settings.min_lr / settings.lr

    def factor(epoch: int) -> float:  # epoch = number of completed epochs
        if epoch < warm:
            return (epoch + 1) / (warm + 1)
        span = max(1, total - warm)
        progress = min(1.0, (epoch - warm) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def _fingerprint(model: torch.nn.Module, settings: TrainSettings, n_train: int, n_val: int) -> str:
    payload = {
        "model": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": getattr(model, "config", {}),
        "parameters": [(k, list(v.shape)) for k, v in model.state_dict().items()],
        "settings": settings.fingerprint(), "n_train": n_train, "n_val": n_val,
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save_checkpoint(path, state: dict[str, Any]) -> Path:
    """Write a checkpoint atomically (temporary file beside it, then rename)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_checkpoint(path, map_location="cpu") -> dict[str, Any]:
    """Read a checkpoint without unpickling arbitrary objects (``weights_only=True``)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise SambaInputError(f"cannot read this checkpoint (corrupt or not a samba-bids checkpoint): {exc}",
                              path=path) from None


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
def _loader(dataset, settings: TrainSettings, *, shuffle: bool, generator=None, pin: bool = False,
            sampler=None):
    return DataLoader(dataset, batch_size=settings.batch_size, shuffle=shuffle and sampler is None,
                      generator=generator if sampler is None else None, sampler=sampler,
                      collate_fn=collate_windows, num_workers=settings.num_workers, pin_memory=pin,
                      drop_last=False, persistent_workers=False)


def _distributed() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(values: list[float], device) -> list[float]:
    """Sum floats over the processes of the group (identity without one)."""
    if _distributed()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def _evaluate_loss(model, loader, device, amp_dtype) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            batch = batch.to(device)
            with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                pred = model(Batch(source=batch.source, target=None, target_mask=batch.target_mask))
                loss = model.loss(pred.float(), batch)
            n = batch.source.shape[0]
            total += float(loss) * n
            count += n
    return total / max(count, 1)


def train(model: torch.nn.Module, train_ds, val_ds=None, settings: TrainSettings | None = None, *,
          callbacks: Sequence[Callable[[dict[str, Any]], None]] = ()) -> TrainResult:
    """Train ``model`` on ``train_ds``, select the epoch on ``val_ds``; see the module docstring.

    ``callbacks`` are called after every epoch (and after its checkpoint) with the epoch's
    history row; raising :class:`TrainingStopped` in one ends training there (as an interruption
    would) and re-raises it. Without ``val_ds`` there is no model selection: the last epoch is kept.
    """
    settings = settings or TrainSettings()
    if val_ds is not None and getattr(val_ds, "part", None) == "test":
        raise SambaUsageError(
            "the validation set is the test part: model selection must never use test windows")
    if len(train_ds) == 0:
        raise SambaInputError("the training set holds no window")
    if val_ds is not None and len(val_ds) == 0:
        raise SambaInputError("the validation set holds no window")

    device = resolve_device(settings.device)
    amp_dtype = resolve_amp(settings.amp, device)
    previous_det = (torch.are_deterministic_algorithms_enabled(),
                    torch.is_deterministic_algorithms_warn_only_enabled())
    previous_bench = torch.backends.cudnn.benchmark
    if settings.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    try:
        return _train(model, train_ds, val_ds, settings, device, amp_dtype, callbacks)
    finally:
        torch.use_deterministic_algorithms(previous_det[0], warn_only=previous_det[1])
        torch.backends.cudnn.benchmark = previous_bench


def _train(model, train_ds, val_ds, settings, device, amp_dtype, callbacks) -> TrainResult:
    t0 = time.perf_counter()
    seed_everything(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = _make_scheduler(optimizer, settings)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    pin = device.type == "cuda"
    rank, world = _distributed()
    sampler = None
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=settings.shuffle,
                                     seed=settings.seed, drop_last=False)
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=True)
    train_loader = _loader(train_ds, settings, shuffle=settings.shuffle, generator=generator, pin=pin,
                           sampler=sampler)
    val_loader = None if val_ds is None else _loader(val_ds, settings, shuffle=False, pin=pin)
    fingerprint = _fingerprint(model, settings, len(train_ds), 0 if val_ds is None else len(val_ds))

    history: list[dict[str, Any]] = []
    best_val, best_epoch, bad_epochs, start_epoch, done = math.inf, 0, 0, 0, False
    best_state = _cpu_state(model)
    ckpt_path = Path(settings.checkpoint_path) if settings.checkpoint_path else None
    if ckpt_path is not None and settings.resume and ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("format") != CHECKPOINT_FORMAT or ckpt.get("fingerprint") != fingerprint:
            raise SambaUsageError(
                "this checkpoint was written for another model, data or training settings; delete it "
                "to start afresh (or keep the settings it was written with)", path=ckpt_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        best_state = ckpt["best_state"]
        best_val, best_epoch = float(ckpt["best_val_loss"]), int(ckpt["best_epoch"])
        bad_epochs, start_epoch, done = int(ckpt["bad_epochs"]), int(ckpt["epoch"]), bool(ckpt["done"])
        history = [dict(row) for row in ckpt["history"]]
        _set_rng_state(ckpt["rng"], generator)
        LOGGER.info("resuming from %s after epoch %d", ckpt_path, start_epoch)
    resumed_from = start_epoch
    stopped_early = done and start_epoch < settings.epochs

    bar = tqdm(total=settings.epochs, initial=start_epoch, disable=not settings.progress or rank > 0,
               desc=f"training ({device.type})", unit="epoch", leave=False)
    try:
        epoch = start_epoch
        while not done and epoch < settings.epochs:
            t_epoch = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            model.train()
            if sampler is not None:
                sampler.set_epoch(epoch)
            total, count = 0.0, 0
            for batch in train_loader:
                batch = batch.to(device)
                with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32,
                                    enabled=amp_dtype is not None):
                    pred = net(batch)
                    loss = model.loss(pred.float(), batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"training diverged: the loss is {float(loss)} at epoch {epoch + 1}; "
                        "lower the learning rate or check the inputs")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if settings.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                n = batch.source.shape[0]
                total += float(loss.detach()) * n
                count += n
            total, count = _all_sum([total, float(count)], device)
            train_loss = total / max(count, 1)
            val_loss = (train_loss if val_loader is None
                        else _evaluate_loss(model, val_loader, device, amp_dtype))
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(val_loss)
            else:
                scheduler.step()
            epoch += 1
            improved = val_loss < best_val - settings.min_delta or val_loader is None
            if improved:
                best_val, best_epoch, bad_epochs = val_loss, epoch, 0
                best_state = _cpu_state(model)
            else:
                bad_epochs += 1
            if settings.patience and val_loader is not None and bad_epochs >= settings.patience:
                stopped_early = done = True
            done = done or epoch >= settings.epochs
            row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss if val_loader else math.nan,
                   "lr": lr, "best": improved, "seconds": time.perf_counter() - t_epoch}
            history.append(row)
            LOGGER.info("epoch %d/%d: train %.4f, val %.4f, lr %.2e%s", epoch, settings.epochs, train_loss,
                        row["val_loss"], lr, " *" if improved else "")
            bar.update(1)
            bar.set_postfix(train=f"{train_loss:.4f}", val=f"{row['val_loss']:.4f}", lr=f"{lr:.1e}")
            if ckpt_path is not None and rank == 0:
                save_checkpoint(ckpt_path, {
                    "format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "epoch": epoch, "done": done,
                    "model": _cpu_state(model), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                    "best_state": best_state, "best_val_loss": best_val, "best_epoch": best_epoch,
                    "bad_epochs": bad_epochs, "history": history, "rng": _rng_state(generator),
                })
            if rank == 0:
                for callback in callbacks:
                    callback(dict(row))
    finally:
        bar.close()

    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(
        model=model, history=pd.DataFrame(history, columns=["epoch", "train_loss", "val_loss", "lr", "best",
                                                            "seconds"]),
        best_epoch=best_epoch, best_val_loss=float(best_val), epochs_run=len(history),
        stopped_early=stopped_early, device=str(device),
        amp_dtype=None if amp_dtype is None else str(amp_dtype).replace("torch.", ""),
        best_state=copy.copy(best_state), resumed_from_epoch=resumed_from,
        seconds=time.perf_counter() - t0,
    )
