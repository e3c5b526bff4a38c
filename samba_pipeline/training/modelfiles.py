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
from samba_pipeline.errors import SambaError, SambaInputError, SambaMissingInputError
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


#: Keys a model card may hold (format 1); anything else means the file is not ours.
CARD_KEYS = {"ModelFileFormat", "Plugin", "PluginVersion", "Config", "Dims", "Weights", "Metadata"}
#: Bounds on the dimensions a card may declare, far above any real recording or atlas: a card
#: asking for more would make the model allocate gigabytes before its weights are even checked.
MAX_NODES = 100_000
MAX_WINDOW_SAMPLES = 10_000_000
#: The safetensors JSON header is small; a bigger length prefix means the file is something else.
MAX_HEADER_BYTES = 100_000_000


def read_model_card(prefix) -> dict[str, Any]:
    """The JSON card of a model file, checked (keys, format, plugin name, dimensions)."""
    _, card = _paths(prefix)
    if not card.is_file():
        raise SambaMissingInputError("model card not found", path=card)
    try:
        data = json.loads(card.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SambaInputError(f"cannot read the model card: {exc}", path=card) from None
    check_model_card(data, card)
    return data


def check_model_card(card: Any, path) -> None:
    """Refuse a card that samba-bids did not write, or whose dimensions are implausible."""
    if not isinstance(card, dict):
        raise SambaInputError("model card must hold a JSON object", path=path)
    unknown = sorted(set(card) - CARD_KEYS)
    if unknown:
        raise SambaInputError(f"model card has unexpected key(s) {', '.join(unknown)}: not a samba-bids "
                              "model file", path=path)
    missing = [key for key in ("ModelFileFormat", "Plugin", "Dims") if key not in card]
    if missing:
        raise SambaInputError(f"model card lacks {', '.join(missing)}", path=path)
    if card["ModelFileFormat"] != MODEL_FILE_FORMAT:
        raise SambaInputError(f"model file format {card['ModelFileFormat']!r} is not supported (this "
                              f"samba-bids reads format {MODEL_FILE_FORMAT})", path=path)
    if not isinstance(card["Plugin"], str) or not isinstance(card.get("Config", {}), dict):
        raise SambaInputError("model card: Plugin must be a name and Config an object", path=path)
    dims = card["Dims"]
    if not isinstance(dims, dict):
        raise SambaInputError("model card: Dims must be an object", path=path)
    try:
        for key in ("n_source", "n_target"):
            value = dims[key]
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_NODES:
                raise SambaInputError(f"model card: Dims.{key}={value!r} is not a node count in "
                                      f"[1, {MAX_NODES}]", path=path)
        for key in ("source_sfreq", "target_sfreq", "window_s"):
            value = dims[key]
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1e6:
                raise SambaInputError(f"model card: Dims.{key}={value!r} is not a positive number",
                                      path=path)
        samples = max(dims["source_sfreq"], dims["target_sfreq"]) * dims["window_s"]
    except KeyError as exc:
        raise SambaInputError(f"model card: Dims lacks {exc}", path=path) from None
    if samples > MAX_WINDOW_SAMPLES:
        raise SambaInputError(f"model card: a window of {samples:.0f} samples is implausibly long", path=path)


def check_weights_file(path: Path) -> None:
    """The weights must be a safetensors file (8-byte header length, JSON header): refuse anything
    else, notably a pickle, before a model is built for it. Nothing is ever unpickled."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fobj:
            head = fobj.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= n <= min(size - 8, MAX_HEADER_BYTES):
                raise ValueError
            header = json.loads(fobj.read(n).decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError
    except OSError as exc:
        raise SambaMissingInputError(f"cannot read the model weights: {exc.strerror}", path=path) from None
    except ValueError:  # also JSON and UTF-8 decoding errors
        kind = " (it looks like a zip/pickle archive, e.g. a torch.save file)" if head[:2] in (
            b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") else ""
        raise SambaInputError(f"not a safetensors file{kind}; samba-bids loads weights from "
                              "safetensors only and never unpickles", path=path) from None


def load_model(prefix, *, device: str | torch.device = "cpu") -> TranslationModel:
    """Rebuild a model saved by :func:`save_model` (registry + config + dims) and load its weights."""
    weights, card_path = _paths(prefix)
    card = read_model_card(prefix)
    if not weights.is_file():
        raise SambaMissingInputError("model weights not found", path=weights)
    check_weights_file(weights)
    try:
        cls = get_model_class(card["Plugin"])
    except SambaError as exc:
        raise SambaInputError(f"the model card names an unavailable plugin: {exc.message}",
                              path=card_path) from None
    try:
        model = cls.build(card.get("Config", {}), DataDims.from_dict(card["Dims"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise SambaInputError(f"the model card does not describe a buildable {card['Plugin']} model "
                              f"({type(exc).__name__}: {exc})", path=card_path) from None
    try:
        _st_load_model(model, str(weights), strict=True, device=str(device))
    except Exception as exc:  # safetensors raises several types for bad files / mismatched keys
        raise SambaInputError(f"weights do not fit the model described by {card_path.name}: {exc}",
                              path=weights) from None
    model.to(device)
    model.eval()
    return model
