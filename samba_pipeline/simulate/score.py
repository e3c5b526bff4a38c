"""Score predicted fMRI against the demo's noise-free ground truth.

``python -m samba_pipeline.simulate.score OUT TRUTH_DIR`` prints, for every predicted fMRI parcel
series in the derivatives folder ``OUT`` (``*_desc-<model>_stat-mean_predicted.tsv``), its
correlation with the simulated noise-free BOLD (``bold_clean`` of ``TRUTH_DIR/sub-XX/
sub-XX_task-T_truth.npz``), averaged over parcels: Pearson over the whole run, and Spearman in
60 s / 15 s windows (the model metrics). Predictions start at the first acquired volume (the
first scanner trigger), as the truth does.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from samba_pipeline.errors import SambaMissingInputError
from samba_pipeline.training.metrics import DEFAULT_LENGTHS, pearson, score


def compare_with_truth(pred_tsv, truth_npz, atlas_table) -> dict:
    """Correlations of one predicted fMRI parcel series with the noise-free truth."""
    pred = pd.read_csv(pred_tsv, sep="\t")
    table = pd.read_csv(atlas_table, sep="\t")
    index = {str(n): int(i) for i, n in zip(table["index"], table["name"])}
    truth = np.load(truth_npz)["bold_clean"]  # [volumes, fine parcels], column j = atlas index j + 1
    cols = [index[str(c)] - 1 for c in pred.columns]
    n = min(len(pred), truth.shape[0])
    p = pred.to_numpy(float)[:n].T
    t = truth[:n, cols].T
    meta_path = Path(str(pred_tsv).replace(".tsv", ".json"))
    tr = json.loads(meta_path.read_text()).get("RepetitionTime", 2.0) if meta_path.is_file() else 2.0
    t_z = (t - t.mean(axis=1, keepdims=True)) / (t.std(axis=1, keepdims=True) + 1e-12)
    summary, _ = score(p[None], t_z[None], target_sfreq=1.0 / tr, lengths=DEFAULT_LENGTHS)
    r = pearson(p, t)
    return {"file": Path(pred_tsv).name, "volumes": int(n), "pearson_run": float(np.mean(r)),
            "pearson_run_min": float(np.min(r)), "pearson_run_max": float(np.max(r)),
            "spearman_minute": summary.get("spearman_minute"),
            "spearman_second": summary.get("spearman_second")}


def score_predictions(output_dir, truth_dir) -> pd.DataFrame:
    """One row per predicted fMRI series in ``output_dir`` that has a ground truth."""
    output_dir, truth_dir = Path(output_dir), Path(truth_dir)
    rows = []
    for pred in sorted(output_dir.glob("sub-*/**/func/*_stat-mean_predicted.tsv")):
        ents = dict(re.findall(r"(sub|task|atlas|scale|seg|space)-([a-zA-Z0-9]+)", pred.name))
        sub, task = ents["sub"], ents.get("task", "rest")
        truth = truth_dir / f"sub-{sub}" / f"sub-{sub}_task-{task}_truth.npz"
        if not truth.is_file():
            continue
        name = "_".join(f"{k}-{ents[k]}" for k in ("atlas", "seg", "scale") if k in ents)
        tables = sorted((output_dir / "sourcedata" / "atlases").glob(f"**/*{name}_dseg.tsv"))
        if not tables:
            raise SambaMissingInputError(f"no atlas table for {name}", path=output_dir / "sourcedata")
        rows.append({"subject": ents["sub"], **compare_with_truth(pred, truth, tables[0])})
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m samba_pipeline.simulate.score",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir")
    parser.add_argument("truth_dir")
    args = parser.parse_args(argv)
    table = score_predictions(args.output_dir, args.truth_dir)
    if table.empty:
        print("no predicted fMRI with a ground truth found", file=sys.stderr)
        return 1
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(table.drop(columns=["file"]).round(3).to_string(index=False))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
