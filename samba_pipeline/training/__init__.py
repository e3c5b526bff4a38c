"""samba_pipeline.training: datasets, splits, the training loop, metrics and model files.

Typical use (plain Python, no Nipype)::

    from samba_pipeline.training import (TrainSettings, evaluate, load_runs, make_datasets,
                                         make_dims, seed_everything, split_by_time, train)
    runs = load_runs("/out", direction="ephys2fmri")
    split = split_by_time(runs, window_s=60.0, gap_s=30.0)
    ds = make_datasets(runs, split, window_s=60.0)
    dims = make_dims(runs, window_s=60.0)
    seed_everything(0)
    model = get_model_class("samba").build({}, dims)
    result = train(model, ds["train"], ds["val"], TrainSettings(epochs=50))
    summary, per_node = evaluate(result.model, ds["test"])
"""

from samba_pipeline.training.compare import compare_configs
from samba_pipeline.training.data import (
    Normalizer,
    RunData,
    WindowDataset,
    check_consistent,
    collate_windows,
    load_runs,
    make_dims,
    region_map_for,
    snapped_window_s,
    window_volumes,
)
from samba_pipeline.training.inference import predict_run
from samba_pipeline.training.metrics import (
    BASELINES,
    DEFAULT_LENGTHS,
    baseline_predictions,
    evaluate,
    evaluate_baselines,
    evaluate_predictions,
    pearson,
    predict,
    score,
    spearman,
    write_metrics,
)
from samba_pipeline.training.modelfiles import load_model, read_model_card, save_model
from samba_pipeline.training.splits import (
    DEFAULT_GAP_S,
    PARTS,
    Segment,
    Split,
    check_split,
    make_datasets,
    split_by_subject,
    split_by_time,
    split_by_time_and_subject,
    withheld_sets,
)
from samba_pipeline.training.trainer import (
    TrainingStopped,
    TrainResult,
    TrainSettings,
    load_checkpoint,
    resolve_amp,
    resolve_device,
    save_checkpoint,
    seed_everything,
    train,
)

__all__ = [
    "BASELINES", "DEFAULT_GAP_S", "DEFAULT_LENGTHS", "PARTS", "Normalizer", "RunData", "Segment",
    "Split", "TrainResult", "TrainSettings", "TrainingStopped", "WindowDataset", "baseline_predictions",
    "check_consistent", "check_split", "compare_configs", "collate_windows", "evaluate", "evaluate_baselines",
    "evaluate_predictions", "load_checkpoint", "load_model", "load_runs", "make_datasets", "make_dims",
    "pearson", "predict", "predict_run", "read_model_card", "region_map_for", "resolve_amp", "resolve_device",
    "save_checkpoint", "save_model", "score", "seed_everything", "snapped_window_s", "spearman",
    "split_by_subject", "split_by_time", "split_by_time_and_subject", "train", "withheld_sets",
    "window_volumes", "write_metrics",
]
