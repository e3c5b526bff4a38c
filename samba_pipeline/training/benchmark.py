"""Benchmark mode: every requested model, ablation, null and reference on the same split.

``samba-bids BIDS OUT group --benchmark default`` (or a comma-separated list of entries) runs
:func:`run_benchmark` in one group-level node. Entries:

``<plugin>``
    any registered model plugin (``samba``, ``mlp``, ``cnn``, ``lstm``, ``transformer``,
    ``ridge``, ``calhas`` ...), trained with the group level's settings (epochs capped by
    ``--benchmark-epochs``); closed-form plugins (``ridge``) are fitted by :func:`fit_model`.
``samba:<ablation>``
    SAMBA with one named change (:data:`ABLATIONS`), e.g. ``samba:no_wavelet_attention``.
``shuffled:<entry>``
    the shuffled-EEG null: that entry trained on mis-paired windows (every training window's
    source paired with the target of another run's window at another time, see
    :class:`MispairedDataset`), evaluated on correctly paired withheld windows.

Every table also carries the trivial baselines (``baseline:mean`` = the training mean,
``baseline:persistence``), ``null:subject_mean`` (the mean of the *other* subjects' measured
target at the same time of the run's timeline) and, for stimulus-locked runs (aligned by
stimulus events, i.e. non-simultaneous recordings), ``reference:isc`` (another subject's measured
target as the prediction, averaged over the other subjects: the inter-subject-correlation
ceiling).

Row kinds (``kind`` column): ``model``, ``ablation``, ``baseline``, ``null_model`` (shuffled
and subject-mean nulls) and ``reference`` (ISC ceiling, chance; not ranked).

Entries that do not support a direction (``calhas``: EEG/MEG -> fMRI only; the ablations of
one direction) are skipped in the other. All entries share one split, one normaliser and one
seed. Outputs (``group/``): ``desc-benchmark_metrics.tsv`` (long table: direction, test set,
predictor ...), ``desc-benchmark_metrics.md`` (Table-I-style: minute/second Spearman per test
set, RMSE, SSIM, stimulus-classification accuracy, rank) and ``desc-benchmark_metrics.svg``.

SSIM (EEG/MEG -> fMRI): each predicted and measured fMRI sample is painted on the fMRI atlas
grid, downsampled by keeping the lowest ``1/2`` of the DCT coefficients along every axis (the DCT
downsampling of Calhas & Henriques) and compared with :func:`ssim` (Wang et al. 2004, 7-voxel
uniform window, the data range of the measured volume); without an atlas image, on the
parcel x time matrix of every window.

Stimulus classification (the SAMBA paper's Table II): when the runs' BIDS ``func`` events.tsv
files carry at least two ``trial_type`` conditions, every fMRI time step is labelled with the
condition whose event covers it, and one head (standardise -> PCA to at most 32 components ->
multinomial logistic regression, scikit-learn) is fitted on each model's latent representation
of the training windows (:meth:`latent` where the plugin has one, else its predictions on the
fMRI grid) and scored on every test set; ``baseline:input`` is the same head on the input
features, ``chance`` the majority class.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from samba_pipeline.bids.derivatives import read_tsv, write_bytes, write_json, write_tsv
from samba_pipeline.errors import SambaUsageError
from samba_pipeline.models.base import Batch
from samba_pipeline.models.registry import get_model_class
from samba_pipeline.training.data import RunData, WindowDataset, collate_windows, load_runs, make_dims
from samba_pipeline.training.metrics import (
    BASELINES,
    baseline_predictions,
    evaluate_predictions,
    predict,
)
from samba_pipeline.training.trainer import TrainResult, TrainSettings, seed_everything, train

LOGGER = logging.getLogger("samba_pipeline.training")

#: Named SAMBA ablations per direction: entry ``samba:<name>`` -> settings changed.
ABLATIONS: dict[str, dict[str, dict[str, Any]]] = {
    "ephys2fmri": {
        "no_wavelet_attention": {"use_wavelet_attention": False},
        "no_lstm": {"use_lstm": False},
        "fixed_hrf": {"learn_hrf": False},
        "transformer": {"decoder": "transformer"},
        "mse": {"loss": "mse"},
    },
    "fmri2ephys": {
        "no_pinv_hrf": {"use_pinv_hrf": False},
        "no_skip_loss": {"lambda_match": 1.0},
    },
}
#: ``--benchmark default``.
DEFAULT_ENTRIES = ("samba", "samba:no_wavelet_attention", "samba:no_lstm", "samba:fixed_hrf",
                   "samba:transformer", "samba:mse", "samba:no_pinv_hrf", "samba:no_skip_loss",
                   "mlp", "cnn", "lstm", "transformer", "ridge", "calhas", "shuffled:samba")
METRICS = ("spearman_minute", "spearman_second", "pearson_minute", "pearson_second", "rmse")


# ---------------------------------------------------------------------------------------------
# Entries
# ---------------------------------------------------------------------------------------------
@dataclass
class Entry:
    """One benchmark row: a plugin with settings, possibly trained on mis-paired windows."""

    name: str
    plugin: str
    config: dict[str, Any] = field(default_factory=dict)
    shuffled: bool = False
    kind: str = "model"


def expand_entries(names: Sequence[str]) -> list[str]:
    """``default`` expands to :data:`DEFAULT_ENTRIES`; duplicates are dropped (order kept)."""
    out: list[str] = []
    for name in names:
        for item in (DEFAULT_ENTRIES if str(name).strip().lower() == "default" else [name]):
            item = str(item).strip()
            if item and item not in out:
                out.append(item)
    return out


def parse_entry(name: str, direction: str, base_config: dict[str, Any] | None = None) -> Entry | None:
    """The :class:`Entry` of ``name`` for ``direction``, or None when it does not apply there.

    Raises :class:`SambaUsageError` for an unknown plugin or ablation."""
    shuffled = name.startswith("shuffled:")
    core = name.removeprefix("shuffled:")
    plugin, _, ablation = core.partition(":")
    cls = get_model_class(plugin)  # unknown plugin -> usage error
    config = dict(base_config or {}) if plugin == "samba" else {}
    kind = "null_model" if shuffled else "model"
    if ablation:
        known = {a for d in ABLATIONS.values() for a in d}
        if plugin != "samba" or ablation not in known:
            raise SambaUsageError(f"unknown benchmark entry {name!r}: ablations are samba:<name> with "
                                  f"<name> one of {sorted(known)}")
        if ablation not in ABLATIONS[direction]:
            return None
        change = ABLATIONS[direction][ablation]
        defaults = cls.default_config(direction) if plugin == "samba" else cls.default_config()
        missing = set(change) - set(defaults)
        if missing:
            LOGGER.warning("benchmark entry %s skipped: this SAMBA (%s) has no setting %s", name, direction,
                           sorted(missing))
            return None
        config.update(change)
        kind = "null_model" if shuffled else "ablation"
    if direction not in getattr(cls, "directions", ()):
        return None
    return Entry(name=name, plugin=plugin, config=config, shuffled=shuffled, kind=kind)


# ---------------------------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------------------------
def fit_model(net: torch.nn.Module, train_ds, val_ds, settings: TrainSettings) -> TrainResult:
    """Train ``net`` with the gradient trainer, or fit it in closed form when the plugin has a
    ``fit_closed_form(train_ds, val_ds)`` method (e.g. ``ridge``: no epochs, no optimiser)."""
    if hasattr(net, "fit_closed_form"):
        t0 = time.perf_counter()
        info = net.fit_closed_form(train_ds, val_ds)
        net.eval()
        history = pd.DataFrame([{"epoch": 0, "train_loss": math.nan, "val_loss": math.nan, "lr": math.nan,
                                 "best": True, "seconds": time.perf_counter() - t0}])
        LOGGER.info("%s fitted in closed form: %s", type(net).__name__, info)
        return TrainResult(model=net, history=history, best_epoch=0, best_val_loss=math.nan, epochs_run=0,
                           stopped_early=False, device="cpu", amp_dtype=None,
                           seconds=time.perf_counter() - t0)
    return train(net, train_ds, val_ds, settings)


class MispairedDataset(Dataset):
    """The windows of ``dataset`` with every source paired with another window's target.

    Each window gets the target of a window drawn at random (``seed``) from, in this order of
    preference: another run at an onset at least one window length away; the same run at least
    one window length away; any other window. Pairing windows of different subjects at the
    *same* run time is avoided on purpose: runs of equal length share time-locked structure (a
    common stimulus, block design, filter edges), which a same-time pairing would leak into the
    null (on the demo, a same-time pairing let the "null" score as well as the real model).
    """

    def __init__(self, dataset, seed: int = 0):
        n = len(dataset)
        if n < 2:
            raise SambaUsageError("the shuffled null needs at least two training windows")
        rng = np.random.default_rng(seed)
        windows = getattr(dataset, "windows", None)
        if windows is not None and len(windows) == n:
            run = windows["run"].to_numpy()
            onset = windows["onset_s"].to_numpy(dtype=float)
            far = float(getattr(dataset, "window_s", 0.0))
        else:
            run, onset, far = np.arange(n), np.zeros(n), 0.0
        self.partner = np.empty(n, dtype=np.int64)
        index = np.arange(n)
        for i in range(n):
            apart = np.abs(onset - onset[i]) >= far - 1e-9
            for cand in ((run != run[i]) & apart, (run == run[i]) & apart & (index != i), index != i):
                if cand.any():
                    self.partner[i] = rng.choice(np.flatnonzero(cand))
                    break
        self.dataset = dataset
        self.part = getattr(dataset, "part", "train")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[index])
        other = self.dataset[int(self.partner[index])]
        item["target"] = other["target"]
        item["target_mask"] = item["target_mask"] & other["target_mask"]
        return item


# ---------------------------------------------------------------------------------------------
# Cross-subject rows
# ---------------------------------------------------------------------------------------------
def is_stimulus_locked(run: RunData) -> bool:
    """True when the run was aligned on stimulus events (non-simultaneous recordings)."""
    import json

    path = run.files.get("alignment")
    if not path:
        return False
    try:
        return json.loads(Path(path).read_text()).get("method") == "stimulus_events"
    except (OSError, ValueError):
        return False


def cross_subject_predictions(dataset: WindowDataset) -> tuple[np.ndarray | None, list[np.ndarray]]:
    """Other subjects' measured targets at each window's time.

    Returns ``(subject_mean, per_subject)``: ``subject_mean`` ``[W, N, T]`` is the mean over the
    other subjects that have the window's task and time (NaN rows where none has), and
    ``per_subject`` holds, for the k-th other subject of each window, ``[W, N, T]`` (NaN where a
    window has fewer than k + 1 others)."""
    target, _ = dataset.targets()
    fmri_target = dataset.direction == "ephys2fmri"
    runs = dataset.runs
    preds: list[list[np.ndarray]] = [[] for _ in range(len(dataset))]
    for i, row in enumerate(dataset.windows.itertuples(index=False)):
        own = runs[row.run]
        for other in runs:
            if other.subject == own.subject or other.task != own.task:
                continue
            ephys, fmri = dataset.normalizer.transform(other)
            if fmri_target:
                series, start, stop = fmri, row.fmri_start, row.fmri_stop
            else:
                series, start, stop = ephys, row.ephys_start, row.ephys_stop
            if stop <= series.shape[1] and series.shape[0] == target.shape[1]:
                preds[i].append(series[:, start:stop])
    if not any(preds):
        return None, []
    n_max = max(len(p) for p in preds)
    per_subject = [np.full_like(target, np.nan) for _ in range(n_max)]
    mean = np.full_like(target, np.nan)
    for i, items in enumerate(preds):
        for k, item in enumerate(items):
            per_subject[k][i] = item
        if items:
            mean[i] = np.mean(items, axis=0)
    return mean, per_subject


def _score_rows(pred: np.ndarray, dataset: WindowDataset) -> dict[str, Any]:
    """Summary metrics of ``pred`` on the windows where it is defined (finite)."""
    keep = np.isfinite(pred).all(axis=(1, 2))
    if not keep.any():
        return {}
    if keep.all():
        return evaluate_predictions(pred, dataset)[0]
    sub = _Subset(dataset, np.flatnonzero(keep))
    return evaluate_predictions(pred[keep], sub)[0]


class _Subset:
    """The windows ``index`` of a :class:`WindowDataset` (what scoring reads)."""

    def __init__(self, dataset: WindowDataset, index: np.ndarray):
        self._ds, self._index = dataset, np.asarray(index)
        self.windows = dataset.windows.iloc[self._index].reset_index(drop=True)
        self.part, self.window_s, self.direction = dataset.part, dataset.window_s, dataset.direction
        self.target_sfreq, self.target_names = dataset.target_sfreq, dataset.target_names

    def targets(self):
        target, mask = self._ds.targets()
        return target[self._index], mask[self._index]


# ---------------------------------------------------------------------------------------------
# SSIM on DCT-downsampled volumes
# ---------------------------------------------------------------------------------------------
def ssim(x: np.ndarray, y: np.ndarray, *, data_range: float | None = None, win_size: int = 7,
         k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean structural similarity of two arrays of any dimension (Wang et al. 2004), computed as
    scikit-image's ``structural_similarity`` computes it by default: a ``win_size``-wide uniform
    window, sample covariances (``N / (N - 1)``), ``data_range`` default ``y.max() - y.min()``,
    the mean over the positions whose window lies inside the arrays."""
    from scipy.ndimage import uniform_filter

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {x.shape} and {y.shape}")
    win = min([win_size] + [s if s % 2 else s - 1 for s in x.shape])
    if win < 3:
        raise ValueError(f"arrays of shape {x.shape} are too small for SSIM")
    if data_range is None:
        data_range = float(y.max() - y.min()) or 1.0
    n = win**x.ndim
    cov = n / (n - 1.0)
    ux, uy = uniform_filter(x, win), uniform_filter(y, win)
    vx = cov * (uniform_filter(x * x, win) - ux * ux)
    vy = cov * (uniform_filter(y * y, win) - uy * uy)
    vxy = cov * (uniform_filter(x * y, win) - ux * uy)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    pad = (win - 1) // 2
    return float(s[tuple(slice(pad, dim - pad) for dim in s.shape)].mean())


