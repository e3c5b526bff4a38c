"""Seed 002's model (Calhas & Henriques): EEG spectrogram -> fMRI, ``plugin_name = "calhas"``.

One prediction per fMRI sample ``t`` (``[B, n_target, T]``), each from its own EEG context:

    EEG [B, C, L]
      -> STFT (Hann, ``stft_window_s`` = 2 s frames on a ``frame_hop_s`` grid), log magnitude
         up to ``max_freq_hz``, z-scored per electrode and frequency over the window
      -> per fMRI sample t: the ``n_frames`` = 10 consecutive 2 s frames covering
         ``[t - 26 s, t - 6 s]`` (frames before the window are missing: 0 after z-scoring,
         i.e. the window's mean spectrum)                                  -> [B, T, C, J * F]
      -> electrode encoder (shared linear + GELU)                          -> [B, T, C, d]
      -> topographical attention: scaled dot-product attention between electrodes (with
         learned electrode embeddings), scores A [B, T, C, C]
      -> random Fourier features of the attended electrodes (fixed Gaussian projection W,
         phases b: sqrt(2/D) cos(x W + b)) -> linear                      -> latent z [B, T, D]
      -> style: posterior q(s | A) = N(mu(A), sigma(A)) from the attention each electrode
         receives (reparameterised sample while training, the mean otherwise) modulates z
         (FiLM: z * (1 + tanh(g(s))) + h(s))
      -> decoder (linear)                                                  -> [B, n_target, T]

Training: an fMRI encoder maps each measured fMRI sample into the same latent space; the loss is
``MAE(decoder(z_eeg), y) + MAE(decoder(z_fmri), y) + w_cos (1 - cos(z_eeg, z_fmri)) + w_kl KL(q || N(0, I))``
(the shared latent space with its cosine regulariser, and the MAE loss of the paper).

Deviation from the paper: the output is the fMRI parcel series of the pipeline (the paper
predicts DCT-downsampled volumes); the benchmark scores RMSE and SSIM on DCT-downsampled
volumes painted from the parcels (:mod:`samba_pipeline.training.benchmark`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from samba_pipeline.models.base import Batch, DataDims, TranslationModel


def stft_magnitude(x: torch.Tensor, sfreq: float, window_s: float = 2.0, hop_s: float = 1.0
                   ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """|STFT| of ``x [..., L]`` with a periodic Hann window of ``window_s`` seconds every ``hop_s``
    seconds, frames fully inside the signal (``scipy.signal.stft(..., window="hann",
    boundary=None, padded=False)`` scaling: divided by the window's sum).

    Returns ``(magnitude [..., n_freq, n_frames], freqs_hz, frame_starts_s)``.
    """
    n_win = max(2, int(round(window_s * sfreq)))
    hop = max(1, int(round(hop_s * sfreq)))
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[-1] < n_win:
        flat = F.pad(flat, (0, n_win - flat.shape[-1]))
    window = torch.hann_window(n_win, periodic=True, dtype=x.dtype, device=x.device)
    spec = torch.stft(flat, n_fft=n_win, hop_length=hop, win_length=n_win, window=window, center=False,
                      return_complex=True)
    mag = spec.abs() / window.sum()
    freqs = np.fft.rfftfreq(n_win, 1.0 / sfreq)
    starts = np.arange(mag.shape[-1]) * hop / sfreq
    return mag.reshape(*lead, *mag.shape[-2:]), freqs, starts


class CalhasEEG2fMRI(TranslationModel):
    """Topographical-attention EEG -> fMRI model of Calhas & Henriques (see the module doc)."""

    plugin_name = "calhas"
    plugin_version = "1"
    directions = ("ephys2fmri",)

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        return {
            "stft_window_s": 2.0,
            "frame_hop_s": 1.0,  # grid of STFT frames; each fMRI sample takes the nearest frames
            "context_start_s": 26.0,  # EEG from t - 26 s ...
            "context_end_s": 6.0,  # ... to t - 6 s
            "max_freq_hz": 40.0,
            "electrode_dim": 16,
            "rff_dim": 256,
            "rff_sigma": 1.0,  # bandwidth of the random Fourier features (x is layer-normalised)
            "latent_dim": 64,
            "style_dim": 8,
            "dropout": 0.1,
            "cosine_weight": 0.5,
            "kl_weight": 1e-3,
            "fmri_reconstruction": True,
        }

    def __init__(self, config: dict[str, Any], dims: DataDims):
        super().__init__(config, dims)
        cfg = self.config
        span = float(cfg["context_start_s"]) - float(cfg["context_end_s"])
        self.win_s = float(cfg["stft_window_s"])
        if span <= 0 or self.win_s <= 0 or float(cfg["frame_hop_s"]) <= 0:
            raise ValueError("context_start_s must exceed context_end_s; window and hop must be positive")
        self.n_frames = max(1, int(round(span / self.win_s)))
        self.sfreq = float(dims.source_sfreq)
        n_win = max(2, int(round(self.win_s * self.sfreq)))
        freqs = np.fft.rfftfreq(n_win, 1.0 / self.sfreq)
        self.n_freq = int((freqs <= float(cfg["max_freq_hz"])).sum())
        C, d, D, Z, S = (dims.n_source, int(cfg["electrode_dim"]), int(cfg["rff_dim"]),
                         int(cfg["latent_dim"]), int(cfg["style_dim"]))
        self.n_electrodes = C
        self.electrode_encoder = nn.Sequential(nn.Linear(self.n_frames * self.n_freq, d), nn.GELU())
        self.electrode_embedding = nn.Parameter(torch.randn(C, d) * 0.1)
        self.query = nn.Linear(d, d, bias=False)
        self.key = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(d, d, bias=False)
        self.norm = nn.LayerNorm(C * d)
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("rff_weight", torch.randn(C * d, D, generator=gen) / float(cfg["rff_sigma"]))
        self.register_buffer("rff_phase", torch.rand(D, generator=gen) * 2 * math.pi)
        self.to_latent = nn.Linear(D, Z)
        self.style_posterior = nn.Sequential(nn.Linear(C, 32), nn.GELU(), nn.Linear(32, 2 * S))
        self.style_scale = nn.Linear(S, Z)
        self.style_shift = nn.Linear(S, Z)
        self.fmri_encoder = nn.Sequential(nn.Linear(dims.n_target, Z), nn.GELU(), nn.Linear(Z, Z))
        self.decoder = nn.Linear(Z, dims.n_target)
        self.drop = nn.Dropout(float(cfg["dropout"]))
        self._aux: dict[str, torch.Tensor] = {}
        self.last_attention: torch.Tensor | None = None

    # ---- input ------------------------------------------------------------------------------
    def spectrogram_context(self, x: torch.Tensor, T: int) -> torch.Tensor:
        """``[B, C, L]`` -> per fMRI sample the z-scored log spectra of its EEG context frames,
        ``[B, T, C, J * F]``."""
        cfg = self.config
        mag, _, starts = stft_magnitude(x, self.sfreq, self.win_s, float(cfg["frame_hop_s"]))
        logmag = torch.log(mag[..., : self.n_freq, :] + 1e-6)  # [B, C, F, N]
        mean = logmag.mean(-1, keepdim=True)
        std = logmag.std(-1, keepdim=True, unbiased=False) if logmag.shape[-1] > 1 else torch.ones_like(mean)
        z = (logmag - mean) / (std + 1e-5)
        n = z.shape[-1]
        hop = float(starts[1] - starts[0]) if n > 1 else float(cfg["frame_hop_s"])
        tr = 1.0 / float(self.dims.target_sfreq)
        t = np.arange(T)[:, None] * tr  # [T, 1] time of each fMRI sample in the window
        frame_start = t - float(cfg["context_start_s"]) + self.win_s * np.arange(self.n_frames)[None, :]
        index = np.round(frame_start / hop).astype(np.int64)  # [T, J]
        valid = (index >= 0) & (index < n)
        idx = torch.as_tensor(np.clip(index, 0, n - 1).ravel(), device=x.device)
        picked = z.index_select(-1, idx).view(*z.shape[:-1], T, self.n_frames)  # [B, C, F, T, J]
        picked = picked * torch.as_tensor(valid, dtype=z.dtype, device=x.device)
        B, C = x.shape[:2]
        return picked.permute(0, 3, 1, 4, 2).reshape(B, T, C, self.n_frames * self.n_freq)

    # ---- model ------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latent ``[B, T, Z]``, style mean and log-variance ``[B, T, S]``."""
        e = self.electrode_encoder(self.drop(self.spectrogram_context(x, T)))  # [B, T, C, d]
        e = e + self.electrode_embedding
        d = e.shape[-1]
        scores = torch.softmax(self.query(e) @ self.key(e).transpose(-1, -2) / math.sqrt(d), dim=-1)
        self.last_attention = scores.detach().mean(dim=(0, 1))
        attended = scores @ self.value(e)  # [B, T, C, d]
        h = self.norm(attended.flatten(2))
        rff = math.sqrt(2.0 / self.rff_weight.shape[1]) * torch.cos(h @ self.rff_weight + self.rff_phase)
        z = self.to_latent(self.drop(rff))
        received = scores.mean(dim=-2)  # [B, T, C]: attention each electrode receives
        mu, logvar = self.style_posterior(received).chunk(2, dim=-1)
        logvar = logvar.clamp(-8.0, 8.0)
        style = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        z = z * (1.0 + torch.tanh(self.style_scale(style))) + self.style_shift(style)
        return z, mu, logvar

    def _steps(self, batch: Batch) -> int:
        if batch.target is not None:
            return int(batch.target.shape[-1])
        return max(1, int(round(batch.source.shape[-1] / self.sfreq * float(self.dims.target_sfreq))))

    def forward(self, batch: Batch) -> torch.Tensor:
        x = batch.source
        if x.dim() != 3 or x.shape[1] != self.n_electrodes:
            raise ValueError(f"source must be [B, {self.n_electrodes}, L], got {list(x.shape)}")
        z, mu, logvar = self.encode(x, self._steps(batch))
        self._aux = {"z": z, "mu": mu, "logvar": logvar}
        return self.decoder(z).transpose(1, 2)

    def latent(self, batch: Batch) -> torch.Tensor:
        """The shared latent space, ``[B, T, latent_dim]``."""
        return self.encode(batch.source, self._steps(batch))[0]

    def loss(self, prediction: torch.Tensor, batch: Batch) -> torch.Tensor:
        target = torch.nan_to_num(batch.target)
        mask = (torch.ones(target.shape[1], dtype=torch.bool, device=target.device)
                if batch.target_mask is None else batch.target_mask)
        m = mask.to(prediction.dtype)[None, :, None]

        def mae(pred):
            count = m.sum() * target.shape[0] * target.shape[-1]
            return ((pred - target).abs() * m).sum() / count.clamp_min(1)

        total = mae(prediction)
        aux = self._aux
        if aux and aux["z"].shape[:2] == (target.shape[0], target.shape[-1]):
            z_f = self.fmri_encoder((target * m).transpose(1, 2))  # [B, T, Z]
            total = total + float(self.config["cosine_weight"]) * (
                1.0 - F.cosine_similarity(aux["z"], z_f, dim=-1)).mean()
            if self.config["fmri_reconstruction"]:
                total = total + mae(self.decoder(z_f).transpose(1, 2))
            mu, logvar = aux["mu"], aux["logvar"]
            kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(-1).mean()
            total = total + float(self.config["kl_weight"]) * kl
        return total

    def interpretation(self) -> dict[str, Any]:
        """``topographical_attention``: electrode x electrode attention of the last pass
        (mean over batch and fMRI samples); ``electrode_importance``: attention each receives."""
        names = list(self.dims.source_names)
        if len(names) != self.n_electrodes:
            names = [f"ch{i}" for i in range(self.n_electrodes)]
        if self.last_attention is None:
            return {}
        att = self.last_attention.cpu().numpy()
        return {
            "topographical_attention": pd.DataFrame(att, index=pd.Index(names, name="electrode"),
                                                    columns=names),
            "electrode_importance": pd.DataFrame({"electrode": names, "attention": att.mean(axis=0)}),
        }
