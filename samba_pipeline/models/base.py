"""The model-plugin protocol every translation model follows.

A plugin is a :class:`torch.nn.Module` subclass registered under a name in the
``samba_bids.models`` entry-point group (see :mod:`samba_pipeline.models.registry`). The trainer
and the pipeline only use the small surface defined here:

``build(config, dims)``
    a classmethod: construct the model from its settings and the data dimensions
    (:class:`DataDims`), which are derived from the data, never hard-coded.
``forward(batch)``
    predictions for a :class:`Batch`; shape ``[B, n_target, T_target]``.
``loss(prediction, batch)``
    a scalar tensor to minimise.
``interpretation()``
    what the report and the derivatives show (learned HRFs, attention weights ...), as plain
    numpy arrays / pandas tables keyed by name.

Directions are ``"ephys2fmri"`` (source = EEG/MEG, target = fMRI) and ``"fmri2ephys"``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

DIRECTIONS = ("ephys2fmri", "fmri2ephys")


@dataclass
class DataDims:
    """Dimensions and static structure of the data a model is built for.

    Time axes: the source series has ``source_len`` samples at ``source_sfreq`` Hz and the
    target series ``target_len`` samples at ``target_sfreq`` Hz over the same window of
    ``window_s`` seconds (for fMRI, ``sfreq = 1 / TR``).
    """

    direction: str
    n_source: int
    n_target: int
    source_sfreq: float
    target_sfreq: float
    window_s: float
    source_names: list[str] = field(default_factory=list)
    target_names: list[str] = field(default_factory=list)
    # [n_source, n_source] and [n_target, n_target] cosine-similarity graphs (group means).
    source_graph: np.ndarray | None = None
    target_graph: np.ndarray | None = None
    # [n_ephys_parcels (fine), n_..]: region_map[i, j] = 1 when coarse node j feeds fine node i.
    # For ephys2fmri rows are target (fMRI) parcels and columns source (ephys) nodes; None means
    # every source node may feed every target node (e.g. sensor-space EEG).
    region_map: np.ndarray | None = None

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, not {self.direction!r}")
        for name in ("n_source", "n_target"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be positive")

    @property
    def source_len(self) -> int:
        return int(round(self.window_s * self.source_sfreq))

    @property
    def target_len(self) -> int:
        return int(round(self.window_s * self.target_sfreq))

    @property
    def tr(self) -> float:
        """Repetition time of the fMRI side (s)."""
        fmri_sfreq = self.target_sfreq if self.direction == "ephys2fmri" else self.source_sfreq
        return 1.0 / fmri_sfreq

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly (arrays as nested lists) for model cards."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, np.ndarray):
                out[key] = value.tolist()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DataDims":
        data = dict(data)
        for key in ("source_graph", "target_graph", "region_map"):
            if data.get(key) is not None:
                data[key] = np.asarray(data[key], dtype=float)
        return cls(**data)


@dataclass
class Batch:
    """One batch of aligned windows.

    ``source``: ``[B, n_source, source_len]``; ``target``: ``[B, n_target, target_len]`` (needed
    for training losses and teacher forcing; may be None at inference); ``target_mask``:
    ``[n_target]`` bool, False for target nodes without valid data (e.g. low-coverage parcels).
    """

    source: torch.Tensor
    target: torch.Tensor | None = None
    target_mask: torch.Tensor | None = None

    def to(self, device) -> "Batch":
        return Batch(
            source=self.source.to(device),
            target=None if self.target is None else self.target.to(device),
            target_mask=None if self.target_mask is None else self.target_mask.to(device),
        )


class TranslationModel(nn.Module):
    """Base class of model plugins (subclass it, set ``plugin_name`` and implement the API)."""

    plugin_name: ClassVar[str] = ""
    plugin_version: ClassVar[str] = "0"
    directions: ClassVar[tuple[str, ...]] = DIRECTIONS

    def __init__(self, config: dict[str, Any], dims: DataDims):
        super().__init__()
        if dims.direction not in self.directions:
            raise ValueError(
                f"model {self.plugin_name!r} supports {self.directions}, not {dims.direction!r}"
            )
        self.config = dict(config)
        self.dims = dims

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        return {}

    @classmethod
    def build(cls, config: dict[str, Any] | None, dims: DataDims) -> "TranslationModel":
        merged = cls.default_config()
        unknown = set(config or {}) - set(merged)
        if unknown:
            raise ValueError(f"unknown setting(s) for model {cls.plugin_name!r}: {sorted(unknown)}")
        merged.update(config or {})
        return cls(merged, dims)

    def forward(self, batch: Batch) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, prediction: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Default: the seed paper's cosine loss over time, averaged over valid targets."""
        return cosine_loss(prediction, batch.target, batch.target_mask)

    def interpretation(self) -> dict[str, Any]:
        return {}


def cosine_loss(prediction: torch.Tensor, target: torch.Tensor,
                mask: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """1 - cosine similarity of each node's series (last axis), averaged over valid nodes."""
    num = (prediction * target).sum(-1)
    den = prediction.norm(dim=-1) * target.norm(dim=-1) + eps
    loss = 1.0 - num / den  # [B, n_nodes]
    if mask is not None:
        m = mask.to(loss.dtype).expand_as(loss)
        return (loss * m).sum() / m.sum().clamp_min(1.0)
    return loss.mean()