def dct_downsample(volume: np.ndarray, factor: float = 0.5) -> np.ndarray:
    """Keep the lowest ``factor`` of the DCT-II coefficients along every axis (orthonormal) and
    invert them on the smaller grid; amplitudes are kept (rescaled by the size ratio)."""
    from scipy.fft import dctn, idctn

    shape = tuple(max(1, int(round(s * factor))) for s in volume.shape)
    coef = dctn(np.asarray(volume, dtype=np.float64), norm="ortho")
    small = coef[tuple(slice(0, s) for s in shape)]
    scale = math.sqrt(np.prod(shape) / np.prod(volume.shape))
    return idctn(small, norm="ortho") * scale


class VolumePainter:
    """Parcel values -> DCT-downsampled volumes on an atlas grid (bounding box of the parcels)."""

    def __init__(self, atlas_image, atlas_table, names: Sequence[str], factor: float = 0.5):
        import nibabel as nib

        labels = np.asarray(nib.load(str(atlas_image)).dataobj).astype(np.int64)
        table = pd.read_csv(atlas_table, sep="\t") if atlas_table else None
        by_name = ({str(n): int(i) for i, n in zip(table["index"], table["name"])} if table is not None
                   else {})
        lut = np.full(int(labels.max()) + 1, -1, dtype=np.int64)
        for row, name in enumerate(names):
            index = by_name.get(str(name))
            if index is not None and 0 < index < lut.size:
                lut[index] = row
        rows = lut[labels]
        inside = np.argwhere(rows >= 0)
        if inside.size == 0:
            raise ValueError("no parcel of the model is in the atlas image")
        lo, hi = inside.min(0), inside.max(0) + 1
        self.rows = rows[tuple(slice(a, b) for a, b in zip(lo, hi))]
        self.inside = self.rows >= 0
        self.factor = factor

    def volume(self, values: np.ndarray) -> np.ndarray:
        """``values [n_parcels]`` -> downsampled volume."""
        vol = np.zeros(self.rows.shape)
        vol[self.inside] = values[self.rows[self.inside]]
        return dct_downsample(vol, self.factor)


