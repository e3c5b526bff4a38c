"""SAMBA, electrophysiology -> fMRI (``plugin_name = "samba"``).

Pipeline of one forward pass (``B`` windows, ``Ns`` source nodes, ``Nt`` target parcels, ``T``
fMRI time steps, ``S = levels + 1`` wavelet scales, ``H`` hidden channels)::

    source [B, Ns, L]
      -> front end                                   -> per-scale features [B, Ns, S, T]
         "paper":         per-parcel HRF on the raw signal (FFT, source rate) -> DWT
                          -> coefficients averaged within each fMRI time step
         "neurovascular": DWT of the raw signal -> log mean-square coefficients in bins at
                          ``envelope_rate`` Hz (power envelopes) -> z-scored per window
                          -> per-parcel HRF (FFT, envelope rate) -> averaged within each TR
      -> attention over wavelet scales (softmax, data dependent)   -> [B, T, Ns, H]
      -> GATv2 on the source graph (B*T graphs, top-k |cosine| edges)
      -> region-masked linear map source -> target parcels         -> [B, T, Nt, H]
      -> GATv2 on the target graph
      -> LSTM over time shared by all target parcels (previous BOLD value as extra input:
         the true one while training with teacher forcing, its own prediction otherwise)
      -> [B, Nt, T]

Every step is vectorised over batch items, parcels and (except the free-running decoder, which
loops over time steps only) time.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.fft import next_fast_len
from torch import nn
from torch.utils.checkpoint import checkpoint

from samba_pipeline.models.base import Batch, DataDims, TranslationModel, cosine_loss
from samba_pipeline.models.samba.graph import BatchedGATv2, RegionMaskedLinear, topk_edges
from samba_pipeline.models.samba.hrf import PARAM_NAMES, ParcelHRF, kernel_rfft
from samba_pipeline.models.samba.wavelet import (
    DWT,
    coefficient_offsets,
    default_level,
    scale_bands,
    scale_names,
)

FRONT_ENDS = ("paper", "neurovascular")
_ROW_CHUNK_ELEMENTS = 1_000_000  # source samples per front-end chunk (~4 MB in float32)


def _crop_in_window(c: torch.Tensor, offset: float, spacing: int, n_samples: int) -> torch.Tensor:
    """Keep the coefficients whose centre lies inside the window ``[0, n_samples)``."""
    start = max(0, math.ceil(-offset / spacing))
    stop = min(c.shape[-1], math.ceil((n_samples - offset) / spacing))
    if stop - start < 1:  # window shorter than one coefficient: keep everything
        return c
    return c[..., start:stop]


def _pool(x: torch.Tensor, n_out: int) -> torch.Tensor:
    """Average the last axis into ``n_out`` equal bins (``[..., n] -> [..., n_out]``)."""
    lead = x.shape[:-1]
    return F.adaptive_avg_pool1d(x.reshape(-1, 1, x.shape[-1]), n_out).reshape(*lead, n_out)


def _standardize(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """z-score along the last axis (unbiased=False); constant series become 0."""
    mean = x.mean(-1, keepdim=True)
    std = x.std(-1, keepdim=True, unbiased=False) if x.shape[-1] > 1 else torch.ones_like(mean)
    return (x - mean) / (std + eps)


class ScaleAttention(nn.Module):
    """Attention over wavelet scales.

    The per-scale features ``x [..., S]`` of a node and time step are scored by a small MLP
    (``S -> hidden -> S``, tanh), the softmax over scales gives the weights ``a``, and the output
    is the weighted sum of the scales' embeddings ``e_s = x_s v_s + b_s``:
    ``sum_s a_s e_s = (a * x) @ V + a @ B`` (never materialising ``[..., S, H]``). The weights of the
    last forward pass (mean over batch and time, per node) are kept in :attr:`last_weights`
    ``[Ns, S]``. ``enabled=False``: uniform weights and no scoring parameters.
    """

    def __init__(self, n_scales: int, hidden: int, score_hidden: int = 16, enabled: bool = True):
        super().__init__()
        self.n_scales, self.enabled = int(n_scales), bool(enabled)
        self.scale_weight = nn.Parameter(torch.randn(n_scales, hidden) / math.sqrt(n_scales))
        self.scale_bias = nn.Parameter(torch.randn(n_scales, hidden) * 0.1)
        if self.enabled:
            self.score = nn.Sequential(nn.Linear(n_scales, score_hidden), nn.Tanh(),
                                       nn.Linear(score_hidden, n_scales))
        self.last_weights: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., Ns, S] -> [..., Ns, H]``."""
        if self.enabled:
            a = torch.softmax(self.score(x), dim=-1)
        else:
            a = x.new_full(x.shape, 1.0 / self.n_scales)
        self.last_weights = a.detach().reshape(-1, *a.shape[-2:]).mean(0)
        return (a * x) @ self.scale_weight + a @ self.scale_bias


