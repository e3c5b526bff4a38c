"""Per-parcel learnable double-gamma haemodynamic response functions (SAMBA eq. 1).

The double gamma follows SPM's parametrisation (``spm_hrf``): with ``t' = t - onset``,

    h(t) = G(t'; a1 = peak_delay / peak_dispersion, scale = peak_dispersion)
           - undershoot_ratio * G(t'; a2 = undershoot_delay / undershoot_dispersion,
                                  scale = undershoot_dispersion)

where ``G(.; a, scale)`` is the gamma density (``scipy.stats.gamma(a, scale=scale).pdf``) and
``h = 0`` for ``t' <= 0``. Defaults 6 s, 16 s, 1, 1, 1/6, 0 s give the canonical HRF (peak near
5 s, undershoot near 15 s).

Each parcel's six parameters come from a small MLP applied to a learnable per-parcel embedding,
squashed with ``tanh`` into physiological ranges centred on the defaults. The kernels of all
parcels are convolved with all parcels' signals at once by FFT (:func:`fft_convolve`).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.fft import next_fast_len
from torch import nn

PARAM_NAMES = (
    "peak_delay_s",
    "undershoot_delay_s",
    "peak_dispersion_s",
    "undershoot_dispersion_s",
    "undershoot_ratio",
    "onset_s",
)
DEFAULTS = (6.0, 16.0, 1.0, 1.0, 1.0 / 6.0, 0.0)
# Half-widths of the allowed ranges: peak delay 3-9 s, undershoot delay 10-22 s, dispersions
# 0.5-1.5 s, undershoot ratio 0.02-0.32, onset -1..+1 s.
HALF_RANGES = (3.0, 6.0, 0.5, 0.5, 0.15, 1.0)


def double_gamma(t: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Double-gamma HRF values.

    ``t``: ``[K]`` seconds; ``params``: ``[..., 6]`` in :data:`PARAM_NAMES` order. Returns
    ``[..., K]``. Differentiable in every parameter (zero where ``t <= onset``).
    """
    p = params.unsqueeze(-2)  # [..., 1, 6]
    d1, d2, s1, s2, ratio, onset = (p[..., i] for i in range(6))
    x = t.to(params.dtype) - onset  # [..., K]
    pos = x > 0
    xs = torch.where(pos, x, torch.ones_like(x))
    logx = torch.log(xs)
    a1, a2 = d1 / s1, d2 / s2
    # log densities: (a - 1) log x - x / scale - log Gamma(a) - a log(scale)
    l1 = (a1 - 1) * logx - xs / s1 - (torch.lgamma(a1) + a1 * torch.log(s1))
    l2 = (a2 - 1) * logx - xs / s2 - (torch.lgamma(a2) + a2 * torch.log(s2))
    h = torch.exp(l1) - ratio * torch.exp(l2)
    return torch.where(pos, h, torch.zeros_like(h))


class _KernelRFFT(torch.autograd.Function):
    """``torch.fft.rfft(k, n)`` for real ``k``, with a half-spectrum (``irfft``) backward.

    PyTorch differentiates ``rfft`` through a full-length complex FFT; the adjoint of the
    one-sided DFT is ``Re(sum_f g_f e^{+2 pi i f k / n})``, i.e. ``n * irfft`` of ``g`` with the
    interior bins halved, which costs a quarter as much.
    """

    @staticmethod
    def forward(ctx, k: torch.Tensor, n: int) -> torch.Tensor:
        ctx.n, ctx.length = n, k.shape[-1]
        return torch.fft.rfft(k, n=n)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        n = ctx.n
        g = grad.clone()
        last = g.shape[-1] - 1 if n % 2 == 0 else g.shape[-1]
        g[..., 1:last] *= 0.5
        # irfft ignores the imaginary parts of these bins anyway (the right-hand sides are
        # copies: with one kernel row the real view would overlap the slice being written)
        g[..., 0] = g[..., 0].real.clone()
        if n % 2 == 0:
            g[..., -1] = g[..., -1].real.clone()
        out = torch.fft.irfft(g, n=n) * n
        return out[..., : ctx.length], None


