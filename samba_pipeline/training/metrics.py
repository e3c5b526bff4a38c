"""Evaluation metrics (numpy/scipy, vectorised over windows and nodes) and trivial baselines.

The seed paper's measure (its Table I): the Spearman correlation between the predicted and the
measured series of each target node within withheld windows, 60 s ("minute") and 15 s
("second") long, computed per window and node and then averaged. Longer model windows are cut
into consecutive sub-windows of the scoring length (snapped to whole target samples as the
windows are: 15 s at TR 2 s = 8 volumes). Pearson correlation (same windows) and the RMSE (in
z-scored target units, over all withheld samples) are reported beside it.

Undefined correlations: a constant *measured* series has no ranks to agree with, so that
(window, node) is skipped (NaN, left out of the averages); a constant *prediction* (while the
measured series varies) carries no information and scores 0. The same rule applies to models and
to the baselines, so the "mean" baseline scores exactly 0.

Baselines (:func:`baseline_predictions`):

``mean``
    the training mean of every node (0 in the training-fitted z-scored units): constant.
``persistence``
    each withheld window is predicted by the measured series of the window just before it (the
    observed past of the same run, which may lie in the gap); where fewer samples precede it, by
    the last preceding value, and at the start of a run by the training mean.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata

from samba_pipeline.bids.derivatives import write_json, write_tsv
from samba_pipeline.models.base import Batch
from samba_pipeline.training.targets import ephys_envelope, standardize_np

DEFAULT_LENGTHS = {"minute": 60.0, "second": 15.0}
BASELINES = ("mean", "persistence")


# ---------------------------------------------------------------------------------------------
# Correlations
# ---------------------------------------------------------------------------------------------
def pearson(pred: np.ndarray, target: np.ndarray, axis: int = -1) -> np.ndarray:
    """Pearson correlation along ``axis`` (vectorised over the other axes), with the module's
    rule for constant series (target constant -> NaN, prediction constant -> 0)."""
    x = np.asarray(pred, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    x = x - x.mean(axis=axis, keepdims=True)
    y = y - y.mean(axis=axis, keepdims=True)
    sxx = (x * x).sum(axis=axis)
    syy = (y * y).sum(axis=axis)
    sxy = (x * y).sum(axis=axis)
    n = x.shape[axis]
    # Constant series: zero variance up to round-off (relative to the values' magnitude).
    tiny_x = sxx <= n * (1e-7 * np.abs(np.asarray(pred, dtype=np.float64)).max(axis=axis)) ** 2
    tiny_y = syy <= n * (1e-7 * np.abs(np.asarray(target, dtype=np.float64)).max(axis=axis)) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        r = sxy / np.sqrt(sxx * syy)
    r = np.where(tiny_x, 0.0, r)
    r = np.where(tiny_y, np.nan, r)
    return np.clip(r, -1.0, 1.0)


def spearman(pred: np.ndarray, target: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman rank correlation along ``axis`` (average ranks for ties), vectorised."""
    x = np.asarray(pred, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    rx = rankdata(x, axis=axis)
    ry = rankdata(y, axis=axis)
    r = pearson(rx, ry, axis=axis)
    # Ranks of a constant series are constant: keep the constant rule on the raw series.
    r = np.where(np.ptp(y, axis=axis) == 0, np.nan, r)
    r = np.where((np.ptp(x, axis=axis) == 0) & (np.ptp(y, axis=axis) > 0), 0.0, r)
    return r


def _chunks(x: np.ndarray, length: int) -> np.ndarray:
    """``[W, N, T]`` -> ``[W * C, N, length]`` with ``C = T // length`` consecutive sub-windows."""
    w, n, t = x.shape
    c = t // length
    x = x[..., : c * length].reshape(w, n, c, length)
    return np.moveaxis(x, 2, 1).reshape(w * c, n, length)


def scoring_length(length_s: float, sfreq: float) -> int:
    """Samples of a scoring window (halves up, as the model windows are)."""
    return int(math.floor(float(length_s) * float(sfreq) + 0.5 + 1e-9))


def score(pred, target, mask=None, *, target_sfreq: float, lengths: dict[str, float] | None = None,
          node_names: Sequence[str] | None = None) -> tuple[dict[str, Any], pd.DataFrame]:
    """Metrics of predictions ``pred`` against ``target`` (``[W, N, T]`` windows).

    ``mask``: ``[W, N]`` or ``[N]`` bool, False for nodes without valid data. ``lengths``:
    label -> scoring-window length in s (default minute 60 s, second 15 s); a length longer than
    the windows is skipped. Returns ``(summary, per_node)``: the summary has, per label,
    ``spearman_<label>`` / ``pearson_<label>`` (mean over sub-windows of the node-averaged
    correlation) with ``*_std`` (across sub-windows) and ``n_<label>_windows``, plus ``rmse``;
    the per-node table has the same correlations averaged over sub-windows and the RMSE.
    """
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(f"pred and target must be [windows, nodes, time] of one shape, got "
                         f"{pred.shape} and {target.shape}")
    w, n, t = pred.shape
    mask = np.ones((w, n), bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), (w, n))
    lengths = DEFAULT_LENGTHS if lengths is None else lengths
    names = list(node_names) if node_names is not None else [f"node{i}" for i in range(n)]
    summary: dict[str, Any] = {"n_windows": int(w), "window_samples": int(t), "n_nodes": int(n),
                               "n_valid_nodes": int(mask.any(axis=0).sum())}
    per_node = pd.DataFrame({"node": names, "valid_windows": mask.sum(axis=0).astype(int)})
    for label, length_s in lengths.items():
        length = scoring_length(length_s, target_sfreq)
        if length > t or length < 3 or w == 0:
            summary[f"spearman_{label}"] = summary[f"pearson_{label}"] = float("nan")
            summary[f"n_{label}_windows"] = 0
            continue
        c = t // length
        p_chunks, t_chunks = _chunks(pred, length), _chunks(target, length)
        m_chunks = np.repeat(mask, c, axis=0)
        summary[f"n_{label}_windows"] = int(w * c)
        summary[f"{label}_samples"] = int(length)
        for name, func in (("spearman", spearman), ("pearson", pearson)):
            r = np.where(m_chunks, func(p_chunks, t_chunks), np.nan)  # [W*C, N]
            with np.errstate(invalid="ignore"), _quiet():
                per_window = np.nanmean(r, axis=1)
                summary[f"{name}_{label}"] = float(np.nanmean(per_window))
                summary[f"{name}_{label}_std"] = float(np.nanstd(per_window))
                per_node[f"{name}_{label}"] = np.nanmean(r, axis=0)
    err = np.where(mask[..., None], (pred - target) ** 2, np.nan)
    with np.errstate(invalid="ignore"), _quiet():
        summary["rmse"] = float(np.sqrt(np.nanmean(err)))
        per_node["rmse"] = np.sqrt(np.nanmean(err, axis=(0, 2)))
    return summary, per_node


