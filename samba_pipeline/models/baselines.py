"""Baseline translation models (both directions): the seed paper's Table I baselines and the
classic band-power x HRF ridge regression.

Registered plugins (``samba_bids.models`` entry points):

``mlp``, ``cnn``, ``lstm``, ``transformer``
    the deep baselines of the SAMBA paper's Table I. They share SAMBA's input and output
    geometry but none of its hemodynamic or graph structure.
``ridge``
    what practitioners do: EEG/MEG band power convolved with a canonical (SPM double-gamma) HRF,
    then ridge regression to every fMRI parcel; fMRI -> EEG/MEG: the fMRI series at the HRF lags
    (a finite-impulse-response "deconvolution" design), ridge to the EEG/MEG series averaged
    within each TR. Fitted in closed form by :meth:`RidgeBaseline.fit_closed_form` (called by
    :func:`samba_pipeline.training.benchmark.fit_model` instead of the gradient trainer).

Features (vectorised over batch, nodes and time):

* EEG/MEG -> fMRI: the EEG/MEG samples of each fMRI time step are Hann-tapered and Fourier
  transformed; the log mean power in each of ``bands`` gives ``[B, n_source * n_bands, T]``,
  z-scored over the window (the same neurovascular representation as SAMBA's default front end).
* fMRI -> EEG/MEG: the fMRI parcel series ``[B, n_source, T]`` itself; the outputs are per TR
  and are linearly interpolated to the EEG/MEG samples.

The deep models look at a limited temporal context: past steps for EEG/MEG -> fMRI (BOLD follows
neural activity), future steps for fMRI -> EEG/MEG, ``context_s`` seconds (the HRF's length).
Each model exposes :meth:`latent` (``[B, T, D]`` per fMRI time step), which the stimulus
classification of the benchmark reads.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from samba_pipeline.models.base import Batch, DataDims, TranslationModel, cosine_loss

#: Default EEG/MEG bands (Hz): delta, theta, alpha, beta, gamma (clipped to the Nyquist rate).
DEFAULT_BANDS = [[1.0, 4.0], [4.0, 8.0], [8.0, 13.0], [13.0, 30.0], [30.0, 45.0]]


def canonical_hrf(tr: float, length_s: float = 30.0) -> np.ndarray:
    """SPM's canonical double-gamma HRF sampled every ``tr`` seconds (peak 6 s, undershoot 16 s,
    ratio 1/6), normalised to unit sum."""
    t = np.arange(max(2, int(math.ceil(length_s / tr)))) * float(tr)
    h = stats.gamma.pdf(t, 6.0) - stats.gamma.pdf(t, 16.0) / 6.0
    return h / h.sum()


def _standardize(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    std = x.std(-1, keepdim=True, unbiased=False) if x.shape[-1] > 1 else torch.ones_like(mean)
    return (x - mean) / (std + eps)


def band_power(x: torch.Tensor, sfreq: float, n_steps: int, bands) -> torch.Tensor:
    """Log band power of ``x [B, C, L]`` in ``n_steps`` consecutive frames: ``[B, C, n_bands, T]``.

    Each frame holds ``L // n_steps`` samples (the last ``L % n_steps`` are dropped), Hann
    tapered; the power is the mean squared magnitude of the FFT bins in ``[lo, hi)`` (at least
    the nearest bin), log-transformed.
    """
    B, C, L = x.shape
    spf = max(2, L // n_steps)
    frames = x[..., : spf * n_steps].reshape(B, C, n_steps, spf)
    frames = frames * torch.hann_window(spf, periodic=False, dtype=x.dtype, device=x.device)
    spec = torch.fft.rfft(frames)
    power = spec.real.square() + spec.imag.square()  # [B, C, T, n_freq]
    freqs = np.fft.rfftfreq(spf, 1.0 / sfreq)
    weights = np.zeros((len(bands), freqs.size), dtype=np.float32)
    for i, (lo, hi) in enumerate(bands):
        sel = (freqs >= lo) & (freqs < hi)
        if not sel.any():
            sel = np.abs(freqs - 0.5 * (lo + hi)) == np.abs(freqs - 0.5 * (lo + hi)).min()
        weights[i, sel] = 1.0 / sel.sum()
    w = torch.as_tensor(weights, dtype=power.dtype, device=x.device)
    return torch.log(torch.einsum("bctf,kf->bckt", power, w) + 1e-8)


def usable_bands(bands, sfreq: float) -> list[list[float]]:
    """The bands below the Nyquist frequency (upper edges clipped to it)."""
    nyq = 0.5 * float(sfreq)
    out = [[float(lo), min(float(hi), nyq)] for lo, hi in bands if float(lo) < nyq]
    if not out:
        raise ValueError(f"no band below the Nyquist frequency {nyq:g} Hz")
    return out


class _SequenceBaseline(TranslationModel):
    """Shared input features, output mapping and loss of the baselines (see the module doc)."""

    plugin_version = "1"

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        return {"bands": [list(b) for b in DEFAULT_BANDS], "hidden_size": 64, "context_s": 20.0,
                "dropout": 0.1, "loss": "cosine"}

    def __init__(self, config: dict[str, Any], dims: DataDims):
        super().__init__(config, dims)
        if self.config["loss"] not in ("cosine", "mse", "mae"):
            raise ValueError("loss must be 'cosine', 'mse' or 'mae'")
        self.ephys_source = dims.direction == "ephys2fmri"
        if self.ephys_source:
            self.bands = usable_bands(self.config["bands"], dims.source_sfreq)
            self.n_in = dims.n_source * len(self.bands)
        else:
            self.bands = []
            self.n_in = dims.n_source
        self.n_out = dims.n_target
        self.context = max(1, int(math.ceil(float(self.config["context_s"]) / dims.tr)))
        if not 0 <= float(self.config["dropout"]) < 1:
            raise ValueError("dropout must be in [0, 1)")

    # ---- geometry --------------------------------------------------------------------------
    def _steps(self, batch: Batch) -> int:
        """fMRI time steps of the batch's window."""
        if self.ephys_source:
            if batch.target is not None:
                return int(batch.target.shape[-1])
            seconds = batch.source.shape[-1] / self.dims.source_sfreq
            return max(1, int(round(seconds * self.dims.target_sfreq)))
        return int(batch.source.shape[-1])

    def features(self, batch: Batch) -> torch.Tensor:
        """Input features per fMRI time step, ``[B, n_in, T]``."""
        x = batch.source
        if x.dim() != 3 or x.shape[1] != self.dims.n_source:
            raise ValueError(f"source must be [B, {self.dims.n_source}, L], got {list(x.shape)}")
        if not self.ephys_source:
            return x
        T = self._steps(batch)
        feats = band_power(x, self.dims.source_sfreq, T, self.bands)  # [B, C, K, T]
        return _standardize(feats).reshape(x.shape[0], -1, T)

    def _time_order(self, x: torch.Tensor) -> torch.Tensor:
        """Flip time for fMRI -> EEG/MEG (the context then lies in the future)."""
        return x if self.ephys_source else x.flip(-1)

    def _lagged(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, D, T] -> [B, T, D * context]``: the current and ``context - 1`` earlier steps (in
        the model's time order), zero (the window mean) before the window."""
        B, D, T = x.shape
        padded = F.pad(x, (self.context - 1, 0))
        return padded.unfold(-1, self.context, 1).permute(0, 2, 1, 3).reshape(B, T, D * self.context)

    def output(self, y: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Per-step outputs ``[B, n_out, T]`` (model time order) -> predictions ``[B, n_target, *]``."""
        y = self._time_order(y)
        if self.ephys_source:
            return y
        if batch.target is not None:
            n = int(batch.target.shape[-1])
        else:
            n = int(round(y.shape[-1] / self.dims.source_sfreq * self.dims.target_sfreq))
        return F.interpolate(y, size=max(1, n), mode="linear", align_corners=False)

    # ---- protocol --------------------------------------------------------------------------
    def head(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        """``x [B, n_in, T]`` (model time order) -> (latent ``[B, T, H]``, output ``[B, n_out, T]``)."""
        raise NotImplementedError

    def forward(self, batch: Batch) -> torch.Tensor:
        _, y = self.head(self._time_order(self.features(batch)))
        return self.output(y, batch)

    def latent(self, batch: Batch) -> torch.Tensor:
        """The hidden representation per fMRI time step (real time order), ``[B, T, H]``."""
        z, _ = self.head(self._time_order(self.features(batch)))
        return z if self.ephys_source else z.flip(1)

    def loss(self, prediction: torch.Tensor, batch: Batch) -> torch.Tensor:
        target = torch.nan_to_num(batch.target)
        kind = self.config["loss"]
        if kind == "cosine":
            return cosine_loss(prediction, target, batch.target_mask)
        err = (prediction - target).abs() if kind == "mae" else (prediction - target).square()
        if batch.target_mask is not None:
            m = batch.target_mask.to(err.dtype)[..., None].expand_as(err)
            return (err * m).sum() / m.sum().clamp_min(1.0)
        return err.mean()


class MLPBaseline(_SequenceBaseline):
    """A two-layer perceptron on the lagged features of each time step."""

    plugin_name = "mlp"

    def __init__(self, config: dict[str, Any], dims: DataDims):
        super().__init__(config, dims)
        H = int(self.config["hidden_size"])
        self.hidden = nn.Sequential(nn.Linear(self.n_in * self.context, H), nn.GELU(),
                                    nn.Dropout(float(self.config["dropout"])))
        self.readout = nn.Linear(H, self.n_out)

    def head(self, x):
        z = self.hidden(self._lagged(x))  # [B, T, H]
        return z, self.readout(z).transpose(1, 2)


class CNNBaseline(_SequenceBaseline):
    """A 1-D CNN over time: two causal (in the model's time order) dilated convolutions covering
    ``context_s``."""

    plugin_name = "cnn"

    def __init__(self, config: dict[str, Any], dims: DataDims):
        super().__init__(config, dims)
        H = int(self.config["hidden_size"])
        k = max(2, int(math.ceil((self.context + 1) / 3)))  # receptive field k + 2(k-1) >= context
        self.kernel = k
        self.conv1 = nn.Conv1d(self.n_in, H, k)
        self.conv2 = nn.Conv1d(H, H, k, dilation=2)
        self.drop = nn.Dropout(float(self.config["dropout"]))
        self.readout = nn.Conv1d(H, self.n_out, 1)

    def head(self, x):
        k = self.kernel
        h = self.drop(F.gelu(self.conv1(F.pad(x, (k - 1, 0)))))
        h = self.drop(F.gelu(self.conv2(F.pad(h, (2 * (k - 1), 0)))))
        return h.transpose(1, 2), self.readout(h)


class LSTMBaseline(_SequenceBaseline):
    """An LSTM over time steps (forward in the model's time order) with a linear readout."""

    plugin_name = "lstm"

    def __init__(self, config: dict[str, Any], dims: DataDims):
        super().__init__(config, dims)
        H = int(self.config["hidden_size"])
        self.inp = nn.Linear(self.n_in, H)
        self.lstm = nn.LSTM(H, H, batch_first=True)
        self.drop = nn.Dropout(float(self.config["dropout"]))
        self.readout = nn.Linear(H, self.n_out)

    def head(self, x):
        z, _ = self.lstm(self.drop(self.inp(x.transpose(1, 2))))
        return z, self.readout(self.drop(z)).transpose(1, 2)


def sinusoidal_positions(n: int, dim: int, device=None) -> torch.Tensor:
    """``[n, dim]`` sinusoidal position codes (Vaswani et al. 2017)."""
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(1e4) / dim))
    out = torch.zeros(n, dim, device=device)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return out


class TransformerBaseline(_SequenceBaseline):
    """A Transformer encoder over time steps (lagged features as tokens, sinusoidal positions)."""

    plugin_name = "transformer"

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        return {**super().default_config(), "heads": 4, "layers": 2}

    def __init__(self, config: dict[str, Any], dims: DataDims):
        super().__init__(config, dims)
        H = int(self.config["hidden_size"])
        if H % int(self.config["heads"]):
            raise ValueError("hidden_size must be a multiple of heads")
        self.inp = nn.Linear(self.n_in, H)
        layer = nn.TransformerEncoderLayer(H, int(self.config["heads"]), dim_feedforward=2 * H,
                                           dropout=float(self.config["dropout"]), batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, int(self.config["layers"]), enable_nested_tensor=False)
        self.readout = nn.Linear(H, self.n_out)

    def head(self, x):
        h = self.inp(x.transpose(1, 2))
        h = h + sinusoidal_positions(h.shape[1], h.shape[2], h.device).to(h.dtype)
        z = self.encoder(h)
        return z, self.readout(z).transpose(1, 2)


class RidgeBaseline(_SequenceBaseline):
    """Band power x canonical HRF + ridge (EEG/MEG -> fMRI); lagged fMRI + ridge (fMRI -> EEG/MEG).

    The weights are fitted by :meth:`fit_closed_form` (ridge on centred features, the penalty
    chosen on the validation windows from ``alphas`` by one SVD); the model has no trainable
    parameters, only buffers, so the gradient trainer is never used for it.
    """

    plugin_name = "ridge"
    closed_form = True

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        return {"bands": [list(b) for b in DEFAULT_BANDS], "context_s": 20.0, "hrf_length_s": 30.0,
                "alphas": [1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5], "alpha": None,
                "hidden_size": 1, "dropout": 0.0, "loss": "mse"}

    def __init__(self, config: dict[str, Any], dims: DataDims):
        super().__init__(config, dims)
        n_feat = self.n_in if self.ephys_source else self.n_in * self.context
        self.register_buffer("weight", torch.zeros(n_feat, self.n_out))
        self.register_buffer("bias", torch.zeros(self.n_out))
        self.register_buffer("feature_mean", torch.zeros(n_feat))
        hrf = canonical_hrf(dims.tr, float(self.config["hrf_length_s"]))
        self.register_buffer("hrf", torch.as_tensor(hrf, dtype=torch.float32))
        self.register_buffer("fitted_alpha", torch.tensor(float("nan")))

    def design(self, batch: Batch) -> torch.Tensor:
        """Design matrix rows per time step, ``[B, T, n_feat]`` (model time order)."""
        x = self._time_order(self.features(batch))  # [B, D, T]
        if not self.ephys_source:
            return self._lagged(x)
        k = self.hrf.numel()
        lagged = F.pad(x, (k - 1, 0)).unfold(-1, k, 1)  # [B, D, T, K]: x[t-K+1 .. t]
        conv = torch.einsum("bdtk,k->bdt", lagged, self.hrf.flip(0).to(x.dtype))
        return conv.transpose(1, 2)

    def head(self, x):  # not used: forward goes through design()
        raise NotImplementedError

    def forward(self, batch: Batch) -> torch.Tensor:
        X = self.design(batch)
        y = (X - self.feature_mean) @ self.weight + self.bias  # [B, T, n_out]
        return self.output(y.transpose(1, 2), batch)

    def latent(self, batch: Batch) -> torch.Tensor:
        X = self.design(batch)
        return X if self.ephys_source else X.flip(1)

    def _rows(self, dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Design rows, targets per time step and validity of every window of ``dataset``."""
        from samba_pipeline.training.data import collate_windows

        Xs, Ys, Ms = [], [], []
        with torch.no_grad():
            for start in range(0, len(dataset), 32):
                batch = collate_windows([dataset[i] for i in range(start, min(start + 32, len(dataset)))])
                X = self.design(batch)  # [B, T, F]
                tgt = torch.nan_to_num(batch.target)
                if not self.ephys_source:  # the EEG/MEG target averaged within each TR
                    tgt = F.adaptive_avg_pool1d(tgt, X.shape[1]).flip(-1)
                Xs.append(X.reshape(-1, X.shape[-1]).double().numpy())
                Ys.append(tgt.transpose(1, 2).reshape(-1, tgt.shape[1]).double().numpy())
                Ms.append(batch.target_mask.numpy())
        return np.concatenate(Xs), np.concatenate(Ys), np.all(np.stack(Ms), axis=0)

    def fit_closed_form(self, train_ds, val_ds=None) -> dict[str, Any]:
        """Fit the ridge weights on ``train_ds``; choose the penalty on ``val_ds`` (lowest MSE) or
        use ``alpha`` when set. Returns the penalty and the validation MSE per penalty."""
        X, Y, mask = self._rows(train_ds)
        mu_x, mu_y = X.mean(0), Y.mean(0)
        U, s, Vt = np.linalg.svd(X - mu_x, full_matrices=False)
        UtY = U.T @ (Y - mu_y)
        alphas = [float(self.config["alpha"])] if self.config["alpha"] is not None else \
            [float(a) for a in self.config["alphas"]]

        def weights(alpha):
            return Vt.T @ ((s / (s**2 + alpha))[:, None] * UtY)

        scores = {}
        if val_ds is not None and len(alphas) > 1:
            Xv, Yv, mv = self._rows(val_ds)
            for a in alphas:
                err = ((Xv - mu_x) @ weights(a) + mu_y - Yv) ** 2
                scores[a] = float(err[:, mv].mean())
            alpha = min(scores, key=scores.get)
        else:
            alpha = alphas[len(alphas) // 2] if len(alphas) > 1 else alphas[0]
        W = weights(alpha)
        W[:, ~mask] = 0.0
        self.weight.copy_(torch.as_tensor(W, dtype=torch.float32))
        self.bias.copy_(torch.as_tensor(np.where(mask, mu_y, 0.0), dtype=torch.float32))
        self.feature_mean.copy_(torch.as_tensor(mu_x, dtype=torch.float32))
        self.fitted_alpha.fill_(alpha)
        return {"alpha": alpha, "val_mse": scores}

    def interpretation(self) -> dict[str, Any]:
        return {"ridge_alpha": float(self.fitted_alpha), "ridge_weights": self.weight.cpu().numpy()}
