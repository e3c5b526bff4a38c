"""Training and inference as the pipeline runs them (group level and ``--model-file``).

The Nipype nodes of :mod:`samba_pipeline.interfaces.models` are thin adapters around these
functions, which also work on their own::

    from samba_pipeline.training.pipeline import train_group_model, apply_group_model
    out = train_group_model("/out", "/tmp/stage", model="samba", direction="ephys2fmri",
                            settings={"epochs": 50}, seed=0, checkpoint="/tmp/ckpt.pt")
    apply_group_model(out["prefix"], "/out", "/tmp/stage")

Everything is first written into a *staging* folder that mirrors the derivatives layout; the
node that publishes it copies each file atomically into the output folder (so a killed run never
leaves half-written derivatives, and Nipype's cache holds the results).

File names (``<M>`` model plugin, ``<D>`` direction, see README 'Outputs'):

``group/model-<M>_direction-<D>_model.{safetensors,json}``
    weights + model card (:mod:`samba_pipeline.training.modelfiles`)
``group/model-<M>_direction-<D>_{history,split,metrics}.tsv`` (+ ``_metrics.json``)
    training curve, the split, test metrics of the model and the trivial baselines per test set
``group/model-<M>_direction-<D>_desc-<testset>_metrics.tsv``
    per-node metrics of each test set (``withheldWindows``, ``withheldSubjects``)
``group/model-<M>_direction-<D>_desc-<name>_interpretation.tsv`` (+ ``_interpretation.json``)
    learned HRFs, wavelet attention, graph attention
``group/model-<M>_direction-<D>_desc-runs_metrics.tsv``
    whole-run metrics of every subject's prediction
``sub-X/func/sub-X_..._space-S_atlas-A_desc-<M>_stat-{mean,std}_predicted.{tsv,json,nii.gz}``
    predicted fMRI parcel series (MC-dropout mean and standard deviation) and the predicted
    BOLD painted back onto the atlas grid
``sub-X/eeg/sub-X_..._desc-<M>_stat-{mean,std}_predicted.tsv.gz``
    predicted EEG/MEG series (fMRI -> EEG/MEG)
``sub-X/<func|eeg>/sub-X_..._desc-<M>_metrics.{tsv,json}``
    the run's prediction against its measured target, when there is one
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import shutil
import time
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from samba_pipeline.__about__ import __version__
from samba_pipeline.bids.derivatives import derivative_path, read_tsv, write_json, write_tsv
from samba_pipeline.errors import SambaInputError, SambaUsageError
from samba_pipeline.models.base import TranslationModel
from samba_pipeline.models.registry import get_model_class
from samba_pipeline.training.data import RunData, WindowDataset, load_runs, make_dims
from samba_pipeline.training.inference import predict_run
from samba_pipeline.training.metrics import (
    BASELINES,
    DEFAULT_LENGTHS,
    baseline_predictions,
    envelope_scores,
    evaluate_envelopes,
    evaluate_predictions,
    predict,
    score,
)
from samba_pipeline.training.modelfiles import load_model, read_model_card, save_model
from samba_pipeline.training.splits import (
    DEFAULT_GAP_S,
    make_datasets,
    split_by_subject,
    split_by_time,
    split_by_time_and_subject,
    withheld_sets,
)
from samba_pipeline.training.trainer import TrainSettings, seed_everything

LOGGER = logging.getLogger("samba_pipeline.training")

#: Metric columns of the summary tables.
METRIC_COLUMNS = ("spearman_minute", "spearman_second", "pearson_minute", "pearson_second", "rmse",
                  "envelope_spearman_minute", "envelope_spearman_second")
#: Band (Hz) of the envelope metrics of fMRI -> EEG/MEG predictions when the model has none.
DEFAULT_ENVELOPE_BAND = (8.0, 12.0)
_SET_DESC = {"withheld_windows": "withheldWindows", "withheld_subjects": "withheldSubjects"}
_PACKAGES = ("samba-bids", "torch", "numpy", "scipy", "mne", "nipype", "nilearn", "pandas", "safetensors")


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------
def model_stem(model: str, direction: str) -> str:
    return f"model-{_label(model)}_direction-{direction}"


def model_prefix(output_dir, model: str, direction: str) -> Path:
    """``OUT/group/model-<M>_direction-<D>_model`` (add ``.json`` / ``.safetensors``)."""
    return Path(output_dir) / "group" / f"{model_stem(model, direction)}_model"


def _label(text: str) -> str:
    """A BIDS label from a plugin name (letters and digits only)."""
    out = "".join(ch for ch in str(text) if ch.isalnum())
    if not out:
        raise SambaUsageError(f"model name {text!r} has no letter or digit")
    return out


def _camel(name: str) -> str:
    parts = [p for p in str(name).replace("-", "_").split("_") if p]
    return parts[0] + "".join(p[:1].upper() + p[1:] for p in parts[1:]) if parts else "x"


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    out["samba-bids"] = __version__
    return out


def derivatives_digest(output_dir, fmri_atlas: str | None = None) -> str:
    """A digest of the participant-level files training reads (names, sizes, modification times).

    Given to the training node as an input, so Nipype re-trains exactly when they change.
    """
    out = Path(output_dir)
    patterns = ("sub-*/**/*_alignment.json", "sub-*/**/*_desc-preproc_timeseries.tsv*",
                "sub-*/**/*_desc-preproc_timeseries.json", "sub-*/**/*stat-mean_timeseries.tsv",
                "sub-*/**/*stat-mean_timeseries.json", "sub-*/**/*stat-cosine_relmat.tsv",
                "*_stat-regionmap_relmat.tsv")
    h = hashlib.sha256()
    for pattern in patterns:
        for path in sorted(out.glob(pattern)):
            if fmri_atlas and "stat-mean_timeseries" in path.name and fmri_atlas not in path.name:
                continue
            st = path.stat()
            h.update(f"{path.relative_to(out)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Training (group level)
# ---------------------------------------------------------------------------------------------
def make_split(runs: Sequence[RunData], split: str, test_subjects: Sequence[str], window_s: float,
               gap_s: float = DEFAULT_GAP_S) -> tuple[Any, list[str]]:
    """The split the user asked for, and the withheld subjects it uses.

    ``split``: ``"windows"``, ``"subjects"`` or ``"both"``. Without ``test_subjects`` the last
    subject label is withheld. ``"both"`` with a single subject falls back to ``"windows"``.
    """
    subjects = sorted({r.subject for r in runs})
    chosen = [str(s).removeprefix("sub-") for s in test_subjects] or subjects[-1:]
    if split in ("subjects", "both") and len(subjects) < 2:
        if split == "subjects":
            raise SambaInputError(f"a subject split needs at least two subjects; the derivatives hold "
                                  f"only sub-{subjects[0]} (use --split windows)")
        LOGGER.warning("only one subject (sub-%s): testing on withheld windows only", subjects[0])
        split = "windows"
    if split == "windows":
        return split_by_time(runs, window_s=window_s, gap_s=gap_s), []
    if split == "subjects":
        return split_by_subject(runs, chosen, window_s=window_s, gap_s=gap_s), chosen
    if split == "both":
        return split_by_time_and_subject(runs, chosen, window_s=window_s, gap_s=gap_s), chosen
    raise SambaUsageError(f"unknown split {split!r}")


def _metrics_row(name: str, test_set: str, summary: dict[str, Any]) -> dict[str, Any]:
    row = {"test_set": test_set, "predictor": name, "n_windows": summary.get("n_windows")}
    row.update({c: summary.get(c, math.nan) for c in METRIC_COLUMNS})
    return row


def _fmri_atlas_filter(spec: dict | None) -> str | None:
    if not spec:
        return None
    return "_".join(f"{k}-{spec[k]}" for k in ("atlas", "seg", "scale") if spec.get(k))


def _ephys_preprocessing(run: RunData) -> dict[str, Any]:
    path = run.files.get("ephys")
    if not path:
        return {}
    sidecar = Path(str(path).replace(".tsv.gz", ".json").replace(".tsv", ".json"))
    try:
        return dict(json.loads(sidecar.read_text()).get("Preprocessing", {}))
    except (OSError, ValueError):
        return {}


def _fmri_output_entities(run: RunData) -> dict[str, str]:
    """space/atlas/seg/scale of the run's fMRI parcel series file (for prediction file names)."""
    name = Path(run.files.get("fmri", "")).name
    ents = {}
    for key, ent in (("space", "space"), ("atlas", "atlas"), ("seg", "segmentation"), ("scale", "scale")):
        for part in name.split("_"):
            if part.startswith(key + "-"):
                ents[ent] = part.split("-", 1)[1]
    return ents


