"""Compare model configurations on the same withheld windows (e.g. SAMBA's two front ends).

:func:`compare_configs` trains one model per (configuration, seed) on the same split and
datasets, selects each epoch on the validation part, and scores the validation and test parts
with the same metrics as the trivial baselines. Use it to choose defaults on withheld data::

    from samba_pipeline.training import load_runs, split_by_time, TrainSettings
    from samba_pipeline.training.compare import compare_configs
    runs = load_runs("/out")
    table = compare_configs(runs, split_by_time(runs), "samba",
                            {"paper": {"front_end": "paper"},
                             "neurovascular": {"front_end": "neurovascular"}},
                            TrainSettings(epochs=40, lr=3e-3, patience=10), seeds=(0, 1, 2))
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import pandas as pd

from samba_pipeline.models.registry import get_model_class
from samba_pipeline.training.data import RunData, make_dims
from samba_pipeline.training.metrics import evaluate, evaluate_baselines
from samba_pipeline.training.splits import Split, make_datasets
from samba_pipeline.training.trainer import TrainSettings, seed_everything, train

_COLUMNS = ("spearman_minute", "spearman_second", "pearson_minute", "rmse")


def compare_configs(runs: Sequence[RunData], split: Split, model: str, configs: dict[str, dict[str, Any]],
                    settings: TrainSettings | None = None, *, seeds: Sequence[int] = (0,),
                    window_s: float = 60.0, train_step_s: float | None = 10.0,
                    baselines: bool = True) -> pd.DataFrame:
    """One row per (configuration, seed) (and per baseline): validation and test metrics.

    Columns: ``name``, ``seed``, ``best_epoch``, ``epochs_run``, ``seconds`` and
    ``val_<metric>`` / ``test_<metric>`` for Spearman (minute, second), Pearson (minute), RMSE.
    """
    settings = settings or TrainSettings()
    datasets = make_datasets(runs, split, window_s=window_s, train_step_s=train_step_s)
    if "val" not in datasets or "test" not in datasets:
        raise ValueError("the split needs a validation and a test part")
    dims = make_dims(runs, window_s=window_s)
    cls = get_model_class(model)
    rows = []
    if baselines:
        val_b, test_b = evaluate_baselines(datasets["val"]), evaluate_baselines(datasets["test"])
        for kind in val_b:
            row = {"name": f"baseline:{kind}", "seed": None}
            row.update({f"val_{c}": val_b[kind].get(c) for c in _COLUMNS})
            row.update({f"test_{c}": test_b[kind].get(c) for c in _COLUMNS})
            rows.append(row)
    for name, config in configs.items():
        for seed in seeds:
            seed_everything(seed)
            net = cls.build(config, dims)
            t0 = time.perf_counter()
            run_settings = TrainSettings(**{**settings.__dict__, "seed": int(seed), "checkpoint_path": None})
            result = train(net, datasets["train"], datasets["val"], run_settings)
            val, _ = evaluate(result.model, datasets["val"], device=result.device)
            test, _ = evaluate(result.model, datasets["test"], device=result.device)
            row = {"name": name, "seed": int(seed), "best_epoch": result.best_epoch,
                   "epochs_run": result.epochs_run, "seconds": round(time.perf_counter() - t0, 1)}
            row.update({f"val_{c}": val.get(c) for c in _COLUMNS})
            row.update({f"test_{c}": test.get(c) for c in _COLUMNS})
            rows.append(row)
    return pd.DataFrame(rows)
