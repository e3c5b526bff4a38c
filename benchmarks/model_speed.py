"""Benchmark: speed and memory of the SAMBA models (both directions) at the seed paper's shapes.

Shapes: EEG/MEG ``[B, 200 parcels, 12000 samples]`` (60 s at 200 Hz) -> fMRI ``[B, 500 parcels,
30]`` (60 s at TR 2 s), HRF kernel ``--hrf-kernel-s`` (default 30 s), random cosine graphs
(cosine similarity of random series) and a random region map (500 fine parcels, each fed by the
coarse parcels of one of 14 regions). For every front end and batch size (1 and 8) a fresh
subprocess with ``torch.set_num_threads(2)`` measures

* one training step: forward + cosine loss + backward + AdamW step (teacher forcing on);
* inference (``eval()``, ``no_grad``, free-running decoder) per window;
* peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of that subprocess: Python, torch and
  everything the configuration allocated);
* the parameter count, and whether every registered parameter received a non-zero gradient.

Targets (issue): training step at batch 1 <= 0.34 s, inference <= 0.13 s per window, peak RSS
<= 1.5 GB, every parameter trained (the public reference implementation: 3.41 s, 1.33 s, 5.5 GB).

    python benchmarks/model_speed.py [--json PATH] [--repeats 5] [--threads 2]
        [--front-ends neurovascular paper] [--batches 1 8] [--config '{"hidden_size": 32}']

fMRI -> EEG/MEG (``--directions fmri2ephys``): fMRI ``[B, 500, 30]`` -> EEG/MEG ``[B, 200, 12000]``,
the same graphs and region map, for every ``--targets`` kind (raw samples, band envelopes) and
batch size; beside the model, :class:`ReferenceFmri2Ephys` computes the same function (same
parameters, checked equal on a small problem before timing) the way the public reference
implementation is written: Python loops over parcels (region maps, coefficient estimators,
inverse DWT, pseudo-inverse HRF, LSTM, loss), over batch items and time steps, and dense
``N x N`` attention. The speed-up (reference / model, batch 1; target >= 10x) is reported.

    python benchmarks/model_speed.py --directions fmri2ephys [--targets raw envelope]
        [--reference-batches 1]

Times are medians over ``--repeats`` after one warm-up (the minimum is shown too; each
configuration stops repeating after about 30 s of training steps so that the whole run stays
within a few minutes). The load average is printed: on a 2-core machine, any other busy process
makes 2-thread runs wait at every parallel operation and slows them down many times over, so
compare numbers taken with a load average near 0 (the minimum is the least disturbed figure).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

FRONT_ENDS = ("neurovascular", "paper")


def busy_cpu_seconds() -> float:
    """CPU seconds spent by the whole machine so far (user + nice + system + irq + softirq)."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
BATCHES = (1, 8)


def make_dims(seed: int = 0):
    import numpy as np

    from samba_pipeline.models.base import DataDims

    rng = np.random.default_rng(seed)
    ns, nt, n_regions = 200, 500, 14

    def cosine(n):
        z = rng.standard_normal((n, 120))
        z /= np.linalg.norm(z, axis=1, keepdims=True)
        return z @ z.T

    region_of_source = np.arange(ns) % n_regions
    region_of_target = rng.integers(0, n_regions, nt)
    region_map = (region_of_target[:, None] == region_of_source[None, :]).astype(float)
    return DataDims("ephys2fmri", ns, nt, 200.0, 0.5, 60.0, source_graph=cosine(ns),
                    target_graph=cosine(nt), region_map=region_map)