def _atlas_files(output_dir: Path, run: RunData) -> tuple[str | None, str | None]:
    """The dseg image and table the run's fMRI parcels came from (from its sidecar's NodeFiles)."""
    fmri = run.files.get("fmri")
    if not fmri:
        return None, None
    try:
        node_files = json.loads(Path(fmri).with_suffix(".json").read_text()).get("NodeFiles", "")
    except (OSError, ValueError):
        return None, None
    rel = str(node_files).removeprefix("bids::")
    image = output_dir / rel if rel else None
    if image is None or not image.is_file():
        return None, None
    table = Path(str(image).replace(".nii.gz", ".tsv"))
    return str(image), str(table) if table.is_file() else None


def train_group_model(output_dir, stage_dir, *, model: str = "samba", direction: str = "ephys2fmri",
                      settings: dict[str, Any] | None = None, seed: int = 0, checkpoint=None,
                      fmri_atlas: dict | None = None, progress: bool = True) -> dict[str, Any]:
    """Train ``model`` on every aligned run in ``output_dir``, evaluate it on the withheld parts
    and write the model files, metrics and interpretation under ``stage_dir/group``.

    ``settings``: the :class:`samba_pipeline.config.ModelSettings` fields (as a dict).
    ``checkpoint``: where the trainer checkpoints every epoch and resumes from after a kill.
    Returns the written paths (``prefix`` is the model-file prefix inside ``stage_dir``).
    """
    from samba_pipeline.config import ModelSettings

    ms = ModelSettings(**{k: v for k, v in (settings or {}).items()
                          if k in ModelSettings.__dataclass_fields__})
    t0 = time.perf_counter()
    output_dir, stage_dir = Path(output_dir), Path(stage_dir)
    runs = load_runs(output_dir, direction=direction, fmri_atlas=_fmri_atlas_filter(fmri_atlas))
    LOGGER.info("training %s (%s) on %d run(s) of %d subject(s)", model, direction, len(runs),
                len({r.subject for r in runs}))
    split, withheld = make_split(runs, ms.split, ms.test_subjects, ms.train_window)
    datasets = make_datasets(runs, split, window_s=ms.train_window)
    if "val" not in datasets:
        raise SambaInputError("the split left no validation windows", path=output_dir)
    dims = make_dims(runs, window_s=ms.train_window)
    cls = get_model_class(model)
    seed_everything(seed)
    net = cls.build(dict(ms.model_config), dims)
    tsettings = TrainSettings(epochs=ms.epochs, batch_size=ms.batch_size, lr=ms.lr, patience=ms.patience,
                              seed=int(seed), device=ms.device, progress=progress,
                              checkpoint_path=str(checkpoint) if checkpoint else None)
    if ms.train_nproc > 1 or ms.train_launcher:
        from samba_pipeline.training.ddp import train_distributed

        jobs = Path(checkpoint).parent if checkpoint else stage_dir.parent
        result = train_distributed(net, runs, split, ms.train_window, tsettings, nproc=ms.train_nproc,
                                   workdir=jobs / f"ddp_{_label(model)}_{direction}", plugin=model,
                                   launcher=ms.train_launcher)
    else:
        from samba_pipeline.training.benchmark import fit_model

        # closed-form plugins (ridge) are fitted by their fit_closed_form hook, not by gradients
        result = fit_model(net, datasets["train"], datasets["val"], tsettings)
    net = result.model
    device = result.device

    # Evaluation on every withheld set, with the trivial baselines beside the model.
    normalizer = datasets["train"].normalizer
    sets = withheld_sets(runs, split, withheld)
    rows, summaries, per_node = [], {}, {}
    for set_name, segments in sets.items():
        ds = WindowDataset(runs, segments, window_s=ms.train_window, normalizer=normalizer, part="test")
        if len(ds) == 0:
            LOGGER.warning("no %g s window fits in the %s", ms.train_window, set_name.replace("_", " "))
            continue
        summary, nodes, baselines = evaluate_with_baselines(net, ds, device=device)
        summaries[set_name] = {"model": summary, "baselines": baselines}
        per_node[set_name] = nodes
        rows.append(_metrics_row(model, set_name, summary))
        rows.extend(_metrics_row(f"baseline:{k}", set_name, v)
                    for k, v in summaries[set_name]["baselines"].items())
        LOGGER.info("%s %s on %s: Spearman minute %.3f, second %.3f", model, direction,
                    set_name.replace("_", " "), summary.get("spearman_minute", math.nan),
                    summary.get("spearman_second", math.nan))
    if not rows:
        raise SambaInputError("no withheld window to evaluate the model on", path=output_dir)

    stem = model_stem(model, direction)
    group = stage_dir / "group"
    written: dict[str, Any] = {}
    history = result.history
    written["history"] = write_tsv(group / f"{stem}_history.tsv", history)
    written["split"] = write_tsv(group / f"{stem}_split.tsv", split.to_frame(runs))
    metrics = pd.DataFrame(rows)
    written["metrics"] = write_tsv(group / f"{stem}_metrics.tsv", metrics)
    write_json(group / f"{stem}_metrics.json", {
        "Model": model, "Direction": direction, "Split": ms.split, "WithheldSubjects": withheld,
        "WindowLength": dims.window_s, "GapSeconds": split.gap_s, "TestSets": summaries})
    for set_name, nodes in per_node.items():
        name = f"{stem}_desc-{_SET_DESC[set_name]}_metrics.tsv"
        written[f"nodes_{set_name}"] = write_tsv(group / name, nodes)

    # Interpretation of the last forward pass over the first test set.
    first = next(iter(sets.values()))
    ds = WindowDataset(runs, first, window_s=ms.train_window, normalizer=normalizer, part="test")
    written.update(write_interpretation(net, ds, group, stem, device=device))

    # The model files, with everything needed to reuse them.
    card = {
        "Direction": direction,
        "Subjects": sorted({r.subject for r in runs}),
        "Runs": [r.key for r in runs],
        "WithheldSubjects": withheld,
        "Split": json.loads(split.to_json()),
        "Normalizer": normalizer.to_dict(),
        "EphysSamplingFrequency": runs[0].ephys_sfreq,
        "RepetitionTime": runs[0].tr,
        "EphysSpace": runs[0].ephys_space,
        "EphysNames": list(runs[0].ephys_names),
        "FmriNames": list(runs[0].fmri_names),
        "FmriOutputEntities": _fmri_output_entities(runs[0]),
        "FmriAtlasFile": os.path.relpath(_atlas_files(output_dir, runs[0])[0], output_dir)
        if _atlas_files(output_dir, runs[0])[0] else None,
        "EphysPreprocessing": _ephys_preprocessing(runs[0]),
        "ModelSettings": {k: v for k, v in vars(ms).items() if k != "model_file"},
        "TrainSettings": tsettings.fingerprint(),
        "Training": result.summary(),
        "Seed": int(seed),
        "Metrics": {k: {c: v["model"].get(c) for c in METRIC_COLUMNS} for k, v in summaries.items()},
        "PackageVersions": package_versions(),
        "Created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    prefix = group / f"{stem}_model"
    written.update(save_model(prefix, net, plugin=model, metadata=card))
    written["prefix"] = prefix
    LOGGER.info("trained %s (%s) in %.1f s (%d epochs, best %d)", model, direction,
                time.perf_counter() - t0, result.epochs_run, result.best_epoch)
    return written


def _envelope_settings(net: TranslationModel) -> tuple[list[float], bool]:
    band = list(getattr(net, "config", {}).get("envelope_band") or DEFAULT_ENVELOPE_BAND)
    return band, getattr(net, "output_kind", "raw") == "envelope"


def evaluate_with_baselines(net: TranslationModel, ds, *, device="cpu"
                            ) -> tuple[dict[str, Any], pd.DataFrame, dict[str, dict[str, Any]]]:
    """Model and trivial-baseline metrics on one withheld set.

    fMRI -> EEG/MEG adds the band-envelope metrics (``envelope_*``), since the hemodynamic signal
    carries the power of the oscillations, not their phase; a model predicting envelopes
    (SAMBA ``target = "envelope"``) is judged on those only (its raw-sample metrics are NaN).
    """
    pred = predict(net, ds, device=device)
    summary, nodes = evaluate_predictions(pred, ds)
    baselines = {k: evaluate_predictions(baseline_predictions(ds, k), ds)[0] for k in BASELINES}
    if ds.direction == "fmri2ephys":
        band, is_envelope = _envelope_settings(net)
        env, env_nodes = evaluate_envelopes(pred, ds, band=band, pred_is_envelope=is_envelope)
        if is_envelope:
            summary.update({k: math.nan for k in METRIC_COLUMNS if not k.startswith("envelope_")})
            nodes = nodes[["node", "valid_windows"]]
        summary.update({k: v for k, v in env.items() if k.startswith("envelope_")})
        nodes = nodes.merge(env_nodes.drop(columns=["valid_windows"], errors="ignore"), on="node")
        for kind, base in baselines.items():
            b_env, _ = evaluate_envelopes(baseline_predictions(ds, kind), ds, band=band)
            base.update({k: v for k, v in b_env.items() if k.startswith("envelope_")})
    return summary, nodes, baselines


def write_interpretation(net: TranslationModel, dataset, folder: Path, stem: str, *,
                         device="cpu") -> dict[str, Path]:
    """One forward pass over ``dataset`` (interpretation reports the last pass), then every table
    of ``net.interpretation()`` as ``<stem>_desc-<name>_interpretation.tsv`` and the arrays in
    ``<stem>_interpretation.json``."""
    predict(net, dataset, device=device)
    items = net.interpretation()
    written, arrays = {}, {}
    for name, value in items.items():
        if isinstance(value, pd.DataFrame):
            table = value.reset_index() if value.index.name else value
            path = folder / f"{stem}_desc-{_camel(name)}_interpretation.tsv"
            written[f"interp_{name}"] = write_tsv(path, table)
        elif isinstance(value, torch.Tensor):
            arrays[name] = value.detach().cpu().numpy().tolist()
        elif isinstance(value, (np.ndarray, list, tuple, float, int)):
            arrays[name] = np.asarray(value).tolist()
    if arrays:
        written["interp_arrays"] = write_json(folder / f"{stem}_interpretation.json", arrays)
    return written


# ---------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------
def predict_series(model: TranslationModel, source: np.ndarray, *, mc_dropout: int = 0, seed: int = 0,
                   device="cpu") -> tuple[np.ndarray, np.ndarray | None]:
    """Predicted target series ``[n_target, n_out]`` for a whole source series ``[n_source, n]``,
    and with ``mc_dropout`` > 0 the mean and standard deviation over that many forward passes with
    dropout active (Monte-Carlo dropout, Gal & Ghahramani 2016); otherwise (deterministic, std None).
    """
    model.eval()
    if mc_dropout <= 0:
        return predict_run(model, source, device=device), None
    if not any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        raise SambaUsageError("--mc-dropout needs a model with dropout; this one has none (set the "
                              "model's dropout setting above 0 when training)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        samples = [predict_run(model, source, device=device, dropout=True) for _ in range(int(mc_dropout))]
    stack = np.stack(samples)
    return stack.mean(axis=0).astype(np.float32), stack.std(axis=0, ddof=1 if len(samples) > 1 else 0
                                                              ).astype(np.float32)


def load_trained_model(model_file, device="cpu") -> tuple[TranslationModel, dict[str, Any]]:
    """A model file given as its prefix, ``.json`` card or ``.safetensors`` weights."""
    path = str(model_file)
    prefix = path[: -len(".json")] if path.endswith(".json") else path
    prefix = prefix[: -len(".safetensors")] if prefix.endswith(".safetensors") else prefix
    card = read_model_card(prefix)
    from samba_pipeline.training.trainer import resolve_device

    net = load_model(prefix, device=resolve_device(device))
    return net, card


def _reorder(series: np.ndarray, names: Sequence[str], wanted: Sequence[str], what: str, path) -> np.ndarray:
    """Rows of ``series`` in the model's node order; a node the model needs must be there."""
    index = {str(n): i for i, n in enumerate(names)}
    missing = [n for n in wanted if n not in index]
    if missing:
        raise SambaInputError(
            f"the model was trained on {len(wanted)} {what} nodes but {len(missing)} are missing "
            f"here (e.g. {missing[:5]}); the recording must have the montage / atlas of the training data",
            path=path)
    return series[[index[n] for n in wanted]]


def write_run_prediction(net: TranslationModel, card: dict[str, Any], stage_dir, *, source_file,
                         entities: dict[str, str], model_name: str, target_file=None,
                         atlas_image: str | None = None, atlas_table: str | None = None,
                         fmri_entities: dict[str, str] | None = None, ephys_datatype: str = "eeg",
                         mc_dropout: int = 0, seed: int = 0, device="cpu", onset_s: float = 0.0,
                         alignment_note: str = "", model_file: str | None = None,
                         includes_training_data: bool = False) -> dict[str, Any]:
    """Predict one run from its source series file and stage its prediction derivatives.

    ``source_file``: TSV(.gz) with one column per source node (EEG/MEG channels or fMRI parcels,
    the model's names), at the model's source rate. ``target_file`` (optional): the measured
    target series on the same timeline, for the run's metrics. Returns written paths and the
    run's summary metrics (``summary``; empty without target).
    """
    dims = net.dims
    direction = dims.direction
    stage_dir = Path(stage_dir)
    table = read_tsv(source_file)
    source = table.to_numpy(dtype=np.float64).T
    source = _reorder(source, [str(c) for c in table.columns], dims.source_names, "source", source_file)
    bad = ~np.isfinite(source).all(axis=1)
    if bad.all():
        raise SambaInputError("every source node holds n/a values", path=source_file)
    if bad.any():  # e.g. an fMRI parcel below the coverage threshold: the mean (0 after z-scoring)
        LOGGER.warning("%s: %d source node(s) with n/a values are set to their mean", Path(source_file).name,
                       int(bad.sum()))
        source[bad] = 0.0
    mean, std = predict_series(net, source, mc_dropout=mc_dropout, seed=seed, device=device)
    names = list(dims.target_names)
    label = _label(model_name)
    base = dict(entities)
    written: dict[str, Any] = {}
    meta = {
        "Description": f"{model_name} prediction ({direction}); Monte-Carlo dropout mean"
        if mc_dropout else f"{model_name} prediction ({direction})",
        "Model": model_name, "ModelVersion": card.get("PluginVersion"), "Direction": direction,
        "ModelFile": model_file, "Units": "z-score (the units the model was trained on)",
        "StartTime": float(onset_s), "Alignment": alignment_note,
        "MCDropoutSamples": int(mc_dropout), "IncludesTrainingData": bool(includes_training_data),
        "Sources": [str(source_file)],
    }
    if direction == "ephys2fmri":
        ents = dict(base, datatype="func", **(fmri_entities or {}), desc=label)
        meta.update({"RepetitionTime": 1.0 / dims.target_sfreq, "SamplingFrequency": dims.target_sfreq})
        ext = ".tsv"
    else:
        ents = dict(base, datatype=ephys_datatype, desc=label)
        meta.update({"SamplingFrequency": dims.target_sfreq})
        ext = ".tsv.gz"
    mean_df = pd.DataFrame(mean.T, columns=names)
    mean_path = derivative_path(stage_dir, **ents, stat="mean", suffix="predicted", extension=ext)
    written["mean"] = write_tsv(mean_path, mean_df)
    write_json(derivative_path(stage_dir, **ents, stat="mean", suffix="predicted", extension=".json"), meta)
    if std is not None:
        std_path = derivative_path(stage_dir, **ents, stat="std", suffix="predicted", extension=ext)
        written["std"] = write_tsv(std_path, pd.DataFrame(std.T, columns=names))
        write_json(derivative_path(stage_dir, **ents, stat="std", suffix="predicted", extension=".json"),
                   dict(meta, Description=f"standard deviation over {mc_dropout} Monte-Carlo dropout "
                        "samples of the prediction"))
    if direction == "ephys2fmri" and atlas_image:
        img_path = derivative_path(stage_dir, **ents, stat="mean", suffix="predicted", extension=".nii.gz")
        written["nifti"] = paint_parcels(mean, names, atlas_image, atlas_table, img_path,
                                         tr=1.0 / dims.target_sfreq)
    summary: dict[str, Any] = {}
    if target_file is not None:
        target_table = read_tsv(target_file)
        target = target_table.to_numpy(dtype=np.float64).T
        target = _reorder(target, [str(c) for c in target_table.columns], names, "target", target_file)
        summary, per_node = score_run(mean, target, dims.target_sfreq, names)
        if direction == "fmri2ephys":
            band, is_envelope = _envelope_settings(net)
            env, env_nodes = score_run_envelopes(mean, target, dims.target_sfreq, names, band, is_envelope)
            if is_envelope:
                summary.update({k: math.nan for k in METRIC_COLUMNS if not k.startswith("envelope_")})
                per_node = per_node[["node", "valid_windows"]]
            summary.update(env)
            per_node = per_node.merge(env_nodes.drop(columns=["valid_windows"], errors="ignore"), on="node")
        met = dict(ents)
        written["metrics"] = write_tsv(derivative_path(stage_dir, **met, suffix="metrics", extension=".tsv"),
                                       per_node)
        write_json(derivative_path(stage_dir, **met, suffix="metrics", extension=".json"),
                   dict(summary, Model=model_name, Direction=direction, Target=str(target_file),
                        IncludesTrainingData=bool(includes_training_data),
                        Description="whole-run prediction scored against the measured target "
                        "(Spearman/Pearson averaged over parcels in 60 s and 15 s windows)"))
    written["summary"] = summary
    return written


def score_run(pred: np.ndarray, target: np.ndarray, sfreq: float, names: Sequence[str]
              ) -> tuple[dict[str, Any], pd.DataFrame]:
    """Score a whole-run prediction against the measured target (both z-scored per node first)."""
    n = min(pred.shape[1], target.shape[1])
    pred, target = pred[:, :n].astype(np.float64), target[:, :n].astype(np.float64)
    valid = np.isfinite(target).all(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        tz = (target - np.nanmean(target, axis=1, keepdims=True)) / np.nanstd(target, axis=1, keepdims=True)
    tz = np.where(valid[:, None], np.nan_to_num(tz), 0.0)
    summary, per_node = score(pred[None], tz[None], valid, target_sfreq=sfreq, lengths=DEFAULT_LENGTHS,
                              node_names=names)
    return summary, per_node


def score_run_envelopes(pred: np.ndarray, target: np.ndarray, sfreq: float, names: Sequence[str], band,
                        pred_is_envelope: bool) -> tuple[dict[str, Any], pd.DataFrame]:
    """Band-envelope metrics of a whole-run EEG/MEG prediction (see :func:`evaluate_with_baselines`)."""
    n = min(pred.shape[1], target.shape[1])
    pred, target = pred[:, :n].astype(np.float64), target[:, :n].astype(np.float64)
    valid = np.isfinite(target).all(axis=1)
    target = np.where(valid[:, None], target, 0.0)
    summary, per_node = envelope_scores(pred[None], target[None], valid, sfreq=sfreq, band=band,
                                        pred_is_envelope=pred_is_envelope, lengths=DEFAULT_LENGTHS,
                                        node_names=names)
    return {k: v for k, v in summary.items() if k.startswith("envelope_")}, per_node


def paint_parcels(values: np.ndarray, names: Sequence[str], atlas_image, atlas_table, out_path,
                  *, tr: float) -> Path:
    """Write parcel series ``[n_parcels, n_volumes]`` as a 4-D NIfTI on the atlas grid (each
    voxel gets its parcel's value, 0 outside every parcel), atomically."""
    import gzip

    import nibabel as nib

    from samba_pipeline.bids.derivatives import write_bytes

    img = nib.load(str(atlas_image))
    labels = np.asarray(img.dataobj).astype(np.int64)
    if atlas_table:
        table = pd.read_csv(atlas_table, sep="\t")
        by_name = {str(n): int(i) for i, n in zip(table["index"], table["name"])}
    else:
        by_name = {}
    lut = np.full(int(labels.max()) + 1, -1, dtype=np.int64)
    for row, name in enumerate(names):
        index = by_name.get(str(name))
        if index is None:
            raise SambaInputError(f"parcel {name!r} of the model is not in the atlas table",
                                  path=atlas_table or atlas_image)
        if 0 < index < lut.size:
            lut[index] = row
    rows = lut[labels]  # [x, y, z], -1 outside
    inside = rows >= 0
    data = np.zeros(labels.shape + (values.shape[1],), dtype=np.float32)
    data[inside] = values[rows[inside]].astype(np.float32)
    out_img = nib.Nifti1Image(data, img.affine)
    out_img.header.set_xyzt_units("mm", "sec")
    out_img.header["pixdim"][4] = float(tr)
    return write_bytes(out_path, gzip.compress(out_img.to_bytes(), compresslevel=6, mtime=0))


def apply_group_model(prefix, output_dir, stage_dir, *, mc_dropout: int = 0, device="cpu",
                      seed: int = 0) -> dict[str, Any]:
    """Apply a trained model to every aligned run of ``output_dir``; stage each run's prediction
    derivatives and ``group/<stem>_desc-runs_metrics.tsv`` (whole-run metrics per run)."""
    net, card = load_trained_model(prefix, device=device)
    meta = card.get("Metadata", {})
    model_name = card["Plugin"]
    direction = net.dims.direction
    output_dir, stage_dir = Path(output_dir), Path(stage_dir)
    fmri_filter = _fmri_atlas_filter({k: v for k, v in meta.get("FmriOutputEntities", {}).items()
                                      if k in ("atlas", "scale")} | (
        {"seg": meta["FmriOutputEntities"]["segmentation"]}
        if "segmentation" in meta.get("FmriOutputEntities", {}) else {}))
    runs = load_runs(output_dir, direction=direction, fmri_atlas=fmri_filter)
    withheld = set(meta.get("WithheldSubjects", []))
    train_keys = {meta["Split"]["run_keys"][s["run"]] for s in meta.get("Split", {}).get("segments", [])
                  if s["part"] == "train"} if meta.get("Split") else set()
    rows = []
    written: dict[str, Any] = {"runs": []}
    for run in runs:
        atlas_image, atlas_table = _atlas_files(output_dir, run)
        ephys_dt = Path(run.files["ephys"]).parent.name
        source_file = run.files["ephys"] if direction == "ephys2fmri" else run.files["fmri"]
        target_file = run.files["fmri"] if direction == "ephys2fmri" else run.files["ephys"]
        out = write_run_prediction(
            net, card, stage_dir, source_file=source_file, target_file=target_file,
            entities=run.entities, model_name=model_name, atlas_image=atlas_image, atlas_table=atlas_table,
            fmri_entities=_fmri_output_entities(run), ephys_datatype=ephys_dt, mc_dropout=mc_dropout,
            seed=seed, device=device, onset_s=0.0, alignment_note="first kept fMRI volume",
            model_file=f"bids::group/{model_stem(model_name, direction)}_model.json",
            includes_training_data=run.key in train_keys)
        role = ("withheld subject" if run.subject in withheld
                else "training subject" if run.key in train_keys else "not used in training")
        rows.append({"run": run.key, "subject": run.subject, "role": role,
                     **{c: out["summary"].get(c, math.nan) for c in METRIC_COLUMNS}})
        written["runs"].append(out)
    stem = model_stem(model_name, direction)
    written["runs_metrics"] = write_tsv(stage_dir / "group" / f"{stem}_desc-runs_metrics.tsv",
                                        pd.DataFrame(rows))
    return written


# ---------------------------------------------------------------------------------------------
# Publishing the staged files
# ---------------------------------------------------------------------------------------------
def publish(stage_dir, output_dir) -> list[str]:
    """Copy every staged file into ``output_dir`` at the same relative path, atomically each."""
    from samba_pipeline.bids.derivatives import copy_file

    stage_dir, output_dir = Path(stage_dir), Path(output_dir)
    out = []
    for path in sorted(p for p in stage_dir.rglob("*") if p.is_file() and not p.name.startswith(".")):
        dest = output_dir / path.relative_to(stage_dir)
        copy_file(path, dest)
        out.append(str(dest))
    return out


def clear_stage(stage_dir) -> Path:
    stage_dir = Path(stage_dir)
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True)
    return stage_dir


__all__ = ["apply_group_model", "derivatives_digest", "load_trained_model", "make_split", "model_prefix",
           "model_stem", "paint_parcels", "predict_series", "publish", "score_run", "train_group_model",
           "write_interpretation", "write_run_prediction"]
