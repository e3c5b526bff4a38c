"""Applying a trained model to a whole recording (participant-level inference).

:func:`predict_run` z-scores the source series (with given statistics, else the recording's own:
no target data is needed or used), cuts it into consecutive windows of the model's length
(the last one aligned with the end of the recording, filling only what the others leave uncovered), predicts
each and stitches the predictions into one target series on the same timeline, in the z-scored
target units the model was trained on.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from samba_pipeline.align import to_sample
from samba_pipeline.errors import SambaInputError
from samba_pipeline.models.base import Batch


@torch.no_grad()
def predict_run(model: torch.nn.Module, source, *, source_mean=None, source_std=None,
                batch_size: int = 16, device: str | torch.device = "cpu", dropout: bool = False
                ) -> np.ndarray:
    """Predict the target series ``[n_target, n_out]`` of a whole source series ``[n_source, n]``.

    ``n`` is at the model's source rate (``model.dims.source_sfreq``) and must hold at least one
    window; ``n_out = floor(n / source_sfreq * target_sfreq)``. ``source_mean``/``source_std``
    (per node) default to the series' own statistics. ``dropout=True`` keeps the dropout layers
    active (one Monte-Carlo dropout sample; everything else in evaluation mode).
    """
    dims = model.dims
    x = np.asarray(source.detach().cpu() if isinstance(source, torch.Tensor) else source, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != dims.n_source:
        raise SambaInputError(f"source must be [{dims.n_source}, samples], got {list(x.shape)}")
    if not np.isfinite(x).all():
        raise SambaInputError("source series holds NaN or infinite values")
    mean = x.mean(axis=1) if source_mean is None else np.asarray(source_mean, dtype=np.float64)
    std = x.std(axis=1) if source_std is None else np.asarray(source_std, dtype=np.float64)
    std = np.where(std > 1e-6 * max(float(np.max(std)), 1e-30), std, 1.0)
    x = ((x - mean[:, None]) / std[:, None]).astype(np.float32)

    n = x.shape[1]
    duration = n / dims.source_sfreq
    n_out = int(math.floor(duration * dims.target_sfreq + 1e-9))
    if n < dims.source_len or n_out < dims.target_len:
        raise SambaInputError(f"the recording ({duration:g} s) is shorter than one model window "
                              f"({dims.window_s:g} s)")
    n_windows = int(math.floor(duration / dims.window_s + 1e-9))
    onsets = [k * dims.window_s for k in range(n_windows)]
    if n_windows * dims.target_len < n_out:  # one more window, aligned with the end
        onsets.append(duration - dims.window_s)
    src_starts = np.minimum(to_sample(np.asarray(onsets), dims.source_sfreq), n - dims.source_len)
    tgt_starts = np.minimum(to_sample(np.asarray(onsets), dims.target_sfreq), n_out - dims.target_len)
    # The end-aligned window only fills what the regular windows leave uncovered.
    fill_from = tgt_starts.copy()
    if len(onsets) > n_windows:
        fill_from[-1] = min(int(to_sample(n_windows * dims.window_s, dims.target_sfreq)), n_out)

    modes = {m: m.training for m in model.modules()}
    model.eval()
    if dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.dropout._DropoutNd):
                module.train()
    device = torch.device(device)
    out = np.zeros((dims.n_target, n_out), dtype=np.float32)
    try:
        for first in range(0, len(onsets), batch_size):
            idx = range(first, min(first + batch_size, len(onsets)))
            windows = np.stack([x[:, src_starts[i]:src_starts[i] + dims.source_len] for i in idx])
            pred = model(Batch(source=torch.from_numpy(windows).to(device), target=None))
            pred = pred.detach().float().cpu().numpy()
            for j, i in enumerate(idx):
                stop = tgt_starts[i] + dims.target_len
                out[:, fill_from[i]:stop] = pred[j][:, fill_from[i] - tgt_starts[i]:]
    finally:
        for module, mode in modes.items():
            module.training = mode
    return out