def kernel_rfft(k: torch.Tensor, n: int) -> torch.Tensor:
    """One-sided spectrum of real kernels ``k [..., K]`` zero-padded to ``n`` (cheap backward)."""
    if not (torch.is_grad_enabled() and k.requires_grad):
        return torch.fft.rfft(k, n=n)
    return _KernelRFFT.apply(k, n)


def fft_convolve(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Causal linear convolution along the last axis, truncated to ``x``'s length.

    ``out[..., t] = sum_{m <= t} h[..., m] x[..., t - m]`` (``np.convolve(x, h)[:T]``), computed
    with ``rfft``/``irfft`` and zero padding to ``>= T + K - 1`` so there is no circular
    wrap-around. ``h`` broadcasts against ``x``'s leading axes (e.g. ``[N, 1, K]`` kernels for
    ``[B, N, S, T]`` signals).
    """
    T, K = x.shape[-1], h.shape[-1]
    n = next_fast_len(T + K - 1, real=True)
    spec = torch.fft.rfft(x, n=n) * kernel_rfft(h.to(x.dtype), n)
    return torch.fft.irfft(spec, n=n)[..., :T]


class ParcelHRF(nn.Module):
    """Learnable double-gamma HRF per parcel.

    Parameters: a per-parcel embedding ``[n_parcels, embed_dim]`` and an MLP
    ``embed_dim -> hidden -> 6`` whose ``tanh`` outputs are mapped to
    ``DEFAULTS + HALF_RANGES * tanh(.)``. With ``learn=False`` there are no parameters and every
    parcel uses the canonical HRF.
    """

    def __init__(self, n_parcels: int, embed_dim: int = 8, hidden: int = 16, learn: bool = True):
        super().__init__()
        self.n_parcels, self.learn = int(n_parcels), bool(learn)
        self.register_buffer("defaults", torch.tensor(DEFAULTS), persistent=False)
        self.register_buffer("half_ranges", torch.tensor(HALF_RANGES), persistent=False)
        if self.learn:
            self.embedding = nn.Parameter(torch.randn(self.n_parcels, embed_dim) * 0.5)
            self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden), nn.Tanh(), nn.Linear(hidden, 6))
            # Start close to the canonical HRF (small, non-zero last layer so gradients flow).
            nn.init.normal_(self.mlp[2].weight, std=0.01)
            nn.init.zeros_(self.mlp[2].bias)

    def parameters_table(self) -> torch.Tensor:
        """``[n_parcels, 6]`` physical parameters (PARAM_NAMES order)."""
        if not self.learn:
            return self.defaults.expand(self.n_parcels, 6)
        raw = self.mlp(self.embedding)
        return self.defaults + self.half_ranges * torch.tanh(raw)

    def kernels(self, sfreq: float, kernel_s: float) -> torch.Tensor:
        """``[n_parcels, K]`` kernels sampled at ``sfreq`` over ``kernel_s`` seconds, scaled by ``dt``
        (so a convolution approximates the continuous integral)."""
        k = max(1, int(round(kernel_s * sfreq)))
        t = torch.arange(k, device=self.defaults.device, dtype=torch.float32) / float(sfreq)
        return double_gamma(t, self.parameters_table()) / float(sfreq)

    def curves(self, resolution_s: float, kernel_s: float) -> tuple[np.ndarray, np.ndarray]:
        """(time axis [K], HRF values [n_parcels, K]) for display (no ``dt`` scaling)."""
        k = max(1, int(round(kernel_s / resolution_s)))
        t = torch.arange(k, device=self.defaults.device, dtype=torch.float32) * float(resolution_s)
        with torch.no_grad():
            h = double_gamma(t, self.parameters_table())
        return t.cpu().numpy(), h.cpu().numpy()

    def forward(self, x: torch.Tensor, sfreq: float, kernel_s: float, parcel_axis: int = 1) -> torch.Tensor:
        """Convolve ``x`` (parcels on ``parcel_axis``, time last) with each parcel's HRF."""
        h = self.kernels(sfreq, kernel_s)  # [N, K]
        shape = [1] * x.dim()
        shape[parcel_axis] = self.n_parcels
        shape[-1] = h.shape[-1]
        return fft_convolve(x, h.reshape(shape))
