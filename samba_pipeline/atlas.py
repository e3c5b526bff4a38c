"""Atlas resolution: TemplateFlow names, or a dseg NIfTI with its dseg.tsv label table.

TemplateFlow is used strictly offline: the file must already be in the local cache
(``TEMPLATEFLOW_HOME``; ``TEMPLATEFLOW_AUTOUPDATE=0``). Its client tries to download a file
missing from the cache and fails with a bare connection error; samba-bids catches that and fails
fast, naming the missing file and how to pre-fetch it or pass a path instead.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd

from samba_pipeline.config import AtlasSpec
from samba_pipeline.errors import SambaInputError, SambaMissingInputError

LOGGER = logging.getLogger("samba_pipeline.atlas")

_SCHAEFER_NAME = re.compile(r"^(?:\d+Networks_)?(?P<hemi>LH|RH)_(?P<network>[A-Za-z]+)(?:_.*)?$")


@dataclass
class Atlas:
    """A resolved atlas: the dseg image, its label table and its BIDS identity."""

    image: Path
    table: Path
    labels: pd.DataFrame  # index, name, network, hemisphere, region (+ any extra columns)
    entities: dict[str, str]
    template: str
    spec: AtlasSpec
    extra: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return self.labels["name"].tolist()

    def __len__(self) -> int:
        return len(self.labels)


def templateflow_query(spec: AtlasSpec) -> dict:
    """The TemplateFlow query for a named atlas (Schaefer2018 uses its ``desc`` convention)."""
    query = {"atlas": spec.name, "suffix": "dseg"}
    if spec.name == "Schaefer2018":
        query["desc"] = f"{spec.parcels}Parcels{spec.networks}Networks"
    return query


def templateflow_filenames(spec: AtlasSpec) -> tuple[str, str]:
    """TemplateFlow's own file names of the atlas image and label table (for messages)."""
    q = templateflow_query(spec)
    desc = f"_desc-{q['desc']}" if "desc" in q else ""
    base = f"tpl-{spec.template}"
    image = f"{base}/{base}_res-{spec.resolution:02d}_atlas-{spec.name}{desc}_dseg.nii.gz"
    table = f"{base}/{base}_atlas-{spec.name}{desc}_dseg.tsv"
    return image, table


def resolve_atlas(spec: AtlasSpec) -> Atlas:
    """Locate and validate the atlas ``spec`` names. Never downloads anything."""
    if spec.is_templateflow:
        image, table = _from_templateflow(spec)
    else:
        image = Path(spec.path)
        if not image.is_file():
            raise SambaMissingInputError("atlas image does not exist", path=image)
        table = find_label_table(image)
    labels = read_label_table(table)
    check_atlas_image(image, labels)
    return Atlas(image=image, table=table, labels=labels, entities=spec.entities(),
                 template=spec.template, spec=spec)


def _from_templateflow(spec: AtlasSpec) -> tuple[Path, Path]:
    image_name, table_name = templateflow_filenames(spec)
    hint = (
        f"it is not in the local TemplateFlow cache. Pre-fetch it where there is network, e.g. "
        f"python -c \"import templateflow.api as t; t.get('{spec.template}', "
        + ", ".join(f"{k}='{v}'" for k, v in templateflow_query(spec).items())
        + f", resolution={spec.resolution})\" (and the .tsv), then point --templateflow-home or "
        "TEMPLATEFLOW_HOME at the cache, or pass the dseg NIfTI path to the atlas option"
    )
    try:
        import templateflow.api as tflow
        from templateflow.conf import TF_HOME
    except Exception as exc:  # pragma: no cover - broken installation
        raise SambaMissingInputError(f"TemplateFlow is not usable ({exc}); {hint}") from None
    image_path = Path(TF_HOME) / image_name
    table_path = Path(TF_HOME) / table_name

    def fetch(extension: str, **extra) -> Path | None:
        try:
            found = tflow.get(spec.template, extension=extension, raise_empty=False,
                              **templateflow_query(spec), **extra)
        except Exception:  # the client reaches for the network and fails: no network here
            return None
        if isinstance(found, list):
            found = found[0] if len(found) == 1 else None
        return Path(found) if found and Path(found).is_file() and Path(found).stat().st_size else None

    image = fetch(".nii.gz", resolution=spec.resolution) or (image_path if image_path.is_file() else None)
    if image is None:
        raise SambaMissingInputError(f"atlas {spec.label()}: {hint}", path=image_path)
    table = fetch(".tsv") or (table_path if table_path.is_file() else None)
    if table is None:
        try:
            table = find_label_table(image)
        except SambaMissingInputError:
            raise SambaMissingInputError(f"atlas label table of {spec.label()}: {hint}",
                                         path=table_path) from None
    return image, table