def worker(front_end: str, batch_size: int, repeats: int, threads: int, kernel_s: float,
           budget_s: float = 30.0, overrides: dict | None = None) -> dict:
    import resource
    import statistics

    import numpy as np
    import torch

    from samba_pipeline.models.base import Batch
    from samba_pipeline.models.registry import get_model_class

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dims = make_dims()
    config = {"front_end": front_end, "hrf_kernel_s": kernel_s, **(overrides or {})}
    model = get_model_class("samba").build(config, dims)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch_size, dims.n_source, dims.source_len, generator=g)
    y = torch.randn(batch_size, dims.n_target, dims.target_len, generator=g)
    batch = Batch(x, y, torch.ones(dims.n_target, dtype=torch.bool))

    def train_step(check: bool = False):
        opt.zero_grad(set_to_none=True)
        loss = model.loss(model(batch), batch)
        loss.backward()
        missing = []
        if check:
            missing = [n for n, p in model.named_parameters()
                       if p.grad is None or not bool(p.grad.abs().sum() > 0)]
        opt.step()
        return missing

    model.train()
    missing = train_step(check=True)  # also the warm-up
    train = []
    deadline = time.monotonic() + budget_s
    for i in range(repeats):
        t0 = time.perf_counter()
        train_step()
        train.append(time.perf_counter() - t0)
        if i >= 1 and time.monotonic() > deadline:
            break
    model.eval()
    infer = []
    deadline = time.monotonic() + budget_s / 2
    with torch.no_grad():
        model(Batch(x))  # warm-up
        for i in range(repeats):
            t0 = time.perf_counter()
            out = model(Batch(x))
            infer.append((time.perf_counter() - t0) / batch_size)
            if i >= 1 and time.monotonic() > deadline:
                break
    assert out.shape == (batch_size, dims.n_target, dims.target_len)
    assert bool(torch.isfinite(out).all())
    return {
        "front_end": front_end,
        "batch": batch_size,
        "train_step_s": statistics.median(train),
        "train_step_s_min": min(train),
        "train_repeats": len(train),
        "infer_s_per_window": statistics.median(infer),
        "infer_s_per_window_min": min(infer),
        "infer_repeats": len(infer),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,  # KiB on Linux
        "n_parameters": int(sum(p.numel() for p in model.parameters())),
        "all_parameters_trained": not missing,
        "untrained_parameters": missing,
        "levels": model.level,
        "threads": torch.get_num_threads(),
        "hrf_kernel_s": kernel_s,
        "torch": torch.__version__,
        "n_cpu": os.cpu_count(),
        "numpy": np.__version__,
    }


# ---------------------------------------------------------------------------------------------
# fMRI -> EEG/MEG
# ---------------------------------------------------------------------------------------------
TARGETS = ("raw", "envelope")


def make_reverse_dims(seed: int = 0, n_fmri: int = 500, n_ephys: int = 200, sfreq: float = 200.0,
                      tr: float = 2.0, window_s: float = 60.0):
    """The paper's shapes for fmri2ephys: the region map keeps fMRI parcels as rows."""
    import numpy as np

    from samba_pipeline.models.base import DataDims

    rng = np.random.default_rng(seed)
    n_regions = 14

    def cosine(n):
        z = rng.standard_normal((n, 120))
        z /= np.linalg.norm(z, axis=1, keepdims=True)
        return z @ z.T

    ephys_graph = cosine(n_ephys)
    fmri_graph = cosine(n_fmri)
    region_of_ephys = np.arange(n_ephys) % n_regions
    region_of_fmri = rng.integers(0, n_regions, n_fmri)
    region_map = (region_of_fmri[:, None] == region_of_ephys[None, :]).astype(float)
    return DataDims("fmri2ephys", n_fmri, n_ephys, 1.0 / tr, sfreq, window_s, source_graph=fmri_graph,
                    target_graph=ephys_graph, region_map=region_map)


