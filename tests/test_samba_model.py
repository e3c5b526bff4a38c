"""SAMBA ephys -> fMRI model: HRF, FFT convolution, wavelets, graphs, model API (fast)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import pywt
import torch
from scipy import stats

from samba_pipeline.models.base import Batch, DataDims
from samba_pipeline.models.registry import get_model_class
from samba_pipeline.models.samba import ele2hemo
from samba_pipeline.models.samba.ele2hemo import SambaEphys2Fmri
from samba_pipeline.models.samba.graph import BatchedGATv2, RegionMaskedLinear, topk_edges
from samba_pipeline.models.samba.hrf import (
    DEFAULTS,
    HALF_RANGES,
    ParcelHRF,
    double_gamma,
    fft_convolve,
    kernel_rfft,
)
from samba_pipeline.models.samba.wavelet import DWT, default_level, dwt, idwt, scale_bands

# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster, and immune to a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cosine_graph(n, rng, length=50):
    z = rng.standard_normal((n, length))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    return z @ z.T


def make_dims(ns=12, nt=20, sfreq=100.0, tr=2.0, window=20.0, region=True, graphs=True, seed=0,
              n_regions=3):
    rng = np.random.default_rng(seed)
    region_map = None
    if region:
        reg_s = np.arange(ns) % n_regions
        reg_t = rng.integers(0, n_regions, nt)
        region_map = (reg_t[:, None] == reg_s[None, :]).astype(float)
    return DataDims(
        "ephys2fmri", ns, nt, sfreq, 1.0 / tr, window,
        source_names=[f"s{i}" for i in range(ns)], target_names=[f"t{i}" for i in range(nt)],
        source_graph=cosine_graph(ns, rng) if graphs else None,
        target_graph=cosine_graph(nt, rng) if graphs else None,
        region_map=region_map,
    )


def make_batch(dims, B=2, seed=0, with_target=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, dims.n_source, dims.source_len, generator=g)
    y = torch.randn(B, dims.n_target, dims.target_len, generator=g) if with_target else None
    mask = torch.ones(dims.n_target, dtype=torch.bool)
    mask[0] = False
    return Batch(x, y, mask)


SMALL = {"hidden_size": 8, "lstm_hidden": 8, "top_k": 4, "hrf_kernel_s": 20.0}

# ---------------------------------------------------------------------------------------------
# HRF and FFT convolution


def scipy_double_gamma(t, p):
    d1, d2, s1, s2, ratio, onset = p
    x = t - onset
    return stats.gamma.pdf(x, d1 / s1, scale=s1) - ratio * stats.gamma.pdf(x, d2 / s2, scale=s2)


def test_hrf_matches_scipy_double_gamma():
    rng = np.random.default_rng(1)
    t = np.arange(0, 32, 0.05)
    params = np.asarray(DEFAULTS) + np.asarray(HALF_RANGES) * rng.uniform(-1, 1, (6, 6))
    params = np.vstack([DEFAULTS, params])
    ours = double_gamma(torch.tensor(t), torch.tensor(params)).numpy()
    for i, p in enumerate(params):
        np.testing.assert_allclose(ours[i], scipy_double_gamma(t, p), rtol=1e-6, atol=1e-9)
    # Canonical shape: positive peak near 5 s, undershoot near 15 s.
    h = ours[0]
    assert 4.5 < t[np.argmax(h)] < 5.5 and 14 < t[np.argmin(h)] < 16.5


@pytest.mark.parametrize("T,K", [(200, 61), (40, 120), (1, 5), (64, 1)])
def test_fft_convolution_equals_np_convolve(T, K):
    rng = np.random.default_rng(T + K)
    x = rng.standard_normal((3, 4, T))
    h = rng.standard_normal((4, K))
    out = fft_convolve(torch.tensor(x), torch.tensor(h)[None]).numpy()
    for b in range(3):
        for n in range(4):
            np.testing.assert_allclose(out[b, n], np.convolve(x[b, n], h[n])[:T], atol=1e-9)


def test_fft_convolution_is_causal():
    x = torch.zeros(1, 100, dtype=torch.float64)
    x[0, 60] = 1.0
    out = fft_convolve(x, torch.rand(1, 30, dtype=torch.float64) + 0.1)
    assert torch.all(out[0, :60].abs() < 1e-12) and torch.all(out[0, 60:90] > 0)


@pytest.mark.parametrize("rows", [1, 3])  # one row: a single-parcel HRF
@pytest.mark.parametrize("K,n", [(5, 12), (5, 13), (7, 7), (1, 4)])
def test_kernel_rfft_gradient(K, n, rows):
    k = torch.randn(rows, K, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: torch.view_as_real(kernel_rfft(v, n)), (k,))
    torch.testing.assert_close(kernel_rfft(k, n), torch.fft.rfft(k, n=n))


def test_gradients_reach_every_hrf_parameter():
    hrf = ParcelHRF(5)
    table = hrf.parameters_table()
    table.retain_grad()
    kern = double_gamma(torch.arange(0, 30, 0.25), table)
    x = torch.randn(2, 5, 80)
    y = fft_convolve(x, kern[None])
    (y * torch.randn_like(y)).sum().backward()
    assert table.grad is not None and torch.all(table.grad.abs() > 0), table.grad
    for p in hrf.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    # Parameters stay within their physiological bounds.
    lo = torch.tensor(DEFAULTS) - torch.tensor(HALF_RANGES)
    hi = torch.tensor(DEFAULTS) + torch.tensor(HALF_RANGES)
    assert torch.all(table >= lo) and torch.all(table <= hi)


def test_fixed_hrf_has_no_parameters():
    hrf = ParcelHRF(3, learn=False)
    assert len(list(hrf.parameters())) == 0
    np.testing.assert_allclose(hrf.parameters_table().numpy(), np.tile(DEFAULTS, (3, 1)), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# wavelets


@pytest.mark.parametrize("wavelet", ["db4", "haar", "sym5", "coif2", "bior2.2", "db20"])
@pytest.mark.parametrize("mode", ["zero", "symmetric"])
def test_dwt_and_idwt_match_pywavelets(wavelet, mode):
    rng = np.random.default_rng(0)
    for n in (1200, 257, 37, 6):
        x = rng.standard_normal((2, 3, n))
        max_level = max(1, pywt.dwt_max_level(n, pywt.Wavelet(wavelet).dec_len))
        for level in sorted({1, max_level}):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # pywt: level too high for n
                ref = pywt.wavedec(x, wavelet, mode=mode, level=level)
            ours = dwt(torch.tensor(x), wavelet, level, mode)
            assert len(ours) == len(ref)
            for a, b in zip(ref, ours):
                np.testing.assert_allclose(b.numpy(), a, atol=1e-10)
            rec = idwt([torch.tensor(c) for c in ref], wavelet, mode).numpy()
            np.testing.assert_allclose(rec, pywt.waverec(ref, wavelet, mode=mode), atol=1e-10)
            np.testing.assert_allclose(rec[..., :n], x, atol=1e-8)  # perfect reconstruction


def test_dwt_beyond_max_level_matches_pywavelets():
    x = np.random.default_rng(2).standard_normal((2, 50))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = pywt.wavedec(x, "db4", mode="symmetric", level=5)
    for a, b in zip(ref, dwt(torch.tensor(x), "db4", 5, "symmetric")):
        np.testing.assert_allclose(b.numpy(), a, atol=1e-10)


def test_dwt_is_differentiable():
    x = torch.randn(2, 40, dtype=torch.float64, requires_grad=True)
    m = DWT("db2", 2, "symmetric")
    assert torch.autograd.gradcheck(lambda v: torch.cat(m(v), -1), (x,))
    c = [torch.randn(2, n, dtype=torch.float64, requires_grad=True) for n in (12, 12, 21)]
    assert torch.autograd.gradcheck(lambda *cs: m.inverse(list(cs)), tuple(c))


def test_default_levels_and_bands():
    assert default_level(200.0, 12000) == 6  # coarsest detail 1.56-3.1 Hz
    assert default_level(1000.0, 60000) == 8
    assert default_level(100.0, 40) == pywt.dwt_max_level(40, 8)
    bands = scale_bands(200.0, 6)
    assert bands[0] == (0.0, 200 / 128) and bands[-1] == (50.0, 100.0)


# ---------------------------------------------------------------------------------------------
# graphs


def test_topk_edges():
    rng = np.random.default_rng(3)
    g = cosine_graph(10, rng)
    ei, w = topk_edges(g, 10, 3)
    assert ei.shape == (2, 10 * 4)
    for i in range(10):
        src = ei[0, ei[1] == i]
        assert i in src
        others = np.delete(np.abs(g[i]), i)
        assert set(src) - {i} == set(np.argsort(-np.abs(g[i]))[1:4]) or np.isclose(
            np.sort(np.abs(g[i, list(set(src) - {i})]))[0], np.sort(others)[-3])
    np.testing.assert_allclose(w[ei[0] != ei[1]], g[ei[1], ei[0]][ei[0] != ei[1]])
    full, _ = topk_edges(g, 10, 50)
    assert full.shape[1] == 100
    g2 = g.copy()
    g2[4, :] = g2[:, 4] = 0.0
    ei2, _ = topk_edges(g2, 10, 20)
    assert not np.any((ei2[0] == 4) & (ei2[1] != 4)) and not np.any((ei2[1] == 4) & (ei2[0] != 4))
    loops, _ = topk_edges(None, 5, 3)
    assert np.array_equal(loops, np.stack([np.arange(5)] * 2))


@pytest.mark.parametrize("n,k,heads", [(30, 4, 2), (12, 20, 3)])
def test_dense_gat_matches_pyg_gatv2conv(n, k, heads):
    rng = np.random.default_rng(4)
    g = cosine_graph(n, rng)
    g[0, 1:] = g[1:, 0] = 0.0  # irregular degrees: node 0 only has its self loop
    ei, w = topk_edges(g, n, k)
    layer = BatchedGATv2(ei, w, n, 6, 6, heads)
    layer.chunk_elements = 500  # several chunks
    x = torch.randn(5, n, 6, requires_grad=True)
    results = []
    for impl, ckpt_bytes in (("pyg", None), ("dense", 1 << 40), ("dense", 0)):
        layer.impl = impl
        if ckpt_bytes is not None:
            layer.checkpoint_bytes = ckpt_bytes
        out = layer(x)
        grads = torch.autograd.grad((out * out.detach().sin()).sum(), [x, *layer.parameters()])
        results.append((out.detach(), layer.last_attention.clone(), grads))
    ref = results[0]
    for out, att, grads in results[1:]:
        torch.testing.assert_close(out, ref[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(att, ref[1], atol=1e-6, rtol=1e-5)
        for a, b in zip(grads, ref[2]):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # Attention is a softmax over each target's incoming edges.
    sums = np.bincount(ei[1], weights=ref[1].numpy(), minlength=n)
    np.testing.assert_allclose(sums, 1.0, atol=1e-5)


@pytest.mark.parametrize("impl", ["dense", "pyg"])
def test_gat_respects_the_graph(impl):
    rng = np.random.default_rng(5)
    n = 15
    g = cosine_graph(n, rng)
    g[3, :] = g[:, 3] = 0.0  # node 3: no edge to any other node
    g[3, 3] = 1.0
    ei, w = topk_edges(g, n, 3)
    layer = BatchedGATv2(ei, w, n, 4, 4, 2, impl=impl).eval()
    x = torch.randn(2, n, 4)
    base = layer(x)
    for j in range(n):
        x2 = x.clone()
        x2[:, j] += 5.0
        changed = (layer(x2) - base).abs().amax(dim=(0, 2)) > 1e-6
        allowed = set(ei[1, ei[0] == j])  # one hop: targets of j's outgoing edges (incl. itself)
        assert set(np.nonzero(changed.numpy())[0]) <= allowed, (j, allowed)
        assert changed[j]
    x3 = x.clone()
    x3[:, 3] += 5.0
    changed = (layer(x3) - base).abs().amax(dim=(0, 2)) > 1e-6
    assert np.nonzero(changed.numpy())[0].tolist() == [3]
    # Perturbing the others leaves node 3 untouched; graphs of a batch stay separate.
    x4 = x.clone()
    x4[0, [i for i in range(n) if i != 3]] += 5.0
    diff = (layer(x4) - base).abs()
    assert diff[:, 3].max() < 1e-6 and diff[1].max() < 1e-6
    # Two stacked layers: influence reaches exactly the two-hop neighbourhood at most.
    second = BatchedGATv2(ei, w, n, 4, 4, 2, impl=impl).eval()
    base2 = second(layer(x))
    adj = np.zeros((n, n), dtype=bool)
    adj[ei[0], ei[1]] = True  # adj[j, i]: j -> i
    two_hop = (adj.astype(int) @ adj.astype(int)) > 0
    for j in range(n):
        x2 = x.clone()
        x2[:, j] += 5.0
        changed = (second(layer(x2)) - base2).abs().amax(dim=(0, 2)) > 1e-6
        assert set(np.nonzero(changed.numpy())[0]) <= set(np.nonzero(two_hop[j])[0])


def test_region_masked_linear():
    mask = np.array([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    lin = RegionMaskedLinear(mask, 3, 4, 2)
    assert lin.weight.numel() == 3 + 4  # the empty row falls back to all sources
    x = torch.randn(5, 4, 2)
    base = lin(x)
    x2 = x.clone()
    x2[:, 3] += 1.0  # source 3 feeds only target 2 (fallback row)
    d = (lin(x2) - base).abs().amax(dim=(0, 2))
    assert d[0] == 0 and d[1] == 0 and d[2] > 0
    dense = RegionMaskedLinear(None, 3, 4, 2)
    assert dense.weight.numel() == 12


# ---------------------------------------------------------------------------------------------
# model API


def test_registry_and_build():
    # The "samba" plugin serves both directions and builds SambaEphys2Fmri for ephys2fmri
    # (tests/test_samba_reverse.py covers the dispatch and the other direction).
    cls = get_model_class("samba")
    assert cls.plugin_name == "samba" and SambaEphys2Fmri.plugin_name == "samba"
    assert SambaEphys2Fmri.directions == ("ephys2fmri",)
    dims = make_dims()
    assert type(cls.build(SMALL, dims)) is SambaEphys2Fmri
    with pytest.raises(ValueError, match="unknown setting"):
        cls.build({"hiden_size": 3}, dims)
    with pytest.raises(ValueError, match="front_end"):
        cls.build({"front_end": "magic"}, dims)
    with pytest.raises(ValueError):
        cls.build({"wavelet_mode": "periodic"}, dims)
    reverse = DataDims("fmri2ephys", 20, 12, 0.5, 100.0, 20.0)
    with pytest.raises(ValueError, match="supports"):
        SambaEphys2Fmri.build(None, reverse)
    model = cls.build(None, dims)
    assert model.config == cls.default_config() == SambaEphys2Fmri.default_config()
    assert model.config["front_end"] == "neurovascular" and model.config["wavelet"] == "db4"


@pytest.mark.parametrize("front_end", ["neurovascular", "paper"])
@pytest.mark.parametrize("ns,nt,sfreq,tr,window,region,graphs", [
    (12, 20, 100.0, 2.0, 20.0, True, True),
    (7, 31, 250.0, 0.72, 15.0, False, True),  # sensor-space EEG: no region map
    (5, 9, 64.0, 1.5, 12.0, True, False),  # no graphs: self loops only
    (3, 4, 500.0, 3.0, 9.0, True, True),
])
def test_shapes(front_end, ns, nt, sfreq, tr, window, region, graphs):
    dims = make_dims(ns, nt, sfreq, tr, window, region, graphs)
    model = SambaEphys2Fmri.build({**SMALL, "front_end": front_end}, dims)
    batch = make_batch(dims, B=2)
    out = model(batch)
    assert out.shape == (2, nt, dims.target_len) and torch.isfinite(out).all()
    model.eval()
    with torch.no_grad():
        out = model(Batch(batch.source))
    assert out.shape == (2, nt, dims.target_len) and torch.isfinite(out).all()
    loss = model.loss(out, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)


ABLATIONS = [
    {},
    {"front_end": "paper"},
    {"use_wavelet_attention": False},
    {"use_lstm": False},
    {"learn_hrf": False},
    {"use_source_gat": False, "use_target_gat": False},
    {"teacher_forcing": False},
    {"gat_layers": 2, "gat_impl": "pyg", "wavelet_mode": "zero"},
]


def _ablation_id(cfg):
    return ",".join(f"{k}={v}" for k, v in cfg.items()) or "default"


@pytest.mark.parametrize("cfg", ABLATIONS, ids=_ablation_id)
def test_every_parameter_gets_a_gradient(cfg):
    dims = make_dims()
    torch.manual_seed(0)
    model = SambaEphys2Fmri.build({**SMALL, **cfg}, dims)
    batch = make_batch(dims)
    model.train()
    loss = model.loss(model(batch), batch)
    loss.backward()
    names = [n for n, _ in model.named_parameters()]
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
    if cfg.get("learn_hrf") is False:
        assert not any(n.startswith("hrf.") for n in names)
    if cfg.get("use_wavelet_attention") is False:
        assert not any(n.startswith("scale_attention.score") for n in names)


def test_masked_parcels_may_hold_nan():
    dims = make_dims()
    model = SambaEphys2Fmri.build(SMALL, dims)
    batch = make_batch(dims)
    batch.target[:, 0] = float("nan")  # parcel 0 is masked out by make_batch
    loss = model.loss(model(batch), batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_checkpointing_gives_same_gradients(monkeypatch):
    dims = make_dims()
    batch = make_batch(dims)
    grads = []
    for limit in (1e9, 0.0):
        monkeypatch.setattr(ele2hemo, "_ROW_CHUNK_ELEMENTS", 5000)
        torch.manual_seed(0)
        model = SambaEphys2Fmri.build({**SMALL, "front_end": "paper", "dropout": 0.0,
                                       "checkpoint_above_mb": limit}, dims)
        model.loss(model(batch), batch).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_teacher_forcing():
    dims = make_dims()
    torch.manual_seed(0)
    model = SambaEphys2Fmri.build({**SMALL, "dropout": 0.0, "teacher_forcing": True}, dims)
    batch = make_batch(dims)
    t = 4
    target2 = batch.target.clone()
    target2[:, :, t] += 3.0
    batch2 = Batch(batch.source, target2, batch.target_mask)
    model.train()
    a, b = model(batch), model(batch2)
    diff = (a - b).abs().amax(dim=(0, 1))
    assert torch.all(diff[: t + 1] == 0) and torch.all(diff[t + 1:] > 0)  # uses target[t-1] only
    # Free running (evaluation, or teacher_forcing off): the target is never looked at.
    model.eval()
    torch.testing.assert_close(model(batch), model(batch2))
    torch.testing.assert_close(model(batch), model(Batch(batch.source)))
    model.config["teacher_forcing"] = False
    model.train()
    torch.testing.assert_close(model(batch), model(batch2))
    # Teacher forcing with the model's own free-running predictions reproduces free running.
    model.eval()
    free = model(Batch(batch.source)).detach()
    h = model.encode(batch.source, dims.target_len, 40)
    torch.testing.assert_close(model.decode(h, free), free, atol=1e-5, rtol=1e-5)


def _adaptive_mean(v, n_out):
    n = v.shape[-1]
    return np.stack([v[..., (i * n) // n_out: -(-((i + 1) * n) // n_out)].mean(-1) for i in range(n_out)], -1)


def test_paper_front_end_matches_numpy_reference():
    dims = make_dims(ns=3, nt=4, sfreq=100.0, tr=2.0, window=20.0)
    model = SambaEphys2Fmri.build({**SMALL, "front_end": "paper", "normalize_features": False}, dims)
    x = torch.randn(2, 3, dims.source_len)
    with torch.no_grad():
        feats = model.front_end(x, dims.target_len, 40).numpy()  # [B, Ns, S, T]
        kernels = model.hrf.kernels(100.0, SMALL["hrf_kernel_s"]).numpy()
    L, T = dims.source_len, dims.target_len
    for b in range(2):
        for n in range(3):
            y = np.convolve(x[b, n].numpy().astype(float), kernels[n])[:L]
            coeffs = pywt.wavedec(y, "db4", mode="symmetric", level=model.level)
            for s, (c, off, step) in enumerate(zip(coeffs, model._offsets, model._spacing)):
                centres = off + step * np.arange(c.size)
                inside = c[(centres >= 0) & (centres < L)]
                np.testing.assert_allclose(feats[b, n, s], _adaptive_mean(inside, T), rtol=1e-3, atol=1e-5)


def test_neurovascular_envelope_is_time_aligned():
    dims = make_dims(ns=2, nt=3, sfreq=200.0, tr=2.0, window=60.0)
    model = SambaEphys2Fmri.build(SMALL, dims)
    t = np.arange(dims.source_len) / 200.0
    x = 0.01 * np.random.default_rng(0).standard_normal((2, t.size))
    burst = (t >= 20) & (t < 21)
    x[:, burst] += np.sin(2 * np.pi * 75 * t[burst])  # 75 Hz: the finest detail band (50-100 Hz)
    env = model._envelope_rows(torch.tensor(x, dtype=torch.float32), 120)  # 0.5 s bins
    finest = env[:, -1].numpy()
    assert model.scale_names[-1] == "cD1"
    for row in finest:
        top = np.sort(np.argsort(row)[-2:])
        assert top.tolist() == [40, 41]


def test_interpretation_and_state_dict_round_trip():
    dims = make_dims()
    torch.manual_seed(0)
    model = SambaEphys2Fmri.build(SMALL, dims)
    before = model.interpretation()
    assert before["graph_attention"].empty
    assert np.isnan(before["wavelet_attention"]["weight"]).all()
    model.eval()
    batch = make_batch(dims)
    with torch.no_grad():
        out = model(batch)
    info = model.interpretation()
    hp = info["hrf_parameters"]
    assert list(hp.index) == dims.source_names and hp.shape == (dims.n_source, 6)
    assert info["hrf_curves"].shape == (dims.n_source, info["hrf_time_s"].size)
    wav = info["wavelet_attention"]
    assert len(wav) == model.level + 1 and np.isclose(wav["weight"].sum(), 1.0)
    assert {"scale", "band_low_hz", "band_high_hz", "weight"} <= set(wav.columns)
    assert info["wavelet_attention_per_node"].shape == (dims.n_source, model.level + 1)
    gat = info["graph_attention"]
    assert set(gat["graph"]) == {"source", "target"}
    src = gat[gat["graph"] == "source"]
    np.testing.assert_allclose(src.groupby("target")["weight"].sum(), 1.0, atol=1e-5)
    clone = SambaEphys2Fmri.build(SMALL, dims)
    clone.load_state_dict(model.state_dict())
    clone.eval()
    with torch.no_grad():
        torch.testing.assert_close(clone(batch), out)