def window_ssim(pred: np.ndarray, target: np.ndarray, mask: np.ndarray,
                painter: VolumePainter | None = None) -> float:
    """Mean SSIM over fMRI samples (volumes via ``painter``) or over windows (parcel x time)."""
    values = []
    for w in range(pred.shape[0]):
        valid = mask[w]
        p, t = np.where(valid[:, None], pred[w], 0.0), np.where(valid[:, None], target[w], 0.0)
        if painter is None:
            values.append(ssim(p, t))
            continue
        for k in range(pred.shape[-1]):
            tv = painter.volume(t[:, k])
            values.append(ssim(painter.volume(p[:, k]), tv))
    return float(np.mean(values)) if values else math.nan


# ---------------------------------------------------------------------------------------------
# Stimulus classification
# ---------------------------------------------------------------------------------------------
def condition_labels(runs: Sequence[RunData], bids_dir) -> list[np.ndarray] | None:
    """Per run, the ``trial_type`` covering the middle of every kept fMRI volume (``""`` where
    no event does), from the raw dataset's ``func`` events.tsv; None unless at least two
    conditions occur."""
    import json

    if not bids_dir or not Path(bids_dir).is_dir():
        return None
    out, names = [], set()
    for run in runs:
        sub = Path(bids_dir) / f"sub-{run.subject}"
        found = sorted(sub.glob(f"**/func/{run.key}_events.tsv"))
        labels = np.full(run.n_volumes, "", dtype=object)
        if found:
            try:
                first = int(json.loads(Path(run.files["alignment"]).read_text()).get("fmri_start", 0))
            except (OSError, ValueError, KeyError):
                first = 0
            events = read_tsv(found[0])
            if "trial_type" in events.columns:
                mid = (first + np.arange(run.n_volumes) + 0.5) * run.tr
                for ev in events.itertuples(index=False):
                    dur = float(ev.duration) if np.isfinite(float(ev.duration)) else 0.0
                    hit = (mid >= float(ev.onset)) & (mid < float(ev.onset) + dur)
                    labels[hit] = str(ev.trial_type)
                    names.add(str(ev.trial_type))
        out.append(labels)
    return out if len(names) >= 2 else None