class ReferenceFmri2Ephys:
    """The function of a :class:`~samba_pipeline.models.samba.hemo2ele.SambaFmri2Ephys` (its own
    parameters), written as research code is: loops over parcels, batch items and time steps,
    and dense ``N x N`` GATv2 attention masked to the graph. The speed anchor of the benchmark."""

    def __init__(self, model):
        import torch

        self.m = model
        self.dense = {}
        for layer in (*model.source_gat, *model.target_gat):
            n = layer.n_nodes
            adj = torch.zeros(n, n, dtype=torch.bool)
            weight = torch.zeros(n, n)
            src, dst = layer.edge_index
            adj[dst, src] = True
            weight[dst, src] = layer.edge_weight[:, 0]
            self.dense[id(layer)] = (adj, weight)
        rm = model.region_map
        rows, cols = rm.rows.tolist(), rm.cols.tolist()
        self.region = [([], []) for _ in range(rm.n_out)]
        for k, (r, c) in enumerate(zip(rows, cols)):
            self.region[r][0].append(c)
            self.region[r][1].append(k)

    def gat(self, layer, x):
        """One GATv2 layer on one graph ``x [N, C]`` with dense attention."""
        import torch
        import torch.nn.functional as F

        conv = layer.conv
        adj, weight = self.dense[id(layer)]
        n, H, C = x.shape[0], conv.heads, conv.out_channels
        xl = conv.lin_l(x).view(n, H, C)
        xr = conv.lin_r(x).view(n, H, C)
        ee = conv.lin_edge(weight.unsqueeze(-1)).view(n, n, H, C)  # [target i, source j]
        s = F.leaky_relu(xl.unsqueeze(0) + xr.unsqueeze(1) + ee, conv.negative_slope)
        logits = (s * conv.att[0]).sum(-1).masked_fill(~adj.unsqueeze(-1), float("-inf"))
        alpha = torch.softmax(logits, dim=1)
        out = torch.einsum("ijh,jhc->ic", alpha, xl) / H + conv.bias
        out = F.elu(out)
        return out + x if layer.residual else out

    def forward(self, x, L):
        import torch
        import torch.nn.functional as F

        m = self.m
        B, Nf, T = x.shape
        n_mid = -(-L // m.stride)
        h = torch.stack([m.input_conv(x[:, i: i + 1]) for i in range(Nf)], dim=1)  # [B, Nf, H, T]
        h = m.dropout(h.permute(0, 3, 1, 2) + m.source_embedding)  # [B, T, Nf, H]
        per_graph = []
        for b in range(B):
            steps = []
            for t in range(T):
                g = h[b, t]
                for layer in m.source_gat:
                    g = self.gat(layer, g)
                rows = []
                for j, (cols, k) in enumerate(self.region):
                    w = m.region_map.weight[k].unsqueeze(-1)
                    rows.append((w * g[cols]).sum(0) + m.region_map.bias[j])
                g = torch.stack(rows)
                for layer in m.target_gat:
                    g = self.gat(layer, g)
                steps.append(g)
            per_graph.append(torch.stack(steps))  # [T, Ne, H]
        feats = m.dropout(torch.stack(per_graph))  # [B, T, Ne, H]
        sizes, i0, i1, frac, chan = m._readout_positions(T, n_mid, x.device)
        outs, coeffs = [], []
        for j in range(m.n_target):
            a = m.estimator(feats[:, :, j].transpose(1, 2)).reshape(B, -1)  # [B, S*T]
            c = a[:, i0] * (1 - frac) + a[:, i1] * frac
            c = c * torch.exp(m.scale_log_gain[j])[chan]
            cj = list(torch.split(c, sizes, dim=-1))
            coeffs.append(cj)
            z = m.dwt.inverse(cj)[:, :n_mid].unsqueeze(1)  # [B, 1, Lr]
            K = m.pinv_kernel.shape[-1]
            u = F.conv_transpose1d(z, m.pinv_kernel[j: j + 1])[..., (K - 1) // 2: (K - 1) // 2 + n_mid]
            y = u[:, 0]
            if m.lstm is not None:
                o, _ = m.lstm(torch.stack([u[:, 0], z[:, 0]], dim=-1))
                y = y + m.readout(o)[..., 0]
            if m.stride > 1:
                y = F.interpolate(y.unsqueeze(1), size=n_mid * m.stride, mode="linear",
                                  align_corners=False)[:, 0]
            outs.append(y[:, :L])
        return torch.stack(outs, dim=1), coeffs

    def loss(self, pred, coeffs, target, mask):
        import torch
        import torch.nn.functional as F

        from samba_pipeline.models.samba.hemo2ele import block_mean

        m = self.m
        lam = float(m.config["lambda_match"])
        target = m.regression_target(target)
        kernels = m.hrf.kernels(m.rate, float(m.config["hrf_kernel_s"]))
        total, count = 0.0, 0
        for j in range(m.n_target):
            if not bool(mask[j]):
                continue
            p, t = pred[:, j], target[:, j]
            match = 1 - (p * t).sum(-1) / (p.norm(dim=-1) * t.norm(dim=-1) + 1e-8)  # [B]
            pooled = block_mean(t, m.stride).unsqueeze(1)  # [B, 1, Lr]
            K = kernels.shape[-1]
            smooth = F.conv1d(pooled, kernels[j].flip(-1).view(1, 1, K), padding=K - 1)
            smooth = smooth[:, 0, : pooled.shape[-1]]
            true = m.dwt(smooth)
            energy = torch.stack([c.square().sum(-1) for c in true], -1)
            cos = torch.stack([(a * c).sum(-1) / (a.norm(dim=-1) * c.norm(dim=-1) + 1e-8)
                               for a, c in zip(coeffs[j], true)], -1)
            skip = ((energy / (energy.sum(-1, keepdim=True) + 1e-8)) * (1 - cos)).sum(-1)
            total = total + (lam * match + (1 - lam) * skip).sum()
            count += p.shape[0]
        return total / max(count, 1)


def check_reference(seed: int = 0) -> float:
    """Largest absolute difference of output and loss between the model and the reference on a
    small problem (both in training mode without dropout); raises when they, or the gradients of
    every parameter, disagree."""
    import torch

    from samba_pipeline.models.base import Batch
    from samba_pipeline.models.registry import get_model_class

    torch.manual_seed(seed)
    dims = make_reverse_dims(seed, n_fmri=24, n_ephys=10, sfreq=50.0, tr=2.0, window_s=40.0)
    model = get_model_class("samba").build({"dropout": 0.0, "hidden_size": 8, "top_k": 5}, dims)
    ref = ReferenceFmri2Ephys(model)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, dims.n_source, dims.source_len, generator=g)
    y = torch.randn(2, dims.n_target, dims.target_len, generator=g)
    mask = torch.ones(dims.n_target, dtype=torch.bool)
    mask[0] = False
    batch = Batch(x, y, mask)
    out = model(batch)
    loss = model.loss(out, batch)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref_out, coeffs = ref.forward(x, dims.target_len)
    ref_loss = ref.loss(ref_out, coeffs, y, mask)
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))
    diff = max(float((out - ref_out).detach().abs().max()), float((loss - ref_loss).detach().abs()))
    scale = float(out.detach().abs().max())
    gdiff = max(float((a - b).abs().max() / (b.abs().max() + 1e-6)) for a, b in zip(grads, ref_grads))
    if not (diff <= 1e-4 * max(scale, 1.0) and gdiff <= 1e-3):
        raise AssertionError(f"the reference implementation differs from the model by {diff:g} "
                             f"(gradients: {gdiff:g} relative)")
    return diff


