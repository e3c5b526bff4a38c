"""Baseline plugins (mlp, cnn, lstm, transformer, ridge): shapes in both directions, gradients,
the band-power features and the ridge closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samba_pipeline.models.base import Batch, DataDims
from samba_pipeline.models.baselines import RidgeBaseline, band_power, canonical_hrf
from samba_pipeline.models.registry import get_model_class
from samba_pipeline.training import make_datasets, make_dims, split_by_time

from test_training import synthetic_runs  # noqa: E402  (tests/ is on sys.path)

DEEP = ("mlp", "cnn", "lstm", "transformer")


def _dims(direction):
    if direction == "ephys2fmri":
        return DataDims(direction, n_source=4, n_target=5, source_sfreq=64.0, target_sfreq=0.5, window_s=40.0)
    return DataDims(direction, n_source=5, n_target=4, source_sfreq=0.5, target_sfreq=64.0, window_s=40.0)


@pytest.mark.parametrize("direction", ["ephys2fmri", "fmri2ephys"])
@pytest.mark.parametrize("name", DEEP + ("ridge",))
def test_baselines_shapes_and_gradients(name, direction):
    dims = _dims(direction)
    torch.manual_seed(0)
    net = get_model_class(name).build({"hidden_size": 8} if name == "transformer" else {}, dims)
    x = torch.randn(3, dims.n_source, dims.source_len)
    y = torch.randn(3, dims.n_target, dims.target_len)
    batch = Batch(source=x, target=y, target_mask=torch.ones(dims.n_target, dtype=torch.bool))
    pred = net(batch)
    assert pred.shape == y.shape
    assert net(Batch(source=x)).shape == y.shape  # without target (inference)
    z = net.latent(Batch(source=x))
    assert z.shape[:2] == (3, 20)  # one latent row per fMRI time step
    if name == "ridge":
        assert not any(p.requires_grad for p in net.parameters())
        return
    loss = net.loss(pred, batch)
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_band_power_matches_numpy_periodogram():
    rng = np.random.default_rng(0)
    sfreq, spf, T = 64.0, 128, 3
    x = rng.standard_normal((1, 2, spf * T))
    out = band_power(torch.tensor(x), sfreq, T, [[8.0, 13.0]]).numpy()
    frame = x[0, 1, spf: 2 * spf] * np.hanning(spf)
    power = np.abs(np.fft.rfft(frame)) ** 2
    freqs = np.fft.rfftfreq(spf, 1 / sfreq)
    expected = np.log(power[(freqs >= 8) & (freqs < 13)].mean() + 1e-8)
    assert out.shape == (1, 2, 1, T)
    assert np.isclose(out[0, 1, 0, 1], expected, rtol=1e-6)


def test_baseline_heads_are_causal_in_their_time_order():
    """EEG -> fMRI: features late in the window never change earlier outputs; fMRI -> EEG/MEG:
    early fMRI never changes later outputs (their context lies in the future)."""
    for direction in ("ephys2fmri", "fmri2ephys"):
        dims = _dims(direction)
        for name in ("mlp", "cnn", "lstm"):
            torch.manual_seed(0)
            net = get_model_class(name).build({"dropout": 0.0}, dims).eval()
            x = torch.randn(1, dims.n_source, dims.source_len)
            f = net.features(Batch(source=x))
            f2 = f.clone()
            if direction == "ephys2fmri":
                f2[..., -5:] += 1.0
            else:
                f2[..., :5] += 1.0
            with torch.no_grad():
                a, b = (net._time_order(net.head(net._time_order(v))[1]) for v in (f, f2))
            same = (a - b).abs().amax(dim=1)[0] < 1e-6
            if direction == "ephys2fmri":
                assert same[:-5].all() and not same[-5:].all(), name
            else:
                assert same[5:].all() and not same[:5].all(), name


def test_ridge_closed_form_matches_sklearn_and_lstsq():
    from sklearn.linear_model import Ridge

    runs = synthetic_runs(1, minutes=6.0, tr=1.0, sfreq=16.0, n_source=3, n_target=2, seed=3)
    split = split_by_time(runs, window_s=20.0, gap_s=10.0)
    ds = make_datasets(runs, split, window_s=20.0)
    dims = make_dims(runs, window_s=20.0)
    net = RidgeBaseline.build({"alpha": 10.0, "bands": [[1.0, 4.0], [4.0, 8.0]]}, dims)
    info = net.fit_closed_form(ds["train"], ds["val"])
    assert info["alpha"] == 10.0
    X, Y, _ = net._rows(ds["train"])
    ref = Ridge(alpha=10.0).fit(X, Y)
    assert np.allclose(net.weight.numpy(), ref.coef_.T, atol=1e-4)
    assert np.allclose(net.bias.numpy(), ref.intercept_ + X.mean(0) @ ref.coef_.T, atol=1e-4)
    # alpha -> 0: ordinary least squares
    net0 = RidgeBaseline.build({"alpha": 1e-10, "bands": [[1.0, 4.0], [4.0, 8.0]]}, dims)
    net0.fit_closed_form(ds["train"])
    Xc = np.c_[X - X.mean(0), np.ones(len(X))]
    sol = np.linalg.lstsq(Xc, Y, rcond=None)[0]
    assert np.allclose(net0.weight.numpy(), sol[:-1], atol=1e-3)
    # the prediction is the ridge prediction
    batch_pred = net(Batch(source=ds["train"][0]["source"][None])).detach().numpy()[0]
    T = batch_pred.shape[-1]
    assert np.allclose(batch_pred.T, ref.predict(X[:T]), atol=1e-3)
    # penalty chosen on validation data from the grid
    net2 = RidgeBaseline.build({"bands": [[1.0, 4.0], [4.0, 8.0]]}, dims)
    info2 = net2.fit_closed_form(ds["train"], ds["val"])
    assert info2["alpha"] == min(info2["val_mse"], key=info2["val_mse"].get)


def test_canonical_hrf_peaks_near_five_seconds():
    h = canonical_hrf(0.5)
    assert np.isclose(h.sum(), 1.0) and 4.0 <= np.argmax(h) * 0.5 <= 6.0


def test_fitted_ridge_roundtrips_through_model_files_and_the_pipeline_fitter(tmp_path):
    """``fit_model`` (what the group level and the benchmark call) fits ridge in closed form; the
    fitted buffers survive save_model / load_model."""
    from samba_pipeline.training import TrainSettings, load_model, save_model
    from samba_pipeline.training.benchmark import fit_model

    runs = synthetic_runs(1, minutes=6.0, tr=1.0, sfreq=16.0, n_source=3, n_target=2, seed=4)
    ds = make_datasets(runs, split_by_time(runs, window_s=20.0, gap_s=10.0), window_s=20.0)
    dims = make_dims(runs, window_s=20.0)
    net = RidgeBaseline.build({"bands": [[1.0, 4.0], [4.0, 8.0]]}, dims)
    result = fit_model(net, ds["train"], ds["val"], TrainSettings(epochs=1, progress=False))
    assert result.epochs_run == 0 and np.isfinite(float(net.fitted_alpha))
    save_model(tmp_path / "m", net, plugin="ridge")
    back = load_model(tmp_path / "m")
    x = ds["val"][0]["source"][None]
    assert torch.allclose(back(Batch(source=x)), net(Batch(source=x)))
