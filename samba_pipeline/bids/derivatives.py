"""Writing the samba-bids derivatives dataset.

File names come from the pybids-style path patterns in ``bids_specs/samba_bids_config.json``;
every file is written atomically (temporary file in the same folder, then ``os.replace``), so an
interrupted run never leaves a half-written output behind. Shared top-level files
(``dataset_description.json``, ``.bidsignore``) are written under a file lock so that parallel
participant jobs on one output folder cannot clash.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
from bids.layout.writing import build_path
from filelock import SoftFileLock

from samba_pipeline.__about__ import __citation__, __url__, __version__
from samba_pipeline.bids_specs import spec_path
from samba_pipeline.errors import SambaOutputError

PIPELINE_NAME = "samba-bids"
BIDS_VERSION = "1.10.0"


def _patterns() -> list[str]:
    return json.loads(spec_path("samba_bids_config.json").read_text())["default_path_patterns"]


def derivative_path(root: str | os.PathLike, **entities: Any) -> Path:
    """The path of a derivative with these entities, following samba-bids' naming rules."""
    ents = {k: v for k, v in entities.items() if v not in (None, "")}
    relative = build_path(ents, _patterns(), strict=False)
    if relative is None:
        raise ValueError(f"no samba-bids naming rule matches the entities {ents}")
    return Path(root) / relative


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SambaOutputError(f"cannot create the output folder: {exc.strerror}", path=path.parent) from None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, path)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise SambaOutputError(f"cannot write output: {exc.strerror or exc}", path=path) from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, data: dict) -> Path:
    return write_text(path, json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n")


def write_tsv(path: str | os.PathLike, table: pd.DataFrame, *, index: bool = False) -> Path:
    """Write a TSV (``n/a`` for missing values); ``.tsv.gz`` is gzipped reproducibly (mtime 0)."""
    buf = io.StringIO()
    table.to_csv(buf, sep="\t", na_rep="n/a", index=index, float_format="%.8g", lineterminator="\n")
    data = buf.getvalue().encode("utf-8")
    if str(path).endswith(".gz"):
        out = io.BytesIO()
        with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, filename="") as gz:
            gz.write(data)
        data = out.getvalue()
    return write_bytes(path, data)


def read_tsv(path: str | os.PathLike) -> pd.DataFrame:
    """Read a BIDS TSV (optionally gzipped) with ``n/a`` as missing."""
    return pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)


def copy_file(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dest)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


# --------------------------------------------------------------------------------------------
# Dataset-level files
# --------------------------------------------------------------------------------------------
def dataset_description(
    *,
    config_hash: str,
    bids_dir: str | os.PathLike,
    derivatives: dict[str, str],
    templateflow_home: str | None = None,
    container: dict | None = None,
) -> dict[str, Any]:
    """The ``dataset_description.json`` content of the samba-bids derivatives."""
    generated = {
        "Name": PIPELINE_NAME,
        "Version": __version__,
        "CodeURL": __url__,
        "Description": "EEG/MEG and fMRI parcellation, alignment, graphs and translation models",
        "ConfigurationHash": config_hash,
    }
    if container:
        generated["Container"] = container
    generated_by = [generated]
    source_datasets = []
    raw_desc = _read_description(Path(bids_dir))
    if raw_desc.get("DatasetDOI"):
        source_datasets.append({"DOI": raw_desc["DatasetDOI"]})
    links = {"raw": str(Path(bids_dir).absolute())}
    for name, path in sorted(derivatives.items()):
        links[name] = str(path)
        deriv_desc = _read_description(Path(path))
        for entry in deriv_desc.get("GeneratedBy", []) or []:
            if isinstance(entry, dict) and entry.get("Name"):
                generated_by.append(entry)
        source_datasets.append({"URL": f"bids:{name}:", "Version": _first_version(deriv_desc)})
    source_datasets.insert(0, {"URL": "bids:raw:"})
    if templateflow_home:
        links["templateflow"] = str(templateflow_home)
    desc: dict[str, Any] = {
        "Name": f"{PIPELINE_NAME} derivatives of {raw_desc.get('Name', Path(bids_dir).name)}",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": generated_by,
        "SourceDatasets": [{k: v for k, v in s.items() if v} for s in source_datasets],
        "DatasetLinks": links,
        "HowToAcknowledge": __citation__,
    }
    if raw_desc.get("License"):
        desc["License"] = raw_desc["License"]
    return desc


def _read_description(root: Path) -> dict:
    try:
        data = json.loads((root / "dataset_description.json").read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _first_version(desc: dict) -> str | None:
    for entry in desc.get("GeneratedBy", []) or []:
        if isinstance(entry, dict) and entry.get("Version"):
            return str(entry["Version"])
    return None


_README = """# samba-bids derivatives

Written by samba-bids {version}: preprocessed and parcellated EEG/MEG and fMRI time series on one
timeline, their connectivity graphs (``*_relmat.tsv``), the alignment of each EEG/MEG-fMRI pair
(``*_alignment.json``), the model-window index (``*_windows.tsv``) and the atlases used
(``sourcedata/atlases``). ``dataset_description.json`` records the inputs and the configuration
hash; ``sub-*/log/<run>/samba-bids.toml`` holds the options of each run.
"""


class ConfigurationMismatch(SambaOutputError):
    """The output folder holds results of another samba-bids configuration."""


def initialise_output_dir(output_dir: str | os.PathLike, description: dict[str, Any]) -> None:
    """Write ``dataset_description.json``, ``.bidsignore`` and pybids' ``layout_config.json``.

    Runs under a lock in the output folder. If the folder already holds samba-bids results made
    with a different configuration (``ConfigurationHash``), refuse to mix them.
    """
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SambaOutputError(f"cannot create the output folder: {exc.strerror}", path=out) from None
    if not os.access(out, os.W_OK):
        raise SambaOutputError("the output folder is not writable", path=out)
    lock = SoftFileLock(str(out / ".samba-bids.lock"), timeout=120)
    with lock:
        desc_file = out / "dataset_description.json"
        existing = _read_description(out)
        if existing:
            old = next((g for g in existing.get("GeneratedBy", []) if isinstance(g, dict)
                        and g.get("Name") == PIPELINE_NAME), None)
            new_hash = description["GeneratedBy"][0]["ConfigurationHash"]
            if old and old.get("ConfigurationHash") not in (None, new_hash):
                raise ConfigurationMismatch(
                    "this output folder holds samba-bids results made with another configuration "
                    f"(hash {old.get('ConfigurationHash')}, now {new_hash}); use a new output folder",
                    path=desc_file,
                )
        if existing != json.loads(json.dumps(_jsonable(description))):
            write_json(desc_file, description)
        write_text(out / ".bidsignore", spec_path("bidsignore").read_text())
        if not (out / "README.md").is_file():
            write_text(out / "README.md", _README.format(version=__version__))
        write_bytes(out / "layout_config.json", spec_path("samba_bids_config.json").read_bytes())
