"""Model files for users: weights in safetensors, everything needed to rebuild the model in JSON.

``save_model(prefix, model)`` writes ``<prefix>.safetensors`` (the weights) and ``<prefix>.json``
(the plugin name and version, its config, the :class:`~samba_pipeline.models.base.DataDims`, and
any ``metadata`` such as the z-scoring statistics, the split, the training history summary and the
metrics). ``load_model(prefix)`` rebuilds the model through the plugin registry and loads the
weights; nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model as _st_load_model
from safetensors.torch import save_model as _st_save_model

from samba_pipeline.bids.derivatives import atomic_path, write_json
from samba_pipeline.errors import SambaInputError, SambaMissingInputError
from samba_pipeline.models.base import DataDims, TranslationModel
from samba_pipeline.models.registry import get_model_class

MODEL_FILE_FORMAT = 1


def _paths(prefix) -> tuple[Path, Path]:
    prefix = str(prefix)
    for ext in (".safetensors", ".json"):
        if prefix.endswith(ext):
            prefix = prefix[: -len(ext)]
    return Path(prefix + ".safetensors"), Path(prefix + ".json")


def save_model(prefix, model: TranslationModel, *, plugin: str | None = None,
               metadata: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write ``<prefix>.safetensors`` + ``<prefix>.json`` atomically; returns both paths.

    ``plugin`` is the registry name to rebuild the model with (default ``model.plugin_name``).
    """
    weights, card = _paths(prefix)
    name = plugin or getattr(model, "plugin_name", "")
    if not name:
        raise ValueError("the model has no plugin_name; pass plugin=<registry name>")
    with atomic_path(weights) as tmp:
        _st_save_model(model, str(tmp), metadata={"format": "pt", "plugin": name})
    write_json(card, {
        "ModelFileFormat": MODEL_FILE_FORMAT,
        "Plugin": name,
        "PluginVersion": getattr(model, "plugin_version", "0"),
        "Config": dict(getattr(model, "config", {})),
        "Dims": model.dims.to_dict(),
        "Weights": weights.name,
        **({"Metadata": metadata} if metadata else {}),
    })
    return {"weights": weights, "card": card}


def read_model_card(prefix) -> dict[str, Any]:
    _, card = _paths(prefix)
    if not card.is_file():
        raise SambaMissingInputError("model card not found", path=card)
    try:
        return json.loads(card.read_text())
    except (OSError, ValueError) as exc:
        raise SambaInputError(f"cannot read the model card: {exc}", path=card) from None


def load_model(prefix, *, device: str | torch.device = "cpu") -> TranslationModel:
    """Rebuild a model saved by :func:`save_model` (registry + config + dims) and load its weights."""
    weights, card_path = _paths(prefix)
    card = read_model_card(prefix)
    if not weights.is_file():
        raise SambaMissingInputError("model weights not found", path=weights)
    try:
        cls = get_model_class(card["Plugin"])
        model = cls.build(card.get("Config", {}), DataDims.from_dict(card["Dims"]))
    except KeyError as exc:
        raise SambaInputError(f"model card lacks {exc}", path=card_path) from None
    try:
        _st_load_model(model, str(weights), strict=True, device=str(device))
    except Exception as exc:  # safetensors raises several types for bad files / mismatched keys
        raise SambaInputError(f"weights do not fit the model described by {card_path.name}: {exc}",
                              path=weights) from None
    model.to(device)
    model.eval()
    return model