class _quiet:
    """Silence numpy's 'Mean of empty slice' warnings (all-NaN rows are expected)."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", category=RuntimeWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


# ---------------------------------------------------------------------------------------------
# Models and datasets
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(model: torch.nn.Module, dataset, *, batch_size: int = 16, device: str | torch.device = "cpu"
            ) -> np.ndarray:
    """Predictions ``[W, n_target, target_len]`` for every window of ``dataset`` (in order).

    The model sees ``Batch(source, target=None, target_mask)``: no measured target (no teacher
    forcing) reaches it at evaluation time.
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    out = []
    try:
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            src = torch.stack([it["source"] for it in items]).to(device)
            mask = torch.stack([it["target_mask"] for it in items]).all(dim=0).to(device)
            pred = model(Batch(source=src, target=None, target_mask=mask))
            out.append(pred.detach().float().cpu().numpy())
    finally:
        model.train(was_training)
    if not out:
        raise ValueError(f"dataset ({getattr(dataset, 'part', '?')}) holds no window")
    return np.concatenate(out)


def evaluate_predictions(pred: np.ndarray, dataset, *, lengths: dict[str, float] | None = None
                         ) -> tuple[dict[str, Any], pd.DataFrame]:
    """:func:`score` of ``pred`` against the windows of a :class:`WindowDataset`, with per-run
    Spearman added to the summary (``per_run``)."""
    target, mask = dataset.targets()
    lengths = DEFAULT_LENGTHS if lengths is None else lengths
    summary, per_node = score(pred, target, mask, target_sfreq=dataset.target_sfreq, lengths=lengths,
                              node_names=dataset.target_names)
    summary.update({"part": dataset.part, "window_s": float(dataset.window_s)})
    per_run = {}
    for key, rows in dataset.windows.groupby("key", sort=False).groups.items():
        idx = np.asarray([dataset.windows.index.get_loc(r) for r in rows])
        sub, _ = score(pred[idx], target[idx], mask[idx], target_sfreq=dataset.target_sfreq, lengths=lengths)
        per_run[str(key)] = {k: v for k, v in sub.items() if k.startswith(("spearman_", "pearson_", "rmse"))
                             and not k.endswith("_std")}
    summary["per_run"] = per_run
    return summary, per_node


def evaluate(model: torch.nn.Module, dataset, *, lengths: dict[str, float] | None = None,
             batch_size: int = 16, device: str | torch.device = "cpu") -> tuple[dict[str, Any], pd.DataFrame]:
    """Predict every window of ``dataset`` and score it (see :func:`score`)."""
    pred = predict(model, dataset, batch_size=batch_size, device=device)
    return evaluate_predictions(pred, dataset, lengths=lengths)


