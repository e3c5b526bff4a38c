"""SAMBA, fMRI -> electrophysiology (``plugin_name = "samba"``, direction ``fmri2ephys``).

The reverse translation of the seed paper (section II.B). One forward pass (``B`` windows, ``Nf``
fMRI parcels, ``Ne`` EEG/MEG nodes, ``T`` volumes, ``L`` EEG/MEG samples, ``H`` hidden channels,
``S = levels + 1`` wavelet scales)::

    fMRI [B, Nf, T]
      -> temporal input convolution (``input_kernel`` volumes, shared by the parcels)
         + a learned parcel embedding                                       -> [B, T, Nf, H]
      -> GATv2 on the fMRI graph (B*T graphs, top-k |cosine| edges)          spatial
      -> region-masked linear map fMRI parcels -> EEG/MEG nodes              downsampling
      -> GATv2 on the EEG/MEG graph                                         -> [B, Ne, T, H]
      -> per-scale linear estimators of the wavelet coefficients of the HRF-smoothed EEG/MEG
         signal at the intermediate rate ``r`` (the EEG/MEG rate divided by an integer ``s``,
         about ``intermediate_rate`` Hz): one temporal convolution ``H -> S`` channels
         (``estimator_kernel_s`` wide, channel ``j`` = scale ``j``) read out at every
         coefficient's centre time by linear interpolation, times a learned per-node gain per
         scale                                                               -> S coefficient sets
      -> inverse DWT (:class:`~samba_pipeline.models.samba.wavelet.DWT`, the same PyWavelets
         filters as the forward transform)              -> HRF-smoothed signal z [B, Ne, Lr]
      -> pseudo-inverse HRF: per-node transposed 1-D convolution, one learnable kernel per node
         (``pinv_hrf_kernel_s`` long, centred: it reads z up to half its length ahead, where the
         delayed hemodynamic trace of an event lies; initialised to the Wiener pseudo-inverse of
         the canonical HRF)                                                  -> u [B, Ne, Lr]
      -> LSTM decoder over the ``Lr`` intermediate steps, shared by all nodes (inputs u and z, plus
         the previous target value with teacher forcing): y_r = u + readout(LSTM)
      -> linear interpolation to the EEG/MEG rate (a fixed transposed convolution of stride ``s``
         with a triangular kernel)                                          -> [B, Ne, L]

The pseudo-inverse HRF followed by the interpolation is one strided transposed convolution (its
kernel is the learned kernel upsampled by the triangle); the LSTM sits between the two factors so
that it steps through ``Lr`` (240 for 60 s at 4 Hz) instead of ``L`` (12000 at 200 Hz) samples: the
fMRI carries nothing above the intermediate Nyquist frequency that the extra steps could use, and
a free-running decoder then loops over 240, not 12000, time steps.

Loss (:meth:`SambaFmri2Ephys.loss`): ``lambda * L_match + (1 - lambda) * L_reg`` with
``lambda = lambda_match``; ``L_match`` is the cosine loss (eq. 7) of the output against the
target series, ``L_reg`` the wavelet skip loss (eq. 6, :func:`wavelet_skip_loss`): the
energy-weighted per-scale cosine loss of the predicted coefficients against the DWT of the true
HRF-smoothed signal ``HRF * pool_s(target)`` (per-node learnable double-gamma HRF at rate ``r``;
``pool_s`` = means over blocks of ``s`` samples), averaged over the valid nodes.

``target = "envelope"``: the model predicts the band-limited amplitude envelope
(:mod:`samba_pipeline.training.targets`, band ``envelope_band``) z-scored per window and node,
instead of the raw samples, and the HRF-smoothed signal is that of the envelope; the forward
output then is an envelope (compare it with
:func:`samba_pipeline.training.metrics.evaluate_envelopes` with ``pred_is_envelope=True``).

Region map (``dims.region_map``): ``[n_source, n_target]`` = fMRI parcels x EEG/MEG nodes, the
orientation :func:`samba_pipeline.training.data.make_dims` keeps in both directions (fine parcels
as rows); ``region_map[i, j] = 1`` lets fMRI parcel ``i`` feed EEG/MEG node ``j``. ``None``
(sensor-space EEG/MEG): every parcel may feed every node.

Every step is vectorised over batch items, parcels and time; only the free-running decoder with
teacher forcing loops, over the intermediate time steps.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.fft import next_fast_len
from torch import nn

from samba_pipeline.models.base import Batch, DataDims, TranslationModel, cosine_loss
from samba_pipeline.models.samba.graph import BatchedGATv2, RegionMaskedLinear, topk_edges
from samba_pipeline.models.samba.hrf import DEFAULTS, PARAM_NAMES, ParcelHRF, double_gamma
from samba_pipeline.models.samba.wavelet import (
    DWT,
    coefficient_offsets,
    default_level,
    scale_bands,
    scale_names,
)
from samba_pipeline.training.targets import TARGETS, check_band, ephys_envelope_torch


def _standardize(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """z-score along the last axis (population SD); constant series become 0."""
    mean = x.mean(-1, keepdim=True)
    std = x.std(-1, keepdim=True, unbiased=False) if x.shape[-1] > 1 else torch.ones_like(mean)
    return (x - mean) / (std + eps)


def block_mean(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Means over consecutive blocks of ``stride`` samples (the last block may be partial):
    ``[..., L] -> [..., ceil(L / stride)]``."""
    if stride == 1:
        return x
    L = x.shape[-1]
    n = -(-L // stride)
    pad = n * stride - L
    if pad:
        x = torch.cat([x, x.new_zeros(*x.shape[:-1], pad)], dim=-1)
    sums = x.reshape(*x.shape[:-1], n, stride).sum(-1)
    counts = torch.full((n,), float(stride), dtype=x.dtype, device=x.device)
    counts[-1] = stride - pad
    return sums / counts


def coefficient_lengths(n: int, level: int, filter_len: int) -> list[int]:
    """Coefficient counts of :func:`pywt.wavedec` (``'zero'``/``'symmetric'`` modes), wavedec order."""
    lengths = []
    for _ in range(level):
        n = (n + filter_len - 1) // 2
        lengths.append(n)
    return [lengths[-1]] + lengths[::-1]


def wavelet_skip_loss(pred: list[torch.Tensor], true: list[torch.Tensor],
                      mask: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """Wavelet skip loss (eq. 6): per node, ``sum_s w_s (1 - cos(pred_s, true_s))`` over the
    scales (``[B, N, n_s]`` each), with ``w_s = ||true_s||^2 / sum_r ||true_r||^2`` the true energy
    share of the scale, averaged over batch items and valid nodes.

    Each scale is matched on its own (the model cannot trade one scale for another), scales
    without true energy do not count, and the measure is scale-free like the cosine loss of the
    output (the HRF-smoothed raw signal is tiny next to the raw one). It is 0 when every
    predicted scale is a positive multiple of the true one, in particular for the true
    coefficients, and at most 2."""
    energy = torch.stack([t.float().square().sum(-1) for t in true], dim=-1)  # [B, N, S]
    cos = torch.stack([
        (p.float() * t.float()).sum(-1) / (p.float().norm(dim=-1) * t.float().norm(dim=-1) + eps)
        for p, t in zip(pred, true)], dim=-1)
    weight = energy / (energy.sum(-1, keepdim=True) + eps)
    loss = (weight * (1.0 - cos)).sum(-1)  # [B, N]
    if mask is not None:
        m = mask.to(loss.dtype).expand_as(loss)
        return (loss * m).sum() / m.sum().clamp_min(1.0)
    return loss.mean()


@lru_cache(maxsize=32)
def wiener_pinv_kernel(rate: float, n_taps: int, hrf_kernel_s: float, snr: float = 10.0) -> np.ndarray:
    """``n_taps`` (odd) taps of the Wiener pseudo-inverse of the canonical HRF sampled at
    ``rate``: ``G = conj(H) / (|H|^2 + max|H|^2 / snr)``; tap ``k`` weighs the signal
    ``k - (n_taps - 1) // 2`` samples *ahead* of the output sample (convolution lag ``-(k - c)``)."""
    k = max(1, int(round(hrf_kernel_s * rate)))
    t = torch.arange(k, dtype=torch.float64) / rate
    h = double_gamma(t, torch.tensor(DEFAULTS, dtype=torch.float64)).numpy() / rate
    n = 1 << int(math.ceil(math.log2(4 * (k + n_taps))))
    H = np.fft.rfft(h, n)
    G = np.conj(H) / (np.abs(H) ** 2 + np.abs(H).max() ** 2 / snr)
    g = np.fft.irfft(G, n)  # g[i]: e[t] ~ sum_i g[i] z[t - i] (circular; i < 0 wraps)
    c = (n_taps - 1) // 2
    lags = np.arange(n_taps) - c  # lag l = k - c: tap k reads z[t + l]
    out = g[np.mod(-lags, n)]
    out.setflags(write=False)
    return out


class SambaFmri2Ephys(TranslationModel):
    """SAMBA fMRI -> electrophysiology translation model (see the module docstring)."""

    plugin_name = "samba"
    plugin_version = "1"
    directions = ("fmri2ephys",)

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        return {
            # What is predicted: "raw" EEG/MEG samples, or their band-limited amplitude
            # "envelope" in envelope_band (Hz), z-scored per window and node.
            "target": "raw",
            "envelope_band": [8.0, 12.0],
            # Loss: lambda_match * cosine (eq. 7) + (1 - lambda_match) * wavelet skip loss (eq. 6).
            "lambda_match": 0.5,
            "wavelet": "db4",
            "wavelet_mode": "symmetric",  # or "zero"
            # Intermediate rate (Hz) of the wavelet stage and the decoder: the EEG/MEG rate divided
            # by the nearest integer (at most the EEG/MEG rate).
            "intermediate_rate": 4.0,
            "levels": "auto",  # or an int; auto: approximation band below min_scale_hz
            "min_scale_hz": 0.25,
            "hrf_kernel_s": 30.0,
            "hrf_embed_dim": 8,
            "hrf_hidden": 16,
            "learn_hrf": True,
            "pinv_hrf_kernel_s": 16.0,  # support of the pseudo-inverse HRF, centred (+-8 s)
            "input_kernel": 3,  # volumes seen by the input convolution
            "estimator_kernel_s": 24.0,  # temporal support of the coefficient estimators
            "hidden_size": 32,
            "heads": 2,
            "top_k": 16,
            "gat_layers": 1,
            "gat_impl": "dense",
            "checkpoint_above_mb": 64.0,
            "lstm_hidden": 32,
            "dropout": 0.1,
            "teacher_forcing": False,
            "use_lstm": True,
            "use_source_gat": True,
            "use_target_gat": True,
            # Ablation (benchmark): False skips the pseudo-inverse HRF (identity instead).
            "use_pinv_hrf": True,
        }

    def __init__(self, config: dict[str, Any], dims: DataDims):
        super().__init__(config, dims)
        cfg = self.config
        if cfg["target"] not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, not {cfg['target']!r}")
        for key in ("hidden_size", "heads", "lstm_hidden", "hrf_embed_dim", "hrf_hidden", "gat_layers",
                    "input_kernel"):
            if int(cfg[key]) < 1:
                raise ValueError(f"{key} must be >= 1")
        for key in ("hrf_kernel_s", "pinv_hrf_kernel_s", "estimator_kernel_s", "intermediate_rate",
                    "min_scale_hz"):
            if not float(cfg[key]) > 0:
                raise ValueError(f"{key} must be positive")
        if not 0.0 <= float(cfg["lambda_match"]) <= 1.0:
            raise ValueError("lambda_match must be in [0, 1]")
        if not 0 <= float(cfg["dropout"]) < 1:
            raise ValueError("dropout must be in [0, 1)")
        self.target_kind = cfg["target"]
        # The band is checked only where it is used (a raw model may live at any rate).
        self.envelope_band = (list(check_band(cfg["envelope_band"], dims.target_sfreq))
                              if self.target_kind == "envelope" else list(cfg["envelope_band"]))
        H = int(cfg["hidden_size"])
        nf, ne = int(dims.n_source), int(dims.n_target)
        self.n_source, self.n_target = nf, ne
        self.fmri_sfreq = float(dims.source_sfreq)
        self.ephys_sfreq = float(dims.target_sfreq)

        # --- time geometry ----------------------------------------------------------------
        self.stride = max(1, int(round(self.ephys_sfreq / float(cfg["intermediate_rate"]))))
        self.rate = self.ephys_sfreq / self.stride
        n_mid = -(-max(2, dims.target_len) // self.stride)
        level = cfg["levels"]
        if level in (None, "auto", 0):
            level = default_level(self.rate, n_mid, cfg["wavelet"], float(cfg["min_scale_hz"]))
        self.level = int(level)
        if self.level < 1:
            raise ValueError("levels must be >= 1")
        self.dwt = DWT(cfg["wavelet"], self.level, cfg["wavelet_mode"])
        self.scale_names = scale_names(self.level)
        self.scale_bands = scale_bands(self.rate, self.level)
        self.n_scales = self.level + 1
        self._offsets = coefficient_offsets(self.level, self.dwt.filter_len)
        self._spacing = [2**self.level] + [2**j for j in range(self.level, 0, -1)]
        self._geometry: dict = {}

        # --- encoder: input, graphs, region map ------------------------------------------
        k_in = int(cfg["input_kernel"])
        self.input_conv = nn.Conv1d(1, H, k_in, padding=k_in // 2)
        self.source_embedding = nn.Parameter(torch.randn(nf, H) * 0.1)
        self.dropout = nn.Dropout(float(cfg["dropout"]))
        k, heads, n_layers = int(cfg["top_k"]), int(cfg["heads"]), int(cfg["gat_layers"])
        self.source_gat = nn.ModuleList()
        self.target_gat = nn.ModuleList()
        if cfg["use_source_gat"]:
            ei, ew = topk_edges(dims.source_graph, nf, k)
            self.source_gat.extend(BatchedGATv2(ei, ew, nf, H, H, heads, impl=cfg["gat_impl"])
                                   for _ in range(n_layers))
        region = dims.region_map
        if region is not None:
            region = np.asarray(region)
            if region.shape != (nf, ne):
                raise ValueError(f"region_map must be [n_source (fMRI parcels) = {nf}, n_target (EEG/MEG "
                                 f"nodes) = {ne}] for fmri2ephys, got {list(region.shape)}")
            region = region.T
        self.region_map = RegionMaskedLinear(region, ne, nf, H)
        if cfg["use_target_gat"]:
            ei, ew = topk_edges(dims.target_graph, ne, k)
            self.target_gat.extend(BatchedGATv2(ei, ew, ne, H, H, heads, impl=cfg["gat_impl"])
                                   for _ in range(n_layers))
        for layer in (*self.source_gat, *self.target_gat):
            layer.checkpoint_bytes = float(cfg["checkpoint_above_mb"]) * 2**20

        # --- temporal upsampling: per-scale coefficient estimators ------------------------
        half = max(0, int(round(float(cfg["estimator_kernel_s"]) * self.fmri_sfreq / 2)))
        self.estimator = nn.Conv1d(H, self.n_scales, 2 * half + 1, padding=half)
        self.scale_log_gain = nn.Parameter(torch.zeros(ne, self.n_scales))

        # --- HRF of the skip-loss target, pseudo-inverse HRF, decoder ---------------------
        self.hrf = ParcelHRF(ne, int(cfg["hrf_embed_dim"]), int(cfg["hrf_hidden"]),
                             learn=bool(cfg["learn_hrf"]))
        n_taps = max(1, int(round(float(cfg["pinv_hrf_kernel_s"]) * self.rate))) | 1
        init = wiener_pinv_kernel(self.rate, n_taps, float(cfg["hrf_kernel_s"]))
        # conv_transpose1d weight [Ne, 1, K]: out[m + k] += z[m] w[k]; cropped at c = (K - 1) // 2,
        # u[n] = sum_k w[k] z[n + c - k]: tap k reads z (c - k) samples ahead.
        self.pinv_kernel = nn.Parameter(torch.tensor(init[::-1].copy(), dtype=torch.float32)
                                        .repeat(ne, 1).unsqueeze(1))
        if cfg["use_lstm"]:
            n_in = 3 if cfg["teacher_forcing"] else 2
            self.lstm = nn.LSTM(n_in, int(cfg["lstm_hidden"]), batch_first=True)
            self.readout = nn.Linear(int(cfg["lstm_hidden"]), 1)
        else:
            self.lstm = None
        self._last_coeffs: list[torch.Tensor] | None = None
        self._last_scale_energy: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------
    @property
    def output_kind(self) -> str:
        """``"raw"`` (EEG/MEG samples) or ``"envelope"`` (z-scored band-limited envelope)."""
        return self.target_kind

    def lengths(self, n_volumes: int, batch: Batch | None = None) -> tuple[int, int]:
        """(EEG/MEG samples ``L``, intermediate samples ``Lr``) of a window of ``n_volumes``."""
        if batch is not None and batch.target is not None:
            L = int(batch.target.shape[-1])
        elif n_volumes == self.dims.source_len:
            L = self.dims.target_len
        else:
            L = max(1, int(round(n_volumes / self.fmri_sfreq * self.ephys_sfreq)))
        return L, -(-L // self.stride)

    def _readout_positions(self, T: int, n_mid: int, device) -> tuple[torch.Tensor, ...]:
        """Gather indices into the flattened estimator output ``[.., S * T]`` and interpolation
        weights for every coefficient of every scale (cached per window geometry)."""
        key = (T, n_mid, str(device))
        if key not in self._geometry:
            sizes = coefficient_lengths(n_mid, self.level, self.dwt.filter_len)
            idx0, idx1, frac, chan = [], [], [], []
            for s, (n_s, off, spacing) in enumerate(zip(sizes, self._offsets, self._spacing)):
                q = off + spacing * np.arange(n_s)  # centre, in intermediate samples
                t_s = (q * self.stride + (self.stride - 1) / 2.0) / self.ephys_sfreq
                p = np.clip(t_s * self.fmri_sfreq - 0.5, 0.0, T - 1)  # volume t centred at (t+1/2) TR
                i0 = np.floor(p).astype(np.int64)
                idx0.append(s * T + i0)
                idx1.append(s * T + np.minimum(i0 + 1, T - 1))
                frac.append(p - i0)
                chan.append(np.full(n_s, s))
            cat = np.concatenate
            if len(self._geometry) > 8:
                self._geometry.clear()
            self._geometry[key] = (
                sizes,
                torch.as_tensor(cat(idx0), device=device), torch.as_tensor(cat(idx1), device=device),
                torch.as_tensor(cat(frac), dtype=torch.float32, device=device),
                torch.as_tensor(cat(chan), device=device),
            )
        return self._geometry[key]

    def _apply(self, fn, *args, **kwargs):  # device moves invalidate the cached geometry
        self._geometry = {}
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        """Copies and pickles leave out the last forward pass's coefficients (graph tensors)."""
        state = dict(super().__getstate__())
        state["_last_coeffs"] = None
        state["_geometry"] = {}
        return state

    # ------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """fMRI ``[B, Nf, T]`` -> EEG/MEG node features ``[B, Ne, T, H]`` (spatial downsampling)."""
        B, Nf, T = x.shape
        h = self.input_conv(x.reshape(B * Nf, 1, T))  # [B*Nf, H, T]
        h = h.view(B, Nf, -1, T).permute(0, 3, 1, 2) + self.source_embedding  # [B, T, Nf, H]
        h = self.dropout(h).reshape(B * T, Nf, -1)
        for layer in self.source_gat:
            h = layer(h)
        h = self.region_map(h)  # [B*T, Ne, H]
        for layer in self.target_gat:
            h = layer(h)
        h = self.dropout(h)
        return h.view(B, T, self.n_target, -1).permute(0, 2, 1, 3)

    def estimate_coefficients(self, h: torch.Tensor, n_mid: int) -> list[torch.Tensor]:
        """Per-scale linear estimators: ``h [B, Ne, T, H]`` -> ``[cA_J, cD_J, ..., cD_1]`` of a
        length-``n_mid`` signal, each ``[B, Ne, n_s]``."""
        B, Ne, T, H = h.shape
        a = self.estimator(h.reshape(B * Ne, T, H).transpose(1, 2))  # [B*Ne, S, T]
        sizes, i0, i1, frac, chan = self._readout_positions(T, n_mid, h.device)
        flat = a.reshape(B, Ne, self.n_scales * T)
        frac = frac.to(flat.dtype)
        c = flat.index_select(-1, i0) * (1 - frac) + flat.index_select(-1, i1) * frac
        c = c * torch.exp(self.scale_log_gain).index_select(1, chan).to(c.dtype)
        return list(torch.split(c, sizes, dim=-1))

    def synthesize(self, coeffs: list[torch.Tensor], n_mid: int) -> torch.Tensor:
        """Inverse DWT cropped to ``n_mid`` samples (:func:`pywt.waverec` may return one more)."""
        return self.dwt.inverse(coeffs)[..., :n_mid]

    def pseudo_inverse_hrf(self, z: torch.Tensor) -> torch.Tensor:
        """Per-node transposed convolution ``[B, Ne, Lr] -> [B, Ne, Lr]`` (centred kernel);
        the identity with ``use_pinv_hrf = False``."""
        if not self.config["use_pinv_hrf"]:
            return z
        K = self.pinv_kernel.shape[-1]
        c = (K - 1) // 2
        full = F.conv_transpose1d(z, self.pinv_kernel.to(z.dtype), groups=self.n_target)
        return full[..., c: c + z.shape[-1]]

    def decode(self, u: torch.Tensor, z: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        """LSTM decoder at the intermediate rate: ``y = u + readout(LSTM([u, z (, y_prev)]))``.

        ``previous`` (teacher forcing): the true intermediate-rate series; ``None`` with teacher
        forcing configured: free running on the model's own outputs (a loop over time steps)."""
        if self.lstm is None:
            return u
        B, N, Lr = u.shape
        feats = torch.stack([u, z], dim=-1).reshape(B * N, Lr, 2)
        if not self.config["teacher_forcing"]:
            out, _ = self.lstm(feats)
            return u + self.readout(out).view(B, N, Lr)
        if previous is not None:
            prev = F.pad(previous[..., :-1].to(u.dtype), (1, 0)).reshape(B * N, Lr, 1)
            out, _ = self.lstm(torch.cat([feats, prev], dim=-1))
            return u + self.readout(out).view(B, N, Lr)
        uu = u.reshape(B * N, Lr, 1)
        state, prev, outs = None, u.new_zeros(B * N, 1, 1), []
        for t in range(Lr):  # autoregressive over time steps only
            out, state = self.lstm(torch.cat([feats[:, t: t + 1], prev], dim=-1), state)
            prev = uu[:, t: t + 1] + self.readout(out)
            outs.append(prev)
        return torch.cat(outs, dim=1).view(B, N, Lr)

    def upsample(self, y: torch.Tensor, L: int) -> torch.Tensor:
        """Intermediate rate -> EEG/MEG rate by linear interpolation between block centres."""
        if self.stride == 1:
            return y[..., :L]
        full = F.interpolate(y, size=y.shape[-1] * self.stride, mode="linear", align_corners=False)
        return full[..., :L]

    def forward(self, batch: Batch) -> torch.Tensor:
        x = batch.source
        if x.dim() != 3 or x.shape[1] != self.n_source:
            raise ValueError(f"source must be [B, {self.n_source}, T], got {list(x.shape)}")
        x = torch.nan_to_num(x)
        L, n_mid = self.lengths(x.shape[-1], batch)
        h = self.encode(x)
        coeffs = self.estimate_coefficients(h, n_mid)
        z = self.synthesize(coeffs, n_mid)
        u = self.pseudo_inverse_hrf(z)
        previous = None
        if self.training and self.config["teacher_forcing"] and batch.target is not None:
            with torch.no_grad():
                previous = block_mean(self.regression_target(batch.target), self.stride)
        y = self.upsample(self.decode(u, z, previous), L)
        self._last_coeffs = coeffs
        with torch.no_grad():
            energy = torch.stack([c.detach().float().square().sum(-1) for c in coeffs], dim=-1)  # [B, Ne, S]
            self._last_scale_energy = (energy / energy.sum(-1, keepdim=True).clamp_min(1e-30)).mean(0)
        return y

    # ------------------------------------------------------------------------------------
    def regression_target(self, target: torch.Tensor) -> torch.Tensor:
        """What the output is compared with: the (NaN-free) target, or its z-scored envelope."""
        target = torch.nan_to_num(target.float())
        if self.target_kind == "envelope":
            with torch.no_grad():
                env = ephys_envelope_torch(target, self.ephys_sfreq, self.envelope_band)
                return _standardize(env)
        return target

    def smoothed_signal(self, regression_target: torch.Tensor) -> torch.Tensor:
        """The HRF-smoothed signal ``HRF * pool_s(target)`` at the intermediate rate ``[B, Ne, Lr]``:
        causal linear convolution with each node's HRF (``np.convolve(x, h)[:Lr]``), by FFT."""
        pooled = block_mean(regression_target, self.stride)
        kernels = self.hrf.kernels(self.rate, float(self.config["hrf_kernel_s"]))  # [Ne, K]
        n = next_fast_len(pooled.shape[-1] + kernels.shape[-1] - 1, real=True)
        # Plain torch.fft autograd (hrf.kernel_rfft's custom backward fails for a single node).
        spec = torch.fft.rfft(pooled, n=n) * torch.fft.rfft(kernels.to(pooled.dtype), n=n)
        return torch.fft.irfft(spec, n=n)[..., : pooled.shape[-1]]

    def true_coefficients(self, regression_target: torch.Tensor) -> list[torch.Tensor]:
        """Wavelet coefficients of :meth:`smoothed_signal` (the skip loss's reference)."""
        return self.dwt(self.smoothed_signal(regression_target))

    def loss(self, prediction: torch.Tensor, batch: Batch) -> torch.Tensor:
        """``lambda * cosine(prediction, target) + (1 - lambda) * skip(coefficients)``, over the
        valid EEG/MEG nodes. The skip loss uses the coefficients of the last forward pass, which
        must be the one that produced ``prediction``."""
        target = self.regression_target(batch.target)
        lam = float(self.config["lambda_match"])
        match = cosine_loss(prediction, target, batch.target_mask)
        if lam >= 1.0:
            return match
        coeffs = self._last_coeffs
        if coeffs is None or coeffs[0].shape[0] != prediction.shape[0]:
            raise RuntimeError("loss() needs the wavelet coefficients of the forward pass that produced "
                               "the prediction; call the model on this batch first")
        skip = wavelet_skip_loss(coeffs, self.true_coefficients(target), batch.target_mask)
        return lam * match + (1.0 - lam) * skip

    # ------------------------------------------------------------------------------------
    def interpretation(self) -> dict[str, Any]:
        """Learned HRFs, pseudo-inverse HRF kernels, wavelet-scale weights, graph attention.

        * ``hrf_parameters`` (DataFrame, one row per EEG/MEG node), ``hrf_curves`` ``[Ne, K]`` and
          ``hrf_time_s`` ``[K]``: the HRFs of the skip-loss target (0.1 s resolution).
        * ``pinv_hrf_kernels`` ``[Ne, K]`` and ``pinv_hrf_lag_s`` ``[K]``: the pseudo-inverse HRF
          as a filter, ``u(t) = sum_k kernel[k] z(t + lag_k)`` (positive lag = reads the future
          of the smoothed signal); ``pinv_hrf_summary`` (DataFrame per node: lag of the largest
          absolute tap, sum of the taps).
        * ``wavelet_scales``: DataFrame per scale (``scale``, ``band_low_hz``, ``band_high_hz`` at
          the intermediate rate, ``weight`` = share of the predicted coefficients' energy in the
          last forward pass averaged over nodes (NaN before any), ``gain`` = learned gain averaged
          over nodes); ``wavelet_scales_per_node`` (nodes x scales, energy shares).
        * ``graph_attention``: DataFrame ``graph`` ('source' = fMRI, 'target' = EEG/MEG),
          ``layer``, ``source``, ``target``, ``source_name``, ``target_name``, ``weight`` (GATv2
          attention averaged over heads, batch and time steps of the last forward pass).
        """
        snames = _names(self.dims.source_names, self.n_source, "source")
        tnames = _names(self.dims.target_names, self.n_target, "target")
        with torch.no_grad():
            params = self.hrf.parameters_table().detach().cpu().numpy()
            kernels = self.pinv_kernel.detach().float().cpu().numpy()[:, 0, ::-1].copy()
            gains = torch.exp(self.scale_log_gain).detach().cpu().numpy()
        index = pd.Index(tnames, name="node")
        hrf_params = pd.DataFrame(params, columns=list(PARAM_NAMES), index=index)
        t, curves = self.hrf.curves(0.1, float(self.config["hrf_kernel_s"]))
        K = kernels.shape[-1]
        lags = (np.arange(K) - (K - 1) // 2) / self.rate  # kernels[:, j] reads z(t + lags[j])
        pinv_summary = pd.DataFrame({"peak_lag_s": lags[np.argmax(np.abs(kernels), axis=1)],
                                     "kernel_sum": kernels.sum(axis=1)}, index=index)
        e = self._last_scale_energy
        per_node = (np.full((self.n_target, self.n_scales), np.nan) if e is None else e.cpu().numpy())
        wav = pd.DataFrame({
            "scale": self.scale_names,
            "band_low_hz": [b[0] for b in self.scale_bands],
            "band_high_hz": [b[1] for b in self.scale_bands],
            "weight": per_node.mean(axis=0),
            "gain": gains.mean(axis=0),
        })
        return {
            "hrf_parameters": hrf_params,
            "hrf_curves": curves,
            "hrf_time_s": t,
            "pinv_hrf_kernels": kernels,
            "pinv_hrf_lag_s": lags,
            "pinv_hrf_summary": pinv_summary,
            "wavelet_scales": wav,
            "wavelet_scales_per_node": pd.DataFrame(per_node, columns=self.scale_names, index=index),
            "graph_attention": graph_attention_table((("source", self.source_gat, snames),
                                                      ("target", self.target_gat, tnames))),
        }


def _names(names, n: int, prefix: str) -> list[str]:
    names = list(names)
    return names if len(names) == n else [f"{prefix}{i}" for i in range(n)]


def graph_attention_table(groups) -> pd.DataFrame:
    """Attention of the last forward pass of ``(graph, layers, node names)`` groups, one row per edge."""
    rows = []
    for graph, layers, names in groups:
        for li, layer in enumerate(layers):
            if layer.last_attention is None:
                continue
            ei = layer.edge_index.cpu().numpy()
            rows.append(pd.DataFrame({
                "graph": graph, "layer": li, "source": ei[0], "target": ei[1],
                "source_name": np.asarray(names, dtype=object)[ei[0]],
                "target_name": np.asarray(names, dtype=object)[ei[1]],
                "weight": layer.last_attention.cpu().numpy(),
            }))
    cols = ["graph", "layer", "source", "target", "source_name", "target_name", "weight"]
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=cols)
