"""SAMBA (Afrasiyabi et al., 2024): spatiotemporal alignment of multimodal brain activity.

Modules: :mod:`.hrf` (per-parcel double-gamma HRFs, FFT convolution), :mod:`.wavelet`
(differentiable DWT / inverse DWT on PyWavelets' filters), :mod:`.graph` (sparse cosine graphs,
batched GATv2, region-masked maps), :mod:`.ele2hemo` (EEG/MEG -> fMRI,
:class:`~.ele2hemo.SambaEphys2Fmri`) and :mod:`.hemo2ele` (fMRI -> EEG/MEG,
:class:`~.hemo2ele.SambaFmri2Ephys`).

The ``samba`` plugin of the registry is :class:`Samba`, which serves both directions:
``Samba.build(config, dims)`` builds the model of ``dims.direction``. The direction modules are
imported only then, so the entry point stays cheap to discover.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from samba_pipeline.models.base import DIRECTIONS, DataDims, TranslationModel

_IMPLEMENTATIONS = {
    "ephys2fmri": ("samba_pipeline.models.samba.ele2hemo", "SambaEphys2Fmri"),
    "fmri2ephys": ("samba_pipeline.models.samba.hemo2ele", "SambaFmri2Ephys"),
}


class Samba(TranslationModel):
    """Registry entry of SAMBA for both directions (a factory: it is never instantiated).

    * ``Samba.build(config, dims)`` returns a :class:`~.ele2hemo.SambaEphys2Fmri` or a
      :class:`~.hemo2ele.SambaFmri2Ephys` according to ``dims.direction``; the settings are
      checked against that model's :meth:`default_config`.
    * ``config`` may hold one section per direction (``{"hidden_size": 16, "fmri2ephys":
      {"target": "envelope"}, "ephys2fmri": {"front_end": "paper"}}``): the section of the
      direction built overrides the top-level settings, the other one is ignored. The model keeps
      the flat settings it was built with (that is what the model card stores).
    * ``Samba.default_config(direction)``: the defaults of one direction (``ephys2fmri`` when
      none is given); :meth:`default_configs` gives both.
    """

    plugin_name = "samba"
    plugin_version = "1"
    directions = DIRECTIONS

    def __init__(self, config: dict[str, Any], dims: DataDims):  # pragma: no cover - guard
        raise TypeError("Samba is a factory: use Samba.build(config, dims)")

    @classmethod
    def implementation(cls, direction: str) -> type[TranslationModel]:
        """The model class of ``direction``."""
        if direction not in _IMPLEMENTATIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
        module, name = _IMPLEMENTATIONS[direction]
        return getattr(import_module(module), name)

    @classmethod
    def default_config(cls, direction: str | None = None) -> dict[str, Any]:
        return cls.implementation(direction or "ephys2fmri").default_config()

    @classmethod
    def default_configs(cls) -> dict[str, dict[str, Any]]:
        return {direction: cls.default_config(direction) for direction in DIRECTIONS}

    @classmethod
    def build(cls, config: dict[str, Any] | None, dims: DataDims) -> TranslationModel:
        config = dict(config or {})
        sections = {d: config.pop(d) for d in DIRECTIONS if d in config}
        for direction, section in sections.items():
            if not isinstance(section, dict):
                raise ValueError(f"the {direction!r} section of the samba settings must be a table")
        config.update(sections.get(dims.direction, {}))
        return cls.implementation(dims.direction).build(config, dims)