class SambaEphys2Fmri(TranslationModel):
    """SAMBA electrophysiology -> fMRI translation model (see the module docstring)."""

    plugin_name = "samba"
    plugin_version = "1"
    directions = ("ephys2fmri",)

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        return {
            # Front end: "neurovascular" (DWT -> log power envelopes -> HRF) or "paper"
            # (HRF on the raw signal -> DWT).
            "front_end": "neurovascular",
            "wavelet": "db4",
            "wavelet_mode": "symmetric",  # or "zero" (both match pywt.wavedec)
            "levels": "auto",  # or an int; auto: as many as keep the coarsest detail band >= min_scale_hz
            "min_scale_hz": 1.0,
            "envelope_rate": 2.0,  # Hz, power-envelope rate of the neurovascular front end
            "hrf_kernel_s": 30.0,
            "hrf_embed_dim": 8,
            "hrf_hidden": 16,
            "learn_hrf": True,
            "normalize_features": True,  # z-score each parcel's per-scale feature in the window
            "hidden_size": 32,
            "scale_attention_hidden": 16,  # hidden units of the scale-attention scoring MLP
            "heads": 2,
            "top_k": 16,
            "gat_layers": 1,  # GATv2 layers on each of the source and target graphs
            "gat_impl": "dense",  # "dense" (padded neighbour table) or "pyg" (scatter); same maths
            # Memory/time trade-off: a stage (a GAT layer, the paper front end) whose activations
            # kept for the backward pass would exceed this many MB recomputes them instead.
            "checkpoint_above_mb": 64.0,
            "lstm_hidden": 32,
            "dropout": 0.1,
            # Off by default: free-running training generalises better on withheld demo data
            # (group level, 3 subjects x 5 min, 60 s windows, lr 3e-3; Spearman minute on withheld
            # windows / withheld subject, seed 2: 0.18/0.20 without vs 0.12/0.14 with teacher
            # forcing; seed 3: 0.15/0.14 vs 0.14/0.16; 30 s windows, seed 1: 0.12/0.12 vs 0.07/0.10).
            "teacher_forcing": False,
            "use_wavelet_attention": True,
            "use_lstm": True,
            "use_source_gat": True,
            "use_target_gat": True,
            # Ablations (benchmark): "transformer" replaces the LSTM decoder by a Transformer
            # encoder over time steps (shared by all target parcels); "mse" replaces the cosine loss.
            # A fixed canonical HRF is ``learn_hrf = False``.
            "decoder": "lstm",
            "loss": "cosine",
        }

    def __init__(self, config: dict[str, Any], dims: DataDims):
        super().__init__(config, dims)
        cfg = self.config
        if cfg["front_end"] not in FRONT_ENDS:
            raise ValueError(f"front_end must be one of {FRONT_ENDS}, not {cfg['front_end']!r}")
        for key in ("hidden_size", "heads", "lstm_hidden", "hrf_embed_dim", "hrf_hidden",
                    "scale_attention_hidden", "gat_layers"):
            if int(cfg[key]) < 1:
                raise ValueError(f"{key} must be >= 1")
        if float(cfg["hrf_kernel_s"]) <= 0 or float(cfg["envelope_rate"]) <= 0:
            raise ValueError("hrf_kernel_s and envelope_rate must be positive")
        if not 0 <= float(cfg["dropout"]) < 1:
            raise ValueError("dropout must be in [0, 1)")
        if cfg["decoder"] not in ("lstm", "transformer") or cfg["loss"] not in ("cosine", "mse"):
            raise ValueError("decoder must be 'lstm' or 'transformer' and loss 'cosine' or 'mse'")
        H = int(cfg["hidden_size"])
        ns, nt = int(dims.n_source), int(dims.n_target)
        self.n_source, self.n_target = ns, nt

        # --- front end -------------------------------------------------------------------
        self.source_sfreq = float(dims.source_sfreq)
        self.target_sfreq = float(dims.target_sfreq)
        src_len = max(2, dims.source_len)
        level = cfg["levels"]
        if level in (None, "auto", 0):
            level = default_level(self.source_sfreq, src_len, cfg["wavelet"], float(cfg["min_scale_hz"]))
        self.level = int(level)
        if self.level < 1:
            raise ValueError("levels must be >= 1")
        self.dwt = DWT(cfg["wavelet"], self.level, cfg["wavelet_mode"])
        self.scale_names = scale_names(self.level)
        self.scale_bands = scale_bands(self.source_sfreq, self.level)
        self._offsets = coefficient_offsets(self.level, self.dwt.filter_len)
        self._spacing = [2**self.level] + [2**j for j in range(self.level, 0, -1)]
        self.hrf = ParcelHRF(ns, int(cfg["hrf_embed_dim"]), int(cfg["hrf_hidden"]),
                             learn=bool(cfg["learn_hrf"]))

        # --- scale attention and node identity -------------------------------------------
        self.scale_attention = ScaleAttention(self.level + 1, H, int(cfg["scale_attention_hidden"]),
                                              enabled=bool(cfg["use_wavelet_attention"]))
        self.source_embedding = nn.Parameter(torch.randn(ns, H) * 0.1)
        self.dropout = nn.Dropout(float(cfg["dropout"]))

        # --- graphs -----------------------------------------------------------------------
        k, heads, n_layers = int(cfg["top_k"]), int(cfg["heads"]), int(cfg["gat_layers"])
        self.source_gat = nn.ModuleList()
        self.target_gat = nn.ModuleList()
        if cfg["use_source_gat"]:
            ei, ew = topk_edges(dims.source_graph, ns, k)
            self.source_gat.extend(BatchedGATv2(ei, ew, ns, H, H, heads, impl=cfg["gat_impl"])
                                   for _ in range(n_layers))
        self.region_map = RegionMaskedLinear(dims.region_map, nt, ns, H)
        if cfg["use_target_gat"]:
            ei, ew = topk_edges(dims.target_graph, nt, k)
            self.target_gat.extend(BatchedGATv2(ei, ew, nt, H, H, heads, impl=cfg["gat_impl"])
                                   for _ in range(n_layers))

        self._checkpoint_bytes = float(cfg["checkpoint_above_mb"]) * 2**20
        for layer in (*self.source_gat, *self.target_gat):
            layer.checkpoint_bytes = self._checkpoint_bytes

        # --- decoder ----------------------------------------------------------------------
        self.transformer = None
        if cfg["use_lstm"] and cfg["decoder"] == "transformer":
            layer = nn.TransformerEncoderLayer(H, int(cfg["heads"]), dim_feedforward=2 * H,
                                               dropout=float(cfg["dropout"]), batch_first=True)
            self.transformer = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
            self.lstm = None
            self.readout = nn.Linear(H, 1)
        elif cfg["use_lstm"]:
            Hl = int(cfg["lstm_hidden"])
            self.lstm = nn.LSTM(H + 1, Hl, batch_first=True)
            self.readout = nn.Linear(Hl, 1)
        else:
            self.lstm = None
            self.readout = nn.Linear(H, 1)

    # ------------------------------------------------------------------------------------
    def _lengths(self, n_samples: int, batch: Batch) -> tuple[int, int]:
        """Target steps ``T`` and envelope bins ``E`` for a window of ``n_samples`` source samples."""
        if batch.target is not None:
            T = int(batch.target.shape[-1])
        else:
            T = max(1, int(round(n_samples / self.source_sfreq * self.target_sfreq)))
        E = max(T, int(round(n_samples / self.source_sfreq * float(self.config["envelope_rate"]))))
        return T, E

    def _paper_rows(self, x: torch.Tensor, kernel_spec: torch.Tensor, n_fft: int, T: int) -> torch.Tensor:
        """Paper order on rows ``[r, L]`` with their HRF spectra ``[r, n_fft // 2 + 1]``: HRF (FFT
        convolution) -> DWT -> mean of each scale's in-window coefficients per fMRI time step
        -> ``[r, S, T]``."""
        L = x.shape[-1]
        y = torch.fft.irfft(torch.fft.rfft(x, n=n_fft) * kernel_spec, n=n_fft)[..., :L]
        coeffs = self.dwt(y)
        return torch.stack([
            _pool(_crop_in_window(c, o, s, L), T)
            for c, o, s in zip(coeffs, self._offsets, self._spacing)
        ], dim=1)

    def _envelope_rows(self, x: torch.Tensor, E: int) -> torch.Tensor:
        """Neurovascular order on rows ``[r, L]``: DWT -> log mean square of each scale's
        in-window coefficients in ``E`` bins -> ``[r, S, E]``."""
        L = x.shape[-1]
        coeffs = self.dwt(x)
        env = torch.stack([
            _pool(_crop_in_window(c, o, s, L).square(), E)
            for c, o, s in zip(coeffs, self._offsets, self._spacing)
        ], dim=1)
        return torch.log(env + 1e-6)

    def front_end(self, x: torch.Tensor, T: int, E: int) -> torch.Tensor:
        """``[B, Ns, L] -> [B, Ns, S, T]`` per-scale features at the fMRI time steps.

        The (batch, parcel) rows are processed in chunks of about ``_ROW_CHUNK_ELEMENTS`` samples:
        each chunk's transform stays in the CPU cache, and the transient memory is bounded
        whatever the batch size (each chunk is fully vectorised; the chunk count is
        ``B * Ns * L / _ROW_CHUNK_ELEMENTS``, not the number of parcels).
        """
        B, Ns, L = x.shape
        rows = x.reshape(B * Ns, L)
        step = max(1, _ROW_CHUNK_ELEMENTS // L)
        kernel_s = float(self.config["hrf_kernel_s"])
        if self.config["front_end"] == "paper":
            kernels = self.hrf.kernels(self.source_sfreq, kernel_s)  # [Ns, K]
            # Exact causal linear convolution (see hrf.fft_convolve): zero padding to >= L + K - 1.
            n_fft = next_fast_len(L + kernels.shape[-1] - 1, real=True)
            kernel_spec = kernel_rfft(kernels, n_fft)  # [Ns, n_fft // 2 + 1]
            # With gradients and a large input, recompute each chunk in the backward pass
            # instead of keeping its spectra and coefficients (about 4 bytes kept per input byte).
            ckpt = (torch.is_grad_enabled()
                    and 4 * rows.numel() * rows.element_size() > self._checkpoint_bytes)
            outs = []
            for i in range(0, B * Ns, step):
                idx = torch.arange(i, min(i + step, B * Ns), device=x.device) % Ns
                args = (rows[i: i + step], kernel_spec.index_select(0, idx), n_fft, T)
                outs.append(checkpoint(self._paper_rows, *args, use_reentrant=False) if ckpt
                            else self._paper_rows(*args))
            feats = torch.cat(outs).view(B, Ns, -1, T)
        else:
            with torch.set_grad_enabled(torch.is_grad_enabled() and x.requires_grad):
                env = torch.cat([self._envelope_rows(rows[i: i + step], E)
                                 for i in range(0, B * Ns, step)]).view(B, Ns, -1, E)
                # z-score each envelope over the window: the zero padding of the causal
                # convolution then means "average power", not "log power 0".
                env = _standardize(env)
            rate = E * self.source_sfreq / L
            y = self.hrf(env, rate, kernel_s, parcel_axis=1)
            feats = _pool(y, T)
        if self.config["normalize_features"]:
            feats = _standardize(feats)
        return feats

    def encode(self, x: torch.Tensor, T: int, E: int) -> torch.Tensor:
        """Node features of the target parcels ``[B, Nt, T, H]``."""
        B = x.shape[0]
        feats = self.front_end(x, T, E)  # [B, Ns, S, T]
        h = self.scale_attention(feats.permute(0, 3, 1, 2))  # [B, T, Ns, H]
        h = self.dropout(h + self.source_embedding)
        h = h.reshape(B * T, self.n_source, -1)
        for layer in self.source_gat:
            h = layer(h)
        h = self.region_map(h)  # [B*T, Nt, H]
        for layer in self.target_gat:
            h = layer(h)
        h = self.dropout(h)
        return h.view(B, T, self.n_target, -1).permute(0, 2, 1, 3)

    def decode(self, h: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        """``h [B, Nt, T, H]`` -> ``[B, Nt, T]``; ``target`` given -> teacher forcing."""
        B, N, T, H = h.shape
        if self.transformer is not None:
            from samba_pipeline.models.baselines import sinusoidal_positions

            seq = h.reshape(B * N, T, H) + sinusoidal_positions(T, H, h.device).to(h.dtype)
            return self.readout(self.transformer(seq)).view(B, N, T)
        if self.lstm is None:
            return self.readout(h).squeeze(-1)
        if target is not None:
            truth = torch.nan_to_num(target[..., :-1].to(h.dtype))  # NaN in masked parcels
            prev = F.pad(truth, (1, 0)).unsqueeze(-1)  # [B, N, T, 1]: y[t-1], 0 at t = 0
            out, _ = self.lstm(torch.cat([h, prev], dim=-1).view(B * N, T, H + 1))
            return self.readout(out).view(B, N, T)
        seq = h.reshape(B * N, T, H)
        state = None
        prev = h.new_zeros(B * N, 1, 1)
        outs = []
        for t in range(T):  # autoregressive over time steps only
            out, state = self.lstm(torch.cat([seq[:, t: t + 1], prev], dim=-1), state)
            prev = self.readout(out)  # [B*N, 1, 1]
            outs.append(prev)
        return torch.cat(outs, dim=1).view(B, N, T)

    def forward(self, batch: Batch) -> torch.Tensor:
        x = batch.source
        if x.dim() != 3 or x.shape[1] != self.n_source:
            raise ValueError(f"source must be [B, {self.n_source}, L], got {list(x.shape)}")
        T, E = self._lengths(x.shape[-1], batch)
        h = self.encode(x, T, E)
        use_truth = (
            self.training and bool(self.config["teacher_forcing"]) and batch.target is not None
        )
        return self.decode(h, batch.target if use_truth else None)

    def loss(self, prediction: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The seed paper's cosine loss (eq. 7, :func:`~samba_pipeline.models.base.cosine_loss`)
        over the valid target parcels; NaNs in masked-out parcels' targets are ignored."""
        target = batch.target
        if batch.target_mask is not None:
            target = torch.nan_to_num(target)
        if self.config["loss"] == "mse":
            err = (prediction - target).square()
            if batch.target_mask is None:
                return err.mean()
            m = batch.target_mask.to(err.dtype)[..., None].expand_as(err)
            return (err * m).sum() / m.sum().clamp_min(1.0)
        return cosine_loss(prediction, target, batch.target_mask)

    def latent(self, batch: Batch) -> torch.Tensor:
        """Target-parcel node features of :meth:`encode` per fMRI time step, ``[B, T, Nt * H]``
        (what the benchmark's stimulus classification reads)."""
        x = batch.source
        T, E = self._lengths(x.shape[-1], batch)
        h = self.encode(x, T, E)  # [B, Nt, T, H]
        return h.permute(0, 2, 1, 3).reshape(x.shape[0], T, -1)

    # ------------------------------------------------------------------------------------
    def interpretation(self) -> dict[str, Any]:
        """Learned HRFs, wavelet-scale attention and graph attention (last forward pass).

        * ``hrf_parameters``: DataFrame, one row per source node (index: node names), the six
          double-gamma parameters.
        * ``hrf_curves`` ``[n_source, K]`` and ``hrf_time_s`` ``[K]``: the HRFs at 0.1 s over
          ``hrf_kernel_s`` (density values, not scaled by the sampling step).
        * ``wavelet_attention``: DataFrame per scale (``scale``, ``band_low_hz``,
          ``band_high_hz``, ``weight`` = mean softmax weight over batch, time and nodes of the
          last forward pass; NaN before any forward), and ``wavelet_attention_per_node``
          (DataFrame nodes x scales).
        * ``graph_attention``: DataFrame ``graph`` ('source'/'target'), ``layer``, ``source``,
          ``target`` (node indices), ``source_name``, ``target_name``, ``weight`` (GATv2 attention
          averaged over heads, batch and time steps of the last forward pass).
        """
        names = list(self.dims.source_names) or [f"source{i}" for i in range(self.n_source)]
        if len(names) != self.n_source:
            names = [f"source{i}" for i in range(self.n_source)]
        tnames = list(self.dims.target_names)
        if len(tnames) != self.n_target:
            tnames = [f"target{i}" for i in range(self.n_target)]
        with torch.no_grad():
            params = self.hrf.parameters_table().detach().cpu().numpy()
        hrf_params = pd.DataFrame(params, columns=list(PARAM_NAMES), index=pd.Index(names, name="node"))
        t, curves = self.hrf.curves(0.1, float(self.config["hrf_kernel_s"]))

        w = self.scale_attention.last_weights
        per_node = (np.full((self.n_source, len(self.scale_names)), np.nan) if w is None
                    else w.cpu().numpy())
        wav = pd.DataFrame({
            "scale": self.scale_names,
            "band_low_hz": [b[0] for b in self.scale_bands],
            "band_high_hz": [b[1] for b in self.scale_bands],
            "weight": per_node.mean(axis=0),
        })
        per_node_df = pd.DataFrame(per_node, columns=self.scale_names, index=pd.Index(names, name="node"))

        rows = []
        for graph, layers, nn_names in (("source", self.source_gat, names),
                                        ("target", self.target_gat, tnames)):
            for li, layer in enumerate(layers):
                if layer.last_attention is None:
                    continue
                ei = layer.edge_index.cpu().numpy()
                rows.append(pd.DataFrame({
                    "graph": graph, "layer": li, "source": ei[0], "target": ei[1],
                    "source_name": np.asarray(nn_names, dtype=object)[ei[0]],
                    "target_name": np.asarray(nn_names, dtype=object)[ei[1]],
                    "weight": layer.last_attention.cpu().numpy(),
                }))
        cols = ["graph", "layer", "source", "target", "source_name", "target_name", "weight"]
        gat = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=cols)
        return {
            "hrf_parameters": hrf_params,
            "hrf_curves": curves,
            "hrf_time_s": t,
            "wavelet_attention": wav,
            "wavelet_attention_per_node": per_node_df,
            "graph_attention": gat,
        }
