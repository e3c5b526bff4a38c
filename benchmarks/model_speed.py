"""Benchmark: speed and memory of the SAMBA ephys -> fMRI model at the seed paper's shapes.

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="also write the figures as JSON to this path")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hrf-kernel-s", type=float, default=30.0)
    ap.add_argument("--front-ends", nargs="+", default=list(FRONT_ENDS), choices=FRONT_ENDS)
    ap.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    ap.add_argument("--config", default="{}", help="JSON dict of extra model settings")
    ap.add_argument("--worker", nargs=2, metavar=("FRONT_END", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        res = worker(args.worker[0], int(args.worker[1]), args.repeats, args.threads, args.hrf_kernel_s,
                     overrides=json.loads(args.config))
        print("RESULT " + json.dumps(res))
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
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
