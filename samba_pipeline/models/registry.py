"""Model registry: plugins come from the ``samba_bids.models`` entry-point group.

A third party adds a model without editing samba-bids by declaring, in its own package::

    [project.entry-points."samba_bids.models"]
    mymodel = "mypackage.module:MyModel"

where ``MyModel`` subclasses :class:`samba_pipeline.models.base.TranslationModel`.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from samba_pipeline.errors import SambaUsageError
from samba_pipeline.models.base import TranslationModel

GROUP = "samba_bids.models"
_EXTRA: dict[str, type[TranslationModel]] = {}


def register(name: str, cls: type[TranslationModel]) -> None:
    """Register a model class at run time (tests, notebooks); entry points are preferred."""
    if not (isinstance(cls, type) and issubclass(cls, TranslationModel)):
        raise TypeError(f"{cls!r} is not a TranslationModel subclass")
    _EXTRA[name] = cls


def available_models() -> dict[str, object]:
    """Name -> entry point (or class) of every known model."""
    found: dict[str, object] = {ep.name: ep for ep in entry_points(group=GROUP)}
    found.update(_EXTRA)
    return found


def get_model_class(name: str) -> type[TranslationModel]:
    models = available_models()
    if name not in models:
        raise SambaUsageError(
            f"unknown model {name!r}; available: {', '.join(sorted(models)) or 'none'}"
        )
    item = models[name]
    cls = item if isinstance(item, type) else item.load()
    if not (isinstance(cls, type) and issubclass(cls, TranslationModel)):
        raise SambaUsageError(f"model plugin {name!r} ({cls!r}) is not a TranslationModel subclass")
    return cls