def _window_labels(dataset, labels: list[np.ndarray]) -> np.ndarray:
    """``[W, T_fmri]`` labels of every window's fMRI time steps."""
    return np.stack([labels[row.run][row.fmri_start:row.fmri_stop] for row in dataset.windows.itertuples()])


@torch.no_grad()
def latent_features(net: torch.nn.Module, dataset, n_steps: int, batch_size: int = 16) -> np.ndarray:
    """``[W, T_fmri, D]``: the plugin's :meth:`latent` when it has one, else its predictions
    averaged onto the fMRI grid."""
    net.eval()
    out = []
    for start in range(0, len(dataset), batch_size):
        batch = collate_windows([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        src = Batch(source=batch.source, target=None, target_mask=batch.target_mask)
        if hasattr(net, "latent"):
            z = net.latent(src)
        else:
            z = net(src)
            z = F.adaptive_avg_pool1d(z, n_steps).transpose(1, 2)
        if z.shape[1] != n_steps:
            z = F.adaptive_avg_pool1d(z.transpose(1, 2), n_steps).transpose(1, 2)
        out.append(z.float().cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def input_features(dataset, n_steps: int) -> np.ndarray:
    """The source on the fMRI grid: log band power per channel (EEG/MEG) or the fMRI itself."""
    from samba_pipeline.models.baselines import DEFAULT_BANDS, band_power, usable_bands

    source, _, _ = dataset.arrays()
    x = torch.from_numpy(source)
    if dataset.direction == "ephys2fmri":
        sfreq = dataset.runs[0].ephys_sfreq
        feats = band_power(x, sfreq, n_steps, usable_bands(DEFAULT_BANDS, sfreq))  # [W, C, K, T]
        feats = feats - feats.mean(-1, keepdim=True)
        return feats.reshape(x.shape[0], -1, n_steps).transpose(1, 2).numpy()
    return x.transpose(1, 2).numpy()


def classification_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                            test_y: np.ndarray, seed: int = 0) -> float:
    """Accuracy of standardise -> PCA (<= 32) -> logistic regression fitted on the training rows."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    keep_tr, keep_te = train_y != "", test_y != ""
    if len(set(train_y[keep_tr])) < 2 or not keep_te.any():
        return math.nan
    n_comp = int(min(32, train_x.shape[1], keep_tr.sum() - 1))
    head = make_pipeline(StandardScaler(), PCA(n_components=n_comp, random_state=seed),
                         LogisticRegression(max_iter=2000))
    head.fit(train_x[keep_tr], train_y[keep_tr])
    return float((head.predict(test_x[keep_te]) == test_y[keep_te]).mean())


def _flat(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, x.shape[-1])


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------
def run_benchmark(output_dir, stage_dir, *, entries: Sequence[str], directions: Sequence[str],
                  settings: dict[str, Any] | None = None, seed: int = 0, fmri_atlas: dict | None = None,
                  bids_dir=None, progress: bool = False, runs: Sequence[RunData] | None = None
                  ) -> dict[str, Any]:
    """Train and score every entry in every direction on one split; write the tables (see the
    module docstring). ``settings``: :class:`samba_pipeline.config.ModelSettings` fields;
    ``runs``: use these runs instead of reading the derivatives in ``output_dir``."""
    from samba_pipeline.config import ModelSettings
    from samba_pipeline.training.pipeline import _atlas_files, _fmri_atlas_filter, make_split
    from samba_pipeline.training.splits import make_datasets, withheld_sets

    fields = ModelSettings.__dataclass_fields__
    ms = ModelSettings(**{k: v for k, v in (settings or {}).items() if k in fields})
    names = expand_entries(entries)
    output_dir, stage_dir = Path(output_dir), Path(stage_dir)
    epochs = min(ms.epochs, ms.benchmark_epochs) if ms.benchmark_epochs else ms.epochs
    rows: list[dict[str, Any]] = []
    given = list(runs) if runs is not None else None
    t_all = time.perf_counter()
    for direction in directions:
        runs = ([r.with_direction(direction) for r in given] if given is not None else
                load_runs(output_dir, direction=direction, fmri_atlas=_fmri_atlas_filter(fmri_atlas)))
        split, withheld = make_split(runs, ms.split, ms.test_subjects, ms.train_window)
        datasets = make_datasets(runs, split, window_s=ms.train_window)
        normalizer = datasets["train"].normalizer
        dims = make_dims(runs, window_s=ms.train_window)
        test_sets = {}
        for set_name, segments in withheld_sets(runs, split, withheld).items():
            ds = WindowDataset(runs, segments, window_s=ms.train_window, normalizer=normalizer, part="test")
            if len(ds):
                test_sets[set_name] = ds
        plain_train = WindowDataset(runs, split.part("train"), window_s=ms.train_window,
                                    normalizer=normalizer, part="train")
        n_steps = plain_train.n_vol
        labels = condition_labels(runs, bids_dir)
        painter = None
        if direction == "ephys2fmri":
            image, table = _atlas_files(output_dir, runs[0])
            if image:
                try:
                    painter = VolumePainter(image, table, dims.target_names)
                except (ValueError, OSError) as exc:
                    LOGGER.warning("SSIM on parcel x time matrices: %s", exc)
        cls_data = None
        if labels is not None:
            cls_data = {"train_y": _window_labels(plain_train, labels).ravel(),
                        "test_y": {k: _window_labels(ds, labels).ravel() for k, ds in test_sets.items()}}
            tr_in = _flat(input_features(plain_train, n_steps))
            for set_name, ds in test_sets.items():
                test_y = cls_data["test_y"][set_name]
                values, counts = np.unique(test_y[test_y != ""], return_counts=True)
                chance = float(counts.max() / counts.sum()) if counts.size else math.nan
                acc = classification_accuracy(tr_in, cls_data["train_y"], _flat(input_features(ds, n_steps)),
                                              test_y, seed)
                rows.append(_row(direction, set_name, "baseline:input", "baseline", {}, accuracy=acc))
                rows.append(_row(direction, set_name, "chance", "reference", {}, accuracy=chance))

        def add_scores(name, kind, pred_of, extra=None, net=None, *, test_sets=test_sets,
                       direction=direction, painter=painter, cls_data=cls_data, plain_train=plain_train,
                       n_steps=n_steps):
            for set_name, ds in test_sets.items():
                pred = pred_of(ds)
                summary = _score_rows(pred, ds)
                if not summary:
                    continue
                row = _row(direction, set_name, name, kind, summary, **(extra or {}))
                if direction == "ephys2fmri":
                    target, mask = ds.targets()
                    keep = np.isfinite(pred).all(axis=(1, 2))
                    row["ssim"] = window_ssim(pred[keep], target[keep], mask[keep], painter)
                if net is not None and cls_data is not None:
                    row["accuracy"] = classification_accuracy(
                        _flat(latent_features(net, plain_train, n_steps)), cls_data["train_y"],
                        _flat(latent_features(net, ds, n_steps)), cls_data["test_y"][set_name], seed)
                rows.append(row)

        for kind in BASELINES:
            add_scores(f"baseline:{kind}", "baseline", lambda ds, k=kind: baseline_predictions(ds, k))
        add_scores("null:subject_mean", "null_model", lambda ds: _cross(ds)[0])
        if any(is_stimulus_locked(r) for r in runs):
            for set_name, ds in test_sets.items():
                _, per_subject = _cross(ds)
                scores = [_score_rows(p, ds) for p in per_subject]
                scores = [s for s in scores if s]
                if scores:
                    mean = {m: float(np.nanmean([s.get(m, math.nan) for s in scores])) for m in METRICS}
                    rows.append(_row(direction, set_name, "reference:isc", "reference", mean))

        for name in names:
            entry = parse_entry(name, direction, ms.model_config)
            if entry is None:
                LOGGER.info("benchmark: %s does not apply to %s; skipped", name, direction)
                continue
            t0 = time.perf_counter()
            seed_everything(seed)
            net = get_model_class(entry.plugin).build(dict(entry.config), dims)
            tsettings = TrainSettings(epochs=epochs, batch_size=ms.batch_size, lr=ms.lr, patience=ms.patience,
                                      seed=int(seed), device=ms.device, progress=progress)
            train_ds = MispairedDataset(datasets["train"], seed) if entry.shuffled else datasets["train"]
            result = fit_model(net, train_ds, datasets["val"], tsettings)
            net = result.model.to("cpu")
            seconds = time.perf_counter() - t0
            n_params = int(sum(p.numel() for p in net.parameters() if p.requires_grad))
            add_scores(entry.name, entry.kind, lambda ds, m=net: predict(m, ds),
                       {"epochs": result.epochs_run, "train_seconds": round(seconds, 1),
                        "n_parameters": n_params},
                       net=None if entry.shuffled else net)
            LOGGER.info("benchmark %s %s: %.1f s (%d epochs)", direction, entry.name, seconds,
                        result.epochs_run)

    table = pd.DataFrame(rows)
    table = _rank(table)
    group = stage_dir / "group"
    written = {"tsv": write_tsv(group / "desc-benchmark_metrics.tsv", table)}
    markdown = benchmark_markdown(table)
    written["md"] = write_bytes(group / "desc-benchmark_metrics.md", markdown.encode())
    written["svg"] = write_bytes(group / "desc-benchmark_metrics.svg", benchmark_plot(table))
    write_json(group / "desc-benchmark_metrics.json", {
        "Entries": names, "Directions": list(directions), "Split": ms.split, "Epochs": epochs,
        "WindowLength": ms.train_window, "Seed": int(seed), "Seconds": round(time.perf_counter() - t_all, 1),
        "Description": "benchmark of translation models, ablations, nulls and references on one split "
                       "(samba_pipeline.training.benchmark)"})
    written["table"] = table
    return written


_CROSS_CACHE: dict[int, tuple] = {}


def _cross(ds):
    key = id(ds)
    if key not in _CROSS_CACHE:
        _CROSS_CACHE.clear()
        _CROSS_CACHE[key] = cross_subject_predictions(ds)
    mean, per = _CROSS_CACHE[key]
    if mean is None:
        target, _ = ds.targets()
        return np.full_like(target, np.nan), []
    return mean, per


def _row(direction, test_set, name, kind, summary, **extra) -> dict[str, Any]:
    row = {"direction": direction, "test_set": test_set, "predictor": name, "kind": kind,
           "n_windows": summary.get("n_windows", math.nan)}
    row.update({m: summary.get(m, math.nan) for m in METRICS})
    row.update({"ssim": math.nan, "accuracy": math.nan, "epochs": math.nan, "train_seconds": math.nan,
                "n_parameters": math.nan})
    row.update(extra)
    return row


def _rank(table: pd.DataFrame) -> pd.DataFrame:
    """Rank (1 = best Spearman minute, else second) within direction and test set, models and ablations only
    competing with each other and the baselines/nulls (references such as the ISC ceiling and
    chance are not ranked)."""
    if table.empty:
        return table
    table = table.copy()
    table["rank"] = math.nan
    ranked = ~table["kind"].isin(["reference"])
    for _, idx in table[ranked].groupby(["direction", "test_set"]).groups.items():
        # Spearman minute, or second where the windows are shorter than a minute
        for metric in ("spearman_minute", "spearman_second"):
            values = table.loc[idx, metric].astype(float)
            if np.isfinite(values).any():
                table.loc[idx, "rank"] = values.rank(ascending=False, method="min")
                break
    return table


def benchmark_markdown(table: pd.DataFrame) -> str:
    """Table-I-style Markdown: one table per direction, one row per predictor."""
    lines = ["# samba-bids benchmark", ""]
    if table.empty:
        return "\n".join(lines + ["(no rows)", ""])
    for direction, part in table.groupby("direction", sort=False):
        sets = list(dict.fromkeys(part["test_set"]))
        lines += [f"## {direction}", ""]
        header = ["predictor", "kind"]
        for s in sets:
            short = s.replace("withheld_", "")
            header += [f"{short} ρ minute", f"{short} ρ second", f"{short} rank", f"{short} RMSE"]
            if direction == "ephys2fmri":
                header.append(f"{short} SSIM")
            header.append(f"{short} accuracy")
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name, rows in part.groupby("predictor", sort=False):
            by_set = {r.test_set: r for r in rows.itertuples(index=False)}
            cells = [f"`{name}`", rows["kind"].iloc[0]]
            for s in sets:
                r = by_set.get(s)
                vals = [] if r is None else [r.spearman_minute, r.spearman_second, r.rank, r.rmse]
                if direction == "ephys2fmri":
                    vals = vals + ([] if r is None else [r.ssim])
                vals = vals + ([] if r is None else [r.accuracy])
                n = 6 if direction == "ephys2fmri" else 5
                if r is None:
                    cells += ["–"] * n
                    continue
                cells += [_fmt(v, rank=(i == 2)) for i, v in enumerate(vals)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("ρ: Spearman correlation averaged over parcels/channels in withheld 60 s (minute) and "
                 "15 s (second) windows; rank by ρ minute among models, ablations, baselines and nulls; "
                 "SSIM on DCT-downsampled fMRI volumes; accuracy: stimulus-condition classification from "
                 "each model's latent representation.")
    return "\n".join(lines) + "\n"


def _fmt(value, rank: bool = False) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not np.isfinite(v):
        return "–"
    return f"{int(v)}" if rank else f"{v:.3f}"


def benchmark_plot(table: pd.DataFrame) -> bytes:
    """SVG: horizontal bars of Spearman minute per predictor, one panel per direction and test set."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(table.groupby(["direction", "test_set"], sort=False)) if not table.empty else []
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.5 * max(1, len(panels)), 6), squeeze=False)
    colors = {"model": "#1f77b4", "ablation": "#9ecae1", "baseline": "#7f7f7f", "null_model": "#d62728",
              "reference": "#2ca02c"}
    for ax, ((direction, test_set), part) in zip(axes[0], panels):
        part = part[np.isfinite(part["spearman_minute"].astype(float))]
        ax.barh(part["predictor"], part["spearman_minute"], color=[colors.get(k, "k") for k in part["kind"]])
        ax.invert_yaxis()
        ax.axvline(0, color="k", lw=0.5)
        ax.set_title(f"{direction}\n{test_set.replace('_', ' ')}", fontsize=9)
        ax.set_xlabel("Spearman (60 s windows)")
        ax.tick_params(labelsize=7)
        ax.locator_params(axis="x", nbins=4)
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color=c, label=k) for k, c in colors.items()], loc="lower center",
               ncol=len(colors), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    plt.close(fig)
    return buf.getvalue().encode()
