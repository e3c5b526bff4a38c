"""Group-level summaries of the participant derivatives (pure functions).

The group level reads what the participant runs wrote into the output folder: a QC table with
one row per run (alignment, bad channels, motion, parcel coverage) and the group-mean
connectivity graphs of each modality.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from samba_pipeline.bids.derivatives import read_tsv
from samba_pipeline.errors import SambaMissingInputError

_ENTITY = re.compile(r"(sub|ses|task|run)-([a-zA-Z0-9]+)")


def _entities(path: Path) -> dict[str, str]:
    names = {"sub": "subject", "ses": "session", "task": "task", "run": "run"}
    return {names[k]: v for k, v in _ENTITY.findall(path.name)}


def qc_table(output_dir: str | Path) -> pd.DataFrame:
    """One row per participant run found in ``output_dir`` (alignment + QC figures)."""
    out = Path(output_dir)
    rows = []
    for alignment in sorted(out.glob("sub-*/**/sub-*_alignment.json")):
        ents = _entities(alignment)
        info = json.loads(alignment.read_text())
        row = dict(ents)
        row.update({
            "alignment_method": info.get("method"),
            "offset_s": info.get("offset_s"),
            "n_volumes_kept": info.get("n_volumes_kept"),
            "duration_s": info.get("duration_s"),
        })
        stem = alignment.name.replace("_alignment.json", "")
        subdir = alignment.parent
        channels = list(subdir.glob(f"*/{stem}_desc-preproc_channels.tsv"))
        if channels:
            table = read_tsv(channels[0])
            bad = table.loc[table["status"] == "bad", "name"].tolist()
            row["n_bad_channels"] = len(bad)
            row["bad_channels"] = ",".join(bad) if bad else "n/a"
        qc = list(subdir.glob(f"func/{stem}_desc-confounds_qc.json"))
        if qc:
            conf = json.loads(qc[0].read_text())
            row["confound_strategy"] = conf.get("strategy")
            row["mean_fd"] = conf.get("mean_fd")
            row["high_motion_fraction"] = conf.get("high_motion_fraction", conf.get("fraction"))
            row["n_parcels_below_coverage"] = conf.get("n_parcels_below_coverage")
        rows.append(row)
    if not rows:
        raise SambaMissingInputError(
            "no participant-level results found; run the participant level first", path=out)
    return pd.DataFrame(rows)


def mean_relmats(output_dir: str | Path) -> dict[str, pd.DataFrame]:
    """Group-mean cosine graphs, keyed by the file name with subject/session/run removed."""
    out = Path(output_dir)
    groups: dict[str, list[pd.DataFrame]] = {}
    for path in sorted(out.glob("sub-*/**/sub-*_stat-cosine_relmat.tsv")):
        key = re.sub(r"(sub|ses|run)-[a-zA-Z0-9]+_", "", path.name)
        groups.setdefault(key, []).append(read_tsv(path).set_index("Node"))
    means = {}
    for key, tables in groups.items():
        nodes = tables[0].index
        if any(not t.index.equals(nodes) for t in tables):
            continue  # different node sets (e.g. other channels): not averaged
        stack = np.stack([t.to_numpy(dtype=float) for t in tables])
        with np.errstate(invalid="ignore"):
            mean = np.nanmean(stack, axis=0) if np.isfinite(stack).any() else stack[0]
        table = pd.DataFrame(mean, index=nodes, columns=tables[0].columns).reset_index()
        table.attrs["n_runs"] = len(tables)
        means[key] = table
    return means
