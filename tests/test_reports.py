"""HTML reports: per-subject ``OUT/sub-XX.html`` and ``OUT/group.html`` on a small demo run.

The rendering test opens every report in headless Chromium (Debian's ``chromium``; ``make
report-deps`` installs it) and is skipped, saying why, where Chromium is missing.
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import mne
import numpy as np
import pytest
from PIL import Image

from samba_pipeline.reports.boilerplate import methods_text

STEM = "model-samba_direction-ephys2fmri"


def _cli(*args, timeout=900):
    return subprocess.run(
        [sys.executable, "-m", "samba_pipeline.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """3-subject, 3-minute demo (sub-03 EEG only): participant (36P, l_freq 1 Hz), group, and
    sub-03 translated with the model file."""
    root = tmp_path_factory.mktemp("reports")
    bids, truth = root / "bids", root / "truth"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "samba_pipeline.cli.demo",
            str(bids),
            "--subjects",
            "3",
            "--minutes",
            "3",
            "--seed",
            "5",
            "--truth-dir",
            str(truth),
            "--eeg-only",
            "03",
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out, work = root / "out", root / "work"
    common = [
        "-w",
        work,
        "--config-file",
        truth / "samba-bids-demo.toml",
        "--skip-bids-validation",
        "--nprocs",
        "2",
        "-p",
        "36P",
        "--ephys-setting",
        "l_freq=1.0",
    ]
    proc = _cli(bids, out, "participant", "--participant-label", "01", "02", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _cli(
        bids,
        out,
        "group",
        *common,
        "--epochs",
        "2",
        "--train-window",
        "30",
        "--mc-dropout",
        "2",
        "--split",
        "windows",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _cli(
        bids,
        out,
        "participant",
        "--participant-label",
        "03",
        *common,
        "--model-file",
        out / "group" / f"{STEM}_model.json",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"bids": bids, "truth": truth, "out": out, "work": work}


# ---------------------------------------------------------------------------------------------
# What the demo run writes
# ---------------------------------------------------------------------------------------------
def test_demo_run_writes_subject_and_group_reports(demo_run):
    out = demo_run["out"]
    for name in ("sub-01.html", "sub-02.html", "sub-03.html", "group.html"):
        assert (out / name).is_file(), name
    figs = {p.name for p in (out / "sub-01" / "figures").iterdir()}
    run = "sub-01_task-rest"
    for name in (
        f"{run}_desc-psd_eeg.svg",
        f"{run}_desc-badchannels_eeg.svg",
        f"{run}_desc-carpet_bold.png",
        f"{run}_desc-motion_bold.svg",
        f"{run}_desc-atlases_dseg.png",
        f"{run}_desc-connectivity_relmat.svg",
        f"{run}_desc-alignment_eeg.svg",
        f"{run}_desc-summary_eeg.html",
        "sub-01_desc-methods_report.html",
        f"{run}_desc-sambaPrediction_bold.svg",
        f"{run}_desc-sambaCorrelation_bold.png",
        f"{run}_desc-sambaMetrics_bold.html",
        "sub-01_desc-sambaHrf_bold.svg",
        "sub-01_desc-sambaWavelet_bold.svg",
    ):
        assert name in figs, name
    page = (out / "sub-01.html").read_text()
    for section in ("EEG/MEG", "fMRI", "Atlases", "Connectivity", "Alignment", "Model: samba", "Methods"):
        assert section in page, section
    # EEG-only subject translated with --model-file: EEG QC and the prediction, no correlation map
    figs3 = {p.name for p in (out / "sub-03" / "figures").iterdir()}
    assert "sub-03_task-rest_desc-psd_eeg.svg" in figs3
    assert "sub-03_task-rest_desc-sambaPrediction_bold.svg" in figs3
    assert not any("Correlation" in n or "carpet" in n for n in figs3)
    group = (out / "group.html").read_text()
    assert "Benchmark table" in group and "baseline:mean" in group and "Training curves" in group
    assert (out / "group" / "figures" / f"{STEM}_desc-training_history.svg").is_file()


def test_boilerplate_in_report_names_the_settings_used(demo_run):
    text = (demo_run["out"] / "sub-01" / "figures" / "sub-01_desc-methods_report.html").read_text()
    assert "36P" in text and "global, CSF and white-matter signals" in text
    assert "l_freq = 1 Hz" in text and "Schaefer" not in text  # the demo's own atlas, not Schaefer
    assert "arXiv:2409.18462" in text and "Nipype" in text and "MNE-Python" in text
    model = (demo_run["out"] / "sub-01" / "figures" / "sub-01_desc-sambaMethods_bold.html").read_text()
    assert "up to 2 epochs" in model and "Monte-Carlo dropout" in model


def test_boilerplate_follows_the_settings(demo_dataset, tmp_path):
    from samba_pipeline.cli.parser import parse_args
    from samba_pipeline.fmri.confounds import STRATEGIES

    bids, _ = demo_dataset
    default = parse_args([str(bids), str(tmp_path / "o1"), "participant"])
    custom = parse_args(
        [
            str(bids),
            str(tmp_path / "o2"),
            "participant",
            "-p",
            "36P",
            "--ephys-setting",
            "l_freq=1.3",
            "h_freq=45",
            "raw_resample_sfreq=250",
            "--fd-threshold",
            "0.3",
            "--fmri-atlas-parcels",
            "400",
        ]
    )

    def flat(settings):
        paragraphs, refs = methods_text(settings)
        return " ".join(t for _, t in paragraphs) + " " + " ".join(refs)

    d, c = flat(default), flat(custom)
    assert "acompcor" in d and STRATEGIES["acompcor"].description[1:40] in d and "CompCor" in d
    assert "36P" in c and STRATEGIES["36P"].description[1:60] in c and "36P" not in d
    assert "l_freq = 1.3 Hz" in c and "l_freq = 0.5 Hz" in d
    assert "h_freq = 45 Hz" in c and "250 Hz" in c and "0.3 mm" in c
    assert "Schaefer2018 atlas (400 parcels" in c and "Schaefer2018 atlas (500 parcels" in d
    assert "Schaefer, A. et al. (2018)" in c and "Esteban, O. et al. (2019)" in c
    assert "arXiv:2409.18462" in c and "Gramfort" in c and "Abraham" in c and "Gorgolewski" in c


# ---------------------------------------------------------------------------------------------
# Rendering in headless Chromium
# ---------------------------------------------------------------------------------------------
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _check_image(data: bytes, kind: str, where: str) -> None:
    if kind == "svg":
        root = ET.fromstring(data)
        assert root.tag.endswith("svg"), f"{where}: not an SVG document"
        assert len(root) > 0, f"{where}: empty SVG"
    else:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        with Image.open(io.BytesIO(data)) as img:
            assert img.size[0] > 10 and img.size[1] > 10, f"{where}: {img.size}"


@pytest.mark.parametrize("page", ["sub-01.html", "sub-03.html", "group.html"])
def test_reports_render_in_headless_chromium(demo_run, page, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("headless Chromium not available: install Debian's chromium package (make report-deps)")
    path = demo_run["out"] / page
    proc = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
            path.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert "samba-bids" in dom and "</html>" in dom, "the page did not load"
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, "JavaScript console messages:\n" + "\n".join(console)
    sources = re.findall(r"<img[^>]*?\ssrc=\"([^\"]+)\"", dom)
    assert len(sources) >= (3 if page == "group.html" else 5), sources[:5]
    for src in sources:
        if src.startswith("data:"):
            m = re.match(r"data:image/([a-z+]+);base64,(.*)", src, re.S)
            assert m, src[:60]
            _check_image(base64.b64decode(m.group(2)), "svg" if "svg" in m.group(1) else "png", src[:40])
        else:
            assert not re.match(r"[a-z]+://", src), f"external image {src}"
            target = (path.parent / src).resolve()
            assert target.is_file(), f"{page} references a missing figure: {src}"
            _check_image(target.read_bytes(), target.suffix.lstrip("."), src)


# ---------------------------------------------------------------------------------------------
# Cost and the power spectra
# ---------------------------------------------------------------------------------------------
def test_report_generation_takes_under_20_s_per_subject(demo_run):
    """What the report nodes of the demo's participant run cost (Nipype's runtime records)."""
    from nipype.utils.filemanip import loadpkl

    for subject in ("01", "02", "03"):
        sub_wf = next(demo_run["work"].glob(f"samba_bids_*_wf/sub_{subject}_wf"))
        results = list(sub_wf.glob("*/reportlets/result_reportlets.pklz")) + [
            sub_wf / "report" / "result_report.pklz"
        ]
        seconds = sum(float(loadpkl(r).runtime.duration) for r in results)
        assert len(results) == 2 and 0 < seconds < 20.0, (subject, seconds)


def test_psd_summary_shows_line_noise_removed():
    from samba_pipeline.ephys.preprocess import EphysSettings, preprocess_raw
    from samba_pipeline.reports.psd import psd_summary

    sfreq, n = 500.0, 500 * 60
    rng = np.random.default_rng(0)
    t = np.arange(n) / sfreq
    names = ["Fz", "Cz", "Pz", "Oz", "C3", "C4"]
    data = 1e-6 * (
        rng.standard_normal((6, n)) + 5 * np.sin(2 * np.pi * 10 * t) + 20 * np.sin(2 * np.pi * 50 * t)
    )
    info = mne.create_info(names, sfreq, "eeg")
    info["line_freq"] = 50.0
    raw = mne.io.RawArray(data, info, verbose="error")
    clean, _ = preprocess_raw(raw, EphysSettings(raw_resample_sfreq=200.0, eeg_reference=None))
    s = psd_summary(raw, clean, ["eeg"])
    assert s["before_psd"].shape == (6, s["before_freqs"].size) and s["after_sfreq"] == 200.0

    def power(when, f):
        return float(np.median(s[f"{when}_psd"][:, np.argmin(np.abs(s[f"{when}_freqs"] - f))]))

    assert power("before", 50) > 100 * power("after", 50)  # notch
    assert power("after", 10) > 10 * power("after", 30)  # the alpha peak survives
