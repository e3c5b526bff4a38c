"""Differentiable multilevel discrete wavelet transform (DWT) and its inverse, in torch.

The filters come from PyWavelets (``pywt.Wavelet(name).dec_lo`` ...), never hand-typed; the
transforms reproduce :func:`pywt.wavedec` / :func:`pywt.waverec` exactly for the ``'zero'`` and
``'symmetric'`` signal-extension modes (see ``tests/test_samba_model.py``), vectorised over every
leading axis (batch, parcels) with ``conv1d`` / ``conv_transpose1d``.

PyWavelets' single-level analysis step is a full convolution with the filter followed by keeping
the odd samples: ``y[k] = sum_i f[i] x_ext[2k + 1 - i]`` for ``k < floor((n + L - 1) / 2)``, where
``x_ext`` is ``x`` extended by ``L - 1`` samples on both sides. Synthesis is the adjoint: zero
upsampling, full convolution with the reconstruction filters, and keeping the ``2n - L + 2``
central samples.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import pywt
import torch
import torch.nn.functional as F
from torch import nn

MODES = ("zero", "symmetric")


def default_level(sfreq: float, n_samples: int, wavelet: str = "db4", min_freq: float = 1.0) -> int:
    """Number of DWT levels so that the coarsest detail band starts at >= ``min_freq`` Hz.

    Detail level ``j`` covers ``[sfreq / 2**(j+1), sfreq / 2**j]`` Hz; the approximation at level
    ``J`` covers ``[0, sfreq / 2**(J+1)]``. The largest ``J`` with ``sfreq / 2**(J+1) >= min_freq``
    is taken (200 Hz -> 6 levels: coarsest detail 1.56-3.13 Hz, approximation below 1.56 Hz),
    capped by :func:`pywt.dwt_max_level` for the window length and at least 1.
    """
    level = int(math.floor(math.log2(sfreq / min_freq))) - 1 if sfreq > 2 * min_freq else 1
    cap = pywt.dwt_max_level(int(n_samples), pywt.Wavelet(wavelet).dec_len)
    return max(1, min(level, max(cap, 1)))


def scale_names(level: int) -> list[str]:
    """Names in :func:`pywt.wavedec` order: ``['cA{J}', 'cD{J}', ..., 'cD1']``."""
    return [f"cA{level}"] + [f"cD{j}" for j in range(level, 0, -1)]


def scale_bands(sfreq: float, level: int) -> list[tuple[float, float]]:
    """Nominal frequency band (Hz) of each scale, in :func:`pywt.wavedec` order."""
    bands = [(0.0, sfreq / 2 ** (level + 1))]
    bands += [(sfreq / 2 ** (j + 1), sfreq / 2**j) for j in range(level, 0, -1)]
    return bands


def coefficient_offsets(level: int, filter_len: int) -> list[float]:
    """Centre of coefficient 0 of each scale, in input samples (wavedec order).

    Coefficient ``k`` of level ``j`` is centred on input sample ``2**j * k - d * (2**j - 1)`` with
    ``d = (L - 3) / 2``; a negative offset means the first coefficients describe the boundary
    extension, not the signal.
    """
    d = (filter_len - 3) / 2.0
    offs = [-d * (2**j - 1) for j in range(level, 0, -1)]
    return [offs[0]] + offs


@lru_cache(maxsize=64)
def _symmetric_index(n: int, pad: int, right_extra: int = 0) -> np.ndarray:  # right_extra >= 0
    """Indices of a half-sample symmetric extension by ``pad`` samples (period ``2n``) on the left
    and ``pad + right_extra`` on the right."""
    idx = np.arange(-pad, n + pad + right_extra)
    m = np.mod(idx, 2 * n)
    return np.where(m >= n, 2 * n - 1 - m, m)


class DWT(nn.Module):
    """Multilevel DWT: ``x [..., n] -> [cA_J, cD_J, ..., cD_1]`` (pywt.wavedec order).

    No learnable parameters; gradients flow to the input.
    """

    def __init__(self, wavelet: str = "db4", level: int = 1, mode: str = "symmetric"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"wavelet mode must be one of {MODES}, not {mode!r}")
        w = pywt.Wavelet(wavelet)
        self.wavelet, self.level, self.mode = wavelet, int(level), mode
        self.filter_len = w.dec_len
        # conv1d is a cross-correlation: flip the filters to get a convolution.
        dec = np.stack([np.asarray(w.dec_lo)[::-1], np.asarray(w.dec_hi)[::-1]])[:, None, :]
        rec = np.stack([np.asarray(w.rec_lo), np.asarray(w.rec_hi)])[:, None, :]
        self.register_buffer("dec_filters", torch.tensor(dec.copy(), dtype=torch.float64), persistent=False)
        self.register_buffer("rec_filters", torch.tensor(rec.copy(), dtype=torch.float64), persistent=False)
        self.block = max(16, self.filter_len)  # outputs per block of the analysis matrix product
        self._blocks: dict = {}

    def _apply(self, fn, *args, **kwargs):  # dtype / device moves invalidate the cached matrices
        self._blocks = {}
        return super()._apply(fn, *args, **kwargs)

    def _extend(self, x: torch.Tensor, right_extra: int = 0, skip_first: bool = False) -> torch.Tensor:
        """``x`` extended by ``L - 1`` samples on the left and ``L - 1 + right_extra`` on the right
        (the extra samples only feed outputs that are discarded), optionally without its first
        sample; always contiguous."""
        pad = self.filter_len - 1
        if self.mode == "zero":
            left = pad - 1 if skip_first else pad
            if left < 0:
                return F.pad(x[:, 1:], (0, pad + right_extra))
            return F.pad(x, (left, pad + right_extra))
        idx = _symmetric_index(x.shape[-1], pad, right_extra)
        idx = torch.from_numpy(idx[1:] if skip_first else idx).to(x.device)
        return x.index_select(-1, idx)

    def _block_matrix(self, dtype, device) -> torch.Tensor:
        """``[2, 2b + L - 2, b]`` banded matrices (low-pass, high-pass): ``b`` outputs per block."""
        key = (dtype, device)
        if key not in self._blocks:
            b, L = self.block, self.filter_len
            g = self.dec_filters[:, 0].to(device=device, dtype=dtype)  # [2, L], flipped filters
            A = torch.zeros(2, 2 * b + L - 2, b, dtype=dtype, device=device)
            r = torch.arange(b, device=device)
            for m in range(L):
                A[:, 2 * r + m, r] = g[:, m : m + 1].expand(2, b)
            self._blocks[key] = A
        return self._blocks[key]

    def step(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One analysis level on ``[M, n]`` -> (approximation, detail), each ``[M, floor((n+L-1)/2)]``.

        ``y[k] = sum_m g[m] z[2k + m]`` (``z``: the extended signal without its first sample, ``g``:
        the flipped filter) computed block-wise: ``b`` outputs per block of ``2b + L - 2`` input
        samples as one matrix product per filter. On the CPU this is several times faster than
        ``conv1d`` with a single input channel.
        """
        M, n = x.shape
        L, b = self.filter_len, self.block
        n_out = (n + L - 1) // 2
        nblk = -(-n_out // b)
        # z = extension[1:], of length 2b(nblk + 1) so that it splits into nblk + 1 blocks.
        need = 2 * b * (nblk + 1)
        z = self._extend(x, max(0, need + 1 - (n + 2 * (L - 1))), skip_first=True)
        if z.shape[-1] > need:
            z = z[:, :need].contiguous()
        zb = z.reshape(M, nblk + 1, 2 * b)
        if L > 2:
            zb = torch.cat([zb[:, :-1], zb[:, 1:, : L - 2]], dim=-1)
        else:
            zb = zb[:, :-1]
        A = self._block_matrix(x.dtype, x.device)
        lo = (zb @ A[0]).view(M, nblk * b)[:, :n_out]
        hi = (zb @ A[1]).view(M, nblk * b)[:, :n_out]
        return lo, hi

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        lead = x.shape[:-1]
        a = x.reshape(-1, x.shape[-1])
        details = []
        for _ in range(self.level):
            a, d = self.step(a)
            details.append(d)
        coeffs = [a] + details[::-1]
        return [c.reshape(*lead, c.shape[-1]) for c in coeffs]

    def idwt_step(self, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """One synthesis level (pywt.idwt) on ``[M, n]`` pairs -> ``[M, 2n - L + 2]``."""
        n, L = a.shape[-1], self.filter_len
        stacked = torch.stack([a, d], dim=1)  # [M, 2, n]
        full = F.conv_transpose1d(stacked, self.rec_filters.to(a.dtype), stride=2)  # [M, 1, 2n - 2 + L]
        return full[:, 0, L - 2: L - 2 + 2 * n - L + 2]

    def inverse(self, coeffs: list[torch.Tensor]) -> torch.Tensor:
        """Multilevel inverse (pywt.waverec) of ``[cA_J, cD_J, ..., cD_1]``."""
        lead = coeffs[0].shape[:-1]
        a = coeffs[0].reshape(-1, coeffs[0].shape[-1])
        for d in coeffs[1:]:
            d = d.reshape(-1, d.shape[-1])
            if a.shape[-1] == d.shape[-1] + 1:
                a = a[:, : d.shape[-1]]
            elif a.shape[-1] != d.shape[-1]:
                raise ValueError("coefficient shape mismatch")
            a = self.idwt_step(a, d)
        return a.reshape(*lead, a.shape[-1])


def dwt(x: torch.Tensor, wavelet: str = "db4", level: int = 1, mode: str = "symmetric") -> list[torch.Tensor]:
    """Functional :class:`DWT` (matches ``pywt.wavedec(x, wavelet, mode, level)``)."""
    return DWT(wavelet, level, mode).to(x.device)(x)


def idwt(coeffs: list[torch.Tensor], wavelet: str = "db4", mode: str = "symmetric") -> torch.Tensor:
    """Functional inverse (matches ``pywt.waverec(coeffs, wavelet, mode)``)."""
    return DWT(wavelet, len(coeffs) - 1, mode).to(coeffs[0].device).inverse(coeffs)