def baseline_predictions(dataset, kind: str) -> np.ndarray:
    """Predictions of a trivial baseline (``"mean"`` or ``"persistence"``) for ``dataset``'s
    windows, in the dataset's z-scored units (see the module docstring)."""
    if kind not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, not {kind!r}")
    target, _ = dataset.targets()
    if kind == "mean":
        return np.zeros_like(target)
    pred = np.zeros_like(target)
    fmri_target = dataset.direction == "ephys2fmri"
    for i, row in enumerate(dataset.windows.itertuples(index=False)):
        ephys, fmri = dataset.normalizer.transform(dataset.runs[row.run])
        series = fmri if fmri_target else ephys
        start = row.fmri_start if fmri_target else row.ephys_start
        length = target.shape[-1]
        if start >= length:
            pred[i] = series[:, start - length:start]
        elif start > 0:
            pred[i] = series[:, start - 1:start]
        # else: run start, nothing observed before: the training mean (0), already there.
    return pred


def evaluate_baselines(dataset, *, lengths: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """Summary metrics of every baseline on ``dataset``."""
    return {kind: evaluate_predictions(baseline_predictions(dataset, kind), dataset, lengths=lengths)[0]
            for kind in BASELINES}


# ---------------------------------------------------------------------------------------------
# Envelope metrics (fMRI -> EEG/MEG)
# ---------------------------------------------------------------------------------------------
_ENVELOPE_KEYS = ("spearman_", "pearson_", "rmse")


def envelope_scores(pred, target, mask=None, *, sfreq: float, band, pred_is_envelope: bool = False,
                    lengths: dict[str, float] | None = None, node_names: Sequence[str] | None = None
                    ) -> tuple[dict[str, Any], pd.DataFrame]:
    """:func:`score` of band-limited amplitude envelopes (``[W, N, T]`` EEG/MEG windows).

    The hemodynamic signal carries the power of the oscillations, not their phase, so an fMRI ->
    EEG/MEG prediction is also judged on envelopes: the envelope of every target window in
    ``band`` (Hz; :func:`samba_pipeline.training.targets.ephys_envelope`, scipy ``filtfilt`` +
    ``hilbert``) against that of the prediction, or against the prediction itself when it already
    is an envelope (``pred_is_envelope``, e.g. a SAMBA model with ``target = "envelope"``). Both
    envelopes are z-scored per window and node first (correlations are unchanged; the RMSE is then
    in standard deviations). Returns the :func:`score` outputs with ``envelope_`` prefixed to the
    correlation and RMSE keys / columns, plus ``envelope_band_hz``.
    """
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(f"pred and target must be [windows, nodes, time] of one shape, got "
                         f"{pred.shape} and {target.shape}")
    env_t = standardize_np(ephys_envelope(target, sfreq, band))
    env_p = standardize_np(pred if pred_is_envelope else ephys_envelope(pred, sfreq, band))
    summary, per_node = score(env_p, env_t, mask, target_sfreq=sfreq, lengths=lengths, node_names=node_names)
    summary = {(f"envelope_{k}" if k.startswith(_ENVELOPE_KEYS) else k): v for k, v in summary.items()}
    summary["envelope_band_hz"] = [float(b) for b in band]
    per_node = per_node.rename(columns={c: f"envelope_{c}" for c in per_node.columns
                                        if str(c).startswith(_ENVELOPE_KEYS)})
    return summary, per_node


def evaluate_envelopes(pred: np.ndarray, dataset, *, band, pred_is_envelope: bool = False,
                       lengths: dict[str, float] | None = None) -> tuple[dict[str, Any], pd.DataFrame]:
    """:func:`envelope_scores` of predictions for the windows of an fMRI -> EEG/MEG
    :class:`WindowDataset` (its targets are the z-scored EEG/MEG windows)."""
    if dataset.direction != "fmri2ephys":
        raise ValueError("envelope metrics apply to EEG/MEG targets (direction fmri2ephys)")
    target, mask = dataset.targets()
    summary, per_node = envelope_scores(pred, target, mask, sfreq=dataset.target_sfreq, band=band,
                                        pred_is_envelope=pred_is_envelope, lengths=lengths,
                                        node_names=dataset.target_names)
    summary.update({"part": dataset.part, "window_s": float(dataset.window_s)})
    return summary, per_node


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def write_metrics(path_prefix, summary: dict[str, Any],
                  per_node: pd.DataFrame | None = None) -> dict[str, Path]:
    """Write ``<prefix>.json`` (summary) and ``<prefix>.tsv`` (per node), atomically.

    ``path_prefix`` ends with the BIDS suffix, e.g.
    ``OUT/group/task-rest_desc-samba_metrics`` -> ``..._metrics.json`` + ``..._metrics.tsv``.
    """
    prefix = str(path_prefix)
    written = {"json": write_json(prefix + ".json", summary)}
    if per_node is not None:
        written["tsv"] = write_tsv(prefix + ".tsv", per_node)
    return written