def reverse_worker(target: str, batch_size: int, repeats: int, threads: int, reference: bool,
                   budget_s: float = 30.0, overrides: dict | None = None) -> dict:
    """Time the fmri2ephys model (or, with ``reference``, its per-parcel reference)."""
    import resource
    import statistics

    import numpy as np
    import torch

    from samba_pipeline.models.base import Batch
    from samba_pipeline.models.registry import get_model_class

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dims = make_reverse_dims()
    model = get_model_class("samba").build({"target": target, **(overrides or {})}, dims)
    ref = ReferenceFmri2Ephys(model) if reference else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch_size, dims.n_source, dims.source_len, generator=g)
    y = torch.randn(batch_size, dims.n_target, dims.target_len, generator=g)
    mask = torch.ones(dims.n_target, dtype=torch.bool)
    batch = Batch(x, y, mask)

    def run(grad: bool):
        if ref is None:
            out = model(batch if grad else Batch(x))
            return out, (model.loss(out, batch) if grad else None)
        out, coeffs = ref.forward(x, dims.target_len)
        return out, (ref.loss(out, coeffs, y, mask) if grad else None)

    def train_step(check: bool = False):
        opt.zero_grad(set_to_none=True)
        _, loss = run(True)
        loss.backward()
        missing = []
        if check:
            missing = [n for n, p in model.named_parameters()
                       if p.grad is None or not bool(p.grad.abs().sum() > 0)]
        opt.step()
        return missing

    model.train()
    missing = train_step(check=True)  # also the warm-up
    train = []
    deadline = time.monotonic() + budget_s
    for i in range(repeats):
        t0 = time.perf_counter()
        train_step()
        train.append(time.perf_counter() - t0)
        if i >= 1 and time.monotonic() > deadline:
            break
    model.eval()
    infer = []
    deadline = time.monotonic() + budget_s / 2
    with torch.no_grad():
        out, _ = run(False)  # warm-up
        for i in range(repeats):
            t0 = time.perf_counter()
            out, _ = run(False)
            infer.append((time.perf_counter() - t0) / batch_size)
            if i >= 1 and time.monotonic() > deadline:
                break
    assert out.shape == (batch_size, dims.n_target, dims.target_len)
    assert bool(torch.isfinite(out).all())
    return {
        "implementation": "reference" if reference else "samba",
        "target": target,
        "batch": batch_size,
        "train_step_s": statistics.median(train),
        "train_step_s_min": min(train),
        "train_repeats": len(train),
        "infer_s_per_window": statistics.median(infer),
        "infer_s_per_window_min": min(infer),
        "infer_repeats": len(infer),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "n_parameters": int(sum(p.numel() for p in model.parameters())),
        "all_parameters_trained": not missing,
        "untrained_parameters": missing,
        "levels": model.level,
        "intermediate_rate_hz": model.rate,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "n_cpu": os.cpu_count(),
        "numpy": np.__version__,
    }


