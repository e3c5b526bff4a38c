"""Benchmark: MR artifact correction + preprocessing + source-space parcels for 10 min of
64-channel EEG at 1000 Hz (the participant level's budget: 90 s, 4 GB per run).

    python benchmarks/ephys_depth_speed.py [--minutes 10] [--channels 64] [--sfreq 1000] [--meg]

Simulated data: 1-40 Hz EEG, gradient artifact (30 slices per 2 s volume), ballistocardiogram
and an ECG channel; the atlas is the demo's coarse atlas (20 parcels, 4 mm). ``--meg``: the
demo's 306-channel MEG helmet (102 magnetometers + 204 gradiometers, 1-40 Hz noise of MEG
size) instead, without MR artifacts (MEG is never recorded in the scanner). Prints wall time
per stage and the peak RSS of the process (getrusage).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import mne
import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--sfreq", type=float, default=1000.0)
    p.add_argument("--meg", action="store_true", help="306-channel MEG instead of EEG")
    args = p.parse_args(argv)
    mne.set_log_level("error")
    from samba_pipeline.atlas import read_label_table
    from samba_pipeline.ephys.preprocess import EphysSettings, preprocess_raw
    from samba_pipeline.ephys.source import source_parcel_timeseries
    from samba_pipeline.simulate.atlas import build_demo_atlas
    from samba_pipeline.simulate.dataset import write_atlas_derivative
    from samba_pipeline.simulate.eeg import _montage, add_cardiac, add_gradient_artefact, choose_channels

    rng = np.random.default_rng(0)
    sfreq, tr = args.sfreq, 2.0
    n = int(args.minutes * 60 * sfreq)
    names = choose_channels(args.channels)
    data = mne.filter.filter_data(rng.standard_normal((len(names), n)).astype(float), sfreq, 1.0,
                                  40.0, verbose=False) * 20e-6
    info = mne.create_info(names + ["ECG"], sfreq, ["eeg"] * len(names) + ["ecg"])
    info.set_montage(_montage(), on_missing="ignore")
    pos = np.array([info["chs"][i]["loc"][:3] for i in range(len(names))])
    triggers = int(5 * sfreq) + np.arange(int((n / sfreq - 10) // tr)) * int(tr * sfreq)
    ecg, _, _ = add_cardiac(rng, data, sfreq, pos)
    add_gradient_artefact(rng, data, sfreq, triggers, tr)
    raw = mne.io.RawArray(np.vstack([data, ecg[None]]), info, verbose=False)
    del data
    settings = EphysSettings(find_noisy_channels=False)
    if args.meg:
        from samba_pipeline.simulate.meg import sensor_info

        info = sensor_info(np.array([0.0, 0.01, 0.04]), sfreq)
        mags = mne.pick_types(info, meg="mag")
        del raw
        data = np.empty((len(info["ch_names"]), n))  # filled in blocks: no construction peak
        for i in range(0, len(data), 32):
            data[i:i + 32] = mne.filter.filter_data(rng.standard_normal((len(data[i:i + 32]), n)),
                                                    sfreq, 1.0, 40.0, verbose=False)
        data *= 1e-11  # T/m (gradiometers)
        data[mags] *= 1e-2  # T (magnetometers)
        raw = mne.io.RawArray(data, info, verbose=False)
        del data
        triggers = np.zeros(0)
        names = info["ch_names"]
        settings = EphysSettings(ch_types=("meg",), find_noisy_channels=False)
    tmp = Path(tempfile.mkdtemp())
    atlas = build_demo_atlas()  # 4 mm, 20 coarse / 50 fine parcels
    write_atlas_derivative(tmp, atlas)
    images = sorted((tmp / "derivatives" / "atlases").rglob("*_dseg.nii.gz"))
    coarse = min(images, key=lambda q: int(q.name.split("scale-")[1].split("_")[0]))
    labels = read_label_table(Path(str(coarse).replace(".nii.gz", ".tsv")))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    t0 = time.perf_counter()
    # independent white channels have no volume conduction: the correlation criterion would
    # flag them all, so bad-channel detection is off for this synthetic recording
    excerpt: dict = {}  # as the participant level does: before/after QC figure of a 20 s excerpt
    clean, report = preprocess_raw(raw, settings, volume_onsets=triggers / sfreq,
                                   qc_excerpt=excerpt)
    t_fig = time.perf_counter()
    if report["mr_artifacts"]["gradient"].get("applied"):
        from samba_pipeline.ephys.artifacts import artifact_qc_figure

        artifact_qc_figure(excerpt["before"], excerpt["after"], excerpt["sfreq"],
                           tmp / "qc.svg", title="benchmark")
    t_fig = time.perf_counter() - t_fig
    t1 = time.perf_counter()
    out, src_report = source_parcel_timeseries(clean, coarse, labels)
    t2 = time.perf_counter()
    result = {
        "recording": (f"{args.minutes:g} min, {len(names)} MEG channels, {sfreq:g} Hz" if args.meg
                      else f"{args.minutes:g} min, {len(names)} EEG channels + ECG, {sfreq:g} Hz"),
        "mr_artifacts_s": report["timings_s"]["mr_artifacts"],
        "preprocess_total_s": round(t1 - t0, 2),
        "preprocess_steps_s": report["timings_s"],
        "qc_figure_s": round(t_fig, 2),
        "gradient_applied": report["mr_artifacts"]["gradient"]["applied"],
        "bcg_applied": report["mr_artifacts"]["bcg"]["applied"],
        "source_s": round(t2 - t1, 2),
        "source_steps_s": src_report["timings_s"],
        "n_sources": src_report["n_sources"],
        "total_s": round(t2 - t0, 2),
        "rss_before_gb": round(rss0, 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
    }
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