def find_label_table(image: Path) -> Path:
    """The dseg.tsv of a dseg NIfTI: same stem, or the stem without ``res-``/``den-`` entities."""
    stem = re.sub(r"\.nii(\.gz)?$", "", image.name)
    candidates = [image.with_name(stem + ".tsv"),
                  image.with_name(re.sub(r"_(res|den)-[a-zA-Z0-9]+", "", stem) + ".tsv")]
    for cand in candidates:
        if cand.is_file():
            return cand
    raise SambaMissingInputError(
        f"atlas label table missing: expected {candidates[0].name} beside the atlas image", path=image
    )


def read_label_table(path: Path) -> pd.DataFrame:
    """Read a dseg.tsv (``index`` and ``name`` columns required) and add region columns."""
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except OSError as exc:
        raise SambaMissingInputError(f"cannot read atlas label table: {exc.strerror}", path=path) from None
    except UnicodeDecodeError:
        raise SambaInputError("atlas label table is not UTF-8 text", path=path) from None
    from io import StringIO

    try:
        table = pd.read_csv(StringIO(text), sep="\t", dtype={"name": str})
    except Exception as exc:  # pandas' parser errors have many types
        raise SambaInputError(f"cannot parse atlas label table: {exc}", path=path) from None
    missing = {"index", "name"} - set(table.columns)
    if missing:
        raise SambaInputError(
            f"atlas label table needs columns 'index' and 'name' (missing: {', '.join(sorted(missing))})",
            path=path,
        )
    table = table[table["index"] != 0].copy()
    if table["index"].duplicated().any():
        dups = table.loc[table["index"].duplicated(), "index"].tolist()
        raise SambaInputError(f"atlas label table repeats index values {dups[:5]}", path=path)
    table["index"] = table["index"].astype(int)
    table["name"] = table["name"].astype(str)
    parsed = table["name"].str.extract(_SCHAEFER_NAME)
    if "hemisphere" not in table:
        table["hemisphere"] = parsed["hemi"]
    if "network" not in table:
        table["network"] = parsed["network"]
    if "region" not in table:
        ok = table["hemisphere"].notna() & table["network"].notna()
        table["region"] = np.where(ok, table["hemisphere"].astype(str) + "_" + table["network"].astype(str),
                                   None)
    return table.sort_values("index").reset_index(drop=True)


def check_atlas_image(image: Path, labels: pd.DataFrame) -> None:
    """The image must be a 3-D integer label map whose labels are all in the table."""
    try:
        img = nb.load(str(image))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise SambaInputError(f"cannot read atlas image: {exc}", path=image) from None
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise SambaInputError(f"atlas image must be 3-D, it has shape {data.shape}", path=image)
    if not np.allclose(data, np.round(data)):
        raise SambaInputError("atlas image holds non-integer values (not a dseg label map)", path=image)
    present = set(np.unique(data.astype(np.int64)).tolist()) - {0}
    if not present:
        raise SambaInputError("atlas image holds no labels", path=image)
    unknown = sorted(present - set(labels["index"].tolist()))
    if unknown:
        raise SambaInputError(
            f"atlas image has labels missing from its table: {unknown[:10]}", path=image
        )
    absent = sorted(set(labels["index"].tolist()) - present)
    if absent:
        LOGGER.warning("%s: %d labels of the table do not occur in the image (%s ...)",
                       image, len(absent), absent[:5])