def run_worker(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"benchmark worker failed: {' '.join(args)}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main_reverse(args) -> dict:
    """fmri2ephys: model and reference figures, printed and returned."""
    diff = check_reference()
    results = []
    common = ["--repeats", str(args.repeats), "--threads", str(args.threads), "--config", args.config]
    for target in args.targets:
        for b in args.batches:
            results.append(run_worker(["--reverse-worker", target, str(b), "samba", *common]))
            if b in args.reference_batches:
                results.append(run_worker(["--reverse-worker", target, str(b), "reference", *common]))
    print(f"SAMBA fmri2ephys, [B, 500, 30] @ TR 2 s -> [B, 200, 12000] @ 200 Hz, {args.threads} threads, "
          f"{args.repeats} repeats (median); reference = per-parcel loops + dense attention "
          f"(same function: max |difference| {diff:.1e} on a small problem)"
          + (f", settings {args.config}" if json.loads(args.config) else ""))
    header = (f"{'target':<9} {'impl':<10} {'batch':>5} {'train step s':>13} {'(min)':>7} "
              f"{'infer s/window':>15} {'(min)':>7} {'peak RSS GB':>12} {'params':>8} {'all trained':>12}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['target']:<9} {r['implementation']:<10} {r['batch']:>5} {r['train_step_s']:>13.3f} "
              f"{r['train_step_s_min']:>7.3f} {r['infer_s_per_window']:>15.4f} "
              f"{r['infer_s_per_window_min']:>7.4f} {r['peak_rss_gb']:>12.2f} {r['n_parameters']:>8d} "
              f"{str(r['all_parameters_trained']):>12}")
        if r["untrained_parameters"]:
            print(f"    without gradient: {', '.join(r['untrained_parameters'])}")
    speedups = {}
    for r in results:
        if r["implementation"] != "reference":
            continue
        own = next(o for o in results if o["implementation"] == "samba" and o["target"] == r["target"]
                   and o["batch"] == r["batch"])
        key = f"{r['target']}_b{r['batch']}"
        speedups[key] = {
            "train_step": r["train_step_s"] / own["train_step_s"],
            "train_step_min": r["train_step_s_min"] / own["train_step_s_min"],
            "infer": r["infer_s_per_window"] / own["infer_s_per_window"],
            "infer_min": r["infer_s_per_window_min"] / own["infer_s_per_window_min"],
        }
        print(f"speed-up over the reference ({r['target']}, batch {r['batch']}): training step "
              f"{speedups[key]['train_step']:.1f}x (minima {speedups[key]['train_step_min']:.1f}x), "
              f"inference {speedups[key]['infer']:.1f}x (minima {speedups[key]['infer_min']:.1f}x); "
              "target >= 10x")
    return {"runs": results, "speedup": speedups, "reference_max_abs_difference": diff,
            "target_speedup": 10.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="also write the figures as JSON to this path")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hrf-kernel-s", type=float, default=30.0)
    ap.add_argument("--front-ends", nargs="+", default=list(FRONT_ENDS), choices=FRONT_ENDS)
    ap.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    ap.add_argument("--config", default="{}", help="JSON dict of extra model settings")
    ap.add_argument("--directions", nargs="+", default=["ephys2fmri"], choices=["ephys2fmri", "fmri2ephys"])
    ap.add_argument("--targets", nargs="+", default=["raw"], choices=TARGETS,
                    help="fmri2ephys: what the model predicts (raw samples or band envelopes)")
    ap.add_argument("--reference-batches", nargs="*", type=int, default=[1],
                    help="fmri2ephys: batch sizes at which the per-parcel reference is timed too")
    ap.add_argument("--worker", nargs=2, metavar=("FRONT_END", "BATCH"), help=argparse.SUPPRESS)
    ap.add_argument("--reverse-worker", nargs=3, metavar=("TARGET", "BATCH", "IMPL"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        res = worker(args.worker[0], int(args.worker[1]), args.repeats, args.threads, args.hrf_kernel_s,
                     overrides=json.loads(args.config))
        print("RESULT " + json.dumps(res))
        return 0
    if args.reverse_worker:
        target, b, impl = args.reverse_worker
        res = reverse_worker(target, int(b), args.repeats, args.threads, impl == "reference",
                             overrides=json.loads(args.config))
        print("RESULT " + json.dumps(res))
        return 0
    if "ephys2fmri" not in args.directions:
        start = time.monotonic()
        load_before = os.getloadavg()
        busy_before = busy_cpu_seconds()
        import resource

        own_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        summary = {"fmri2ephys": main_reverse(args)}
        wall = time.monotonic() - start
        own_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        own = (own_after.ru_utime + own_after.ru_stime) - (own_before.ru_utime + own_before.ru_stime)
        foreign_cores = max(0.0, (busy_cpu_seconds() - busy_before - own) / wall)
        print(f"benchmark wall time {wall:.0f} s; other processes kept {foreign_cores:.2f} of "
              f"{os.cpu_count()} cores busy on average (load average before {load_before[0]:.2f})")
        if foreign_cores > 0.1:
            print("WARNING: the machine was busy with other processes; timings are inflated "
                  "(see the minima, or rerun on an idle machine)")
        summary.update({"threads": args.threads, "repeats": args.repeats, "wall_s": wall,
                        "load_average_before": load_before[0], "foreign_busy_cores": foreign_cores,
                        "config_overrides": json.loads(args.config)})
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(summary, fh, indent=2)
        return 0

    from samba_pipeline.models.samba.ele2hemo import SambaEphys2Fmri

    default_fe = SambaEphys2Fmri.default_config()["front_end"]
    import resource

    start = time.monotonic()
    load_before = os.getloadavg()
    busy_before = busy_cpu_seconds()
    own_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    results = []
    for fe in args.front_ends:
        for b in args.batches:
            cmd = [sys.executable, __file__, "--worker", fe, str(b), "--repeats", str(args.repeats),
                   "--threads", str(args.threads), "--hrf-kernel-s", str(args.hrf_kernel_s),
                   "--config", args.config]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr)
                raise SystemExit(f"benchmark worker failed: {' '.join(cmd)}")
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
            results.append(json.loads(line[len("RESULT "):]))
    load_after = os.getloadavg()
    own_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.monotonic() - start
    own = (own_after.ru_utime + own_after.ru_stime) - (own_before.ru_utime + own_before.ru_stime)
    # Average number of cores kept busy by *other* processes while the benchmark ran.
    foreign_cores = max(0.0, (busy_cpu_seconds() - busy_before - own) / wall)

    header = (f"{'front end':<14} {'batch':>5} {'train step s':>13} {'(min)':>7} {'infer s/window':>15} "
              f"{'(min)':>7} {'peak RSS GB':>12} {'params':>8} {'all trained':>12}")
    print(f"SAMBA ephys2fmri, [B, 200, 12000] @ 200 Hz -> [B, 500, 30] @ TR 2 s, HRF kernel "
          f"{args.hrf_kernel_s:g} s, {args.threads} threads, {args.repeats} repeats (median)"
          + (f", settings {args.config}" if json.loads(args.config) else ""))
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['front_end']:<14} {r['batch']:>5} {r['train_step_s']:>13.3f} "
              f"{r['train_step_s_min']:>7.3f} "
              f"{r['infer_s_per_window']:>15.4f} {r['infer_s_per_window_min']:>7.4f} "
              f"{r['peak_rss_gb']:>12.2f} {r['n_parameters']:>8d} {str(r['all_parameters_trained']):>12}")
        if r["untrained_parameters"]:
            print(f"    without gradient: {', '.join(r['untrained_parameters'])}")
    print(f"benchmark wall time {wall:.0f} s; other processes kept {foreign_cores:.2f} of "
          f"{os.cpu_count()} cores busy on average (load average before {load_before[0]:.2f})")
    if foreign_cores > 0.1:
        print("WARNING: the machine was busy with other processes; timings are inflated "
              "(see the minima, or rerun on an idle machine)")

    per_fe: dict = {}
    for r in results:
        d = per_fe.setdefault(r["front_end"], {})
        b = r["batch"]
        d[f"train_step_s_b{b}"] = r["train_step_s"]
        d[f"train_step_s_min_b{b}"] = r["train_step_s_min"]
        d[f"infer_s_per_window_b{b}"] = r["infer_s_per_window"]
        d[f"infer_s_per_window_min_b{b}"] = r["infer_s_per_window_min"]
        d[f"peak_rss_gb_b{b}"] = r["peak_rss_gb"]
        d["peak_rss_gb"] = max(d.get("peak_rss_gb", 0.0), r["peak_rss_gb"])
        d["n_parameters"] = r["n_parameters"]
        d["all_parameters_trained"] = d.get("all_parameters_trained", True) and r["all_parameters_trained"]
    summary = {
        "default_front_end": default_fe,
        **per_fe.get(default_fe, next(iter(per_fe.values()))),
        "per_front_end": per_fe,
        "threads": args.threads,
        "repeats": args.repeats,
        "hrf_kernel_s": args.hrf_kernel_s,
        "config_overrides": json.loads(args.config),
        "load_average_before": load_before[0],
        "load_average_after": load_after[0],
        "foreign_busy_cores": foreign_cores,
        "wall_s": wall,
        "targets": {"train_step_s_b1": 0.34, "infer_s_per_window_b1": 0.13, "peak_rss_gb": 1.5},
        "reference_implementation": {"train_step_s_b1": 3.41, "infer_s_per_window_b1": 1.33,
                                     "peak_rss_gb": 5.5},
        "runs": results,
    }
    if "fmri2ephys" in args.directions:
        summary["fmri2ephys"] = main_reverse(args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
