"""Benchmark: wall time and peak memory of the participant level on one large subject.

The issue's target: 10 minutes of 64-channel EEG at 1000 Hz and 300 BOLD volumes on the 2 mm
MNI grid (97 x 115 x 97) take at most 90 s wall and 4 GB peak RSS on a 2-core machine.

    python benchmarks/participant_speed.py [--data DIR] [--keep] [--json PATH] [--nprocs 2]

The data are generated with the demo generator's options (unless --data points at an existing
dataset); generation is not timed. Peak RSS is the largest sum of resident memory over the
samba-bids process tree (sampled every 50 ms), which is what a cluster's memory limit sees.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil


def generate(root: Path) -> Path:
    bids = root / "bids"
    cmd = [sys.executable, "-m", "samba_pipeline.cli.demo", str(bids), "--subjects", "1",
           "--minutes", "10", "--resolution-mm", "2", "--eeg-channels", "64", "--eeg-sfreq", "1000",
           "--tr", "2", "--overwrite"]
    start = time.monotonic()
    subprocess.run(cmd, check=True)
    print(f"generated the benchmark dataset in {time.monotonic() - start:.1f} s", file=sys.stderr)
    return bids


class PeakRSS(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            try:
                procs = [self.proc] + self.proc.children(recursive=True)
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                break
            time.sleep(self.interval)


def run_participant(bids: Path, out: Path, work: Path, nprocs: int) -> dict:
    truth = bids.parent / f"{bids.name}_groundtruth"
    config = truth / "samba-bids-demo.toml"
    cmd = [sys.executable, "-m", "samba_pipeline.cli", str(bids), str(out), "participant",
           "-w", str(work), "--nprocs", str(nprocs), "--skip-bids-validation"]
    if config.is_file():
        cmd += ["--config-file", str(config)]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    monitor = PeakRSS(proc.pid)
    monitor.start()
    _, stderr = proc.communicate()
    wall = time.monotonic() - start
    monitor.done.set()
    monitor.join()
    if proc.returncode != 0:
        sys.stderr.write(stderr[-4000:])
        raise SystemExit(f"samba-bids failed with exit code {proc.returncode}")
    return {"wall_s": round(wall, 2), "peak_rss_gb": round(monitor.peak / 1e9, 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="existing benchmark BIDS folder (else generated)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    parser.add_argument("--nprocs", type=int, default=2)
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="samba-bench-"))
    try:
        bids = args.data or generate(tmp)
        cold = run_participant(bids, tmp / "out", tmp / "work", args.nprocs)
        warm = run_participant(bids, tmp / "out", tmp / "work", args.nprocs)
        result = {
            "dataset": "1 subject, 10 min 64-ch EEG at 1000 Hz, 300 volumes at 2 mm",
            "nprocs": args.nprocs,
            "cold_wall_s": cold["wall_s"], "cold_peak_rss_gb": cold["peak_rss_gb"],
            "rerun_wall_s": warm["wall_s"], "rerun_peak_rss_gb": warm["peak_rss_gb"],
            "target_wall_s": 90, "target_peak_rss_gb": 4.0,
        }
        print(f"{'measure':<28}{'value':>10}{'target':>10}")
        print(f"{'participant wall (s)':<28}{cold['wall_s']:>10.1f}{90:>10}")
        print(f"{'participant peak RSS (GB)':<28}{cold['peak_rss_gb']:>10.2f}{4.0:>10}")
        print(f"{'re-run wall (s)':<28}{warm['wall_s']:>10.1f}{'':>10}")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
