"""``samba-bids-demo --mr-artifacts``: uncorrected MR artifacts, their correction in the
participant level, and its before/after QC figure in ``sub-XX/figures/``."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest

from samba_pipeline.interfaces.participant import OptionalDerivativesSink, PreprocessEphys


@pytest.fixture(scope="module")
def mr_demo(tmp_path_factory):
    from samba_pipeline.cli.demo import main

    root = tmp_path_factory.mktemp("mrdemo")
    assert main([str(root / "demo"), "--subjects", "1", "--minutes", "1", "--eeg-channels", "16",
                 "--mr-artifacts", "-q"]) == 0
    return root / "demo", root / "demo_groundtruth"


def _valid_svg(path) -> bool:
    root = ET.parse(path).getroot()
    return root.tag.endswith("svg") and len(list(root.iter())) > 50


def test_mr_demo_holds_gradient_and_pulse_artifacts_and_ecg(mr_demo):
    bids, truth = mr_demo
    channels = pd.read_csv(bids / "sub-01" / "eeg" / "sub-01_task-rest_channels.tsv", sep="\t")
    assert channels.set_index("name").loc["ECG", "type"] == "ECG"
    info = json.loads((truth / "sub-01" / "sub-01_task-rest_truth.json").read_text())
    assert info["mr_artifacts"] and info["ecg_channel"] == "ECG"
    npz = np.load(truth / "sub-01" / "sub-01_task-rest_truth.npz")
    rr = np.diff(npz["r_peak_samples"]) / info["eeg_sfreq"]
    assert 0.8 < np.median(rr) < 1.0  # ~67 bpm
    assert "uncorrected" in (bids / "README").read_text()


def test_preprocessing_corrects_and_draws_the_qc_figure(mr_demo, tmp_path):
    bids, _ = mr_demo
    vhdr = str(bids / "sub-01" / "eeg" / "sub-01_task-rest_eeg.vhdr")
    (tmp_path / "on").mkdir()
    res = PreprocessEphys(ephys_file=vhdr, settings={}, volume_trigger=["R128"]).run(
        cwd=str(tmp_path / "on"))
    report = json.loads(open(res.outputs.report_json).read())["mr_artifacts"]
    assert report["gradient"]["applied"] and report["bcg"]["applied"]
    assert report["gradient"]["variance_ratio_after"] < 0.05 < report["gradient"]["variance_ratio_before"]
    assert _valid_svg(res.outputs.mr_qc_figure)
    # each correction can be switched off; then there is no figure
    (tmp_path / "off").mkdir()
    res = PreprocessEphys(ephys_file=vhdr, volume_trigger=["R128"],
                          settings={"gradient_correction": False, "bcg_correction": False}).run(
        cwd=str(tmp_path / "off"))
    report = json.loads(open(res.outputs.report_json).read())["mr_artifacts"]
    assert report["gradient"]["reason"] == "gradient_correction = false"
    assert not report["bcg"]["applied"]
    assert not res.outputs.mr_qc_figure  # undefined
    sink = OptionalDerivativesSink(output_dir=str(tmp_path / "out"),
                                   entities={"subject": "01", "desc": "mrartifacts",
                                             "suffix": "eeg", "extension": ".svg"})
    sink.run(cwd=str(tmp_path / "off"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_participant_level_writes_the_mr_qc_figure(mr_demo, tmp_path):
    bids, truth = mr_demo
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "samba_pipeline.cli", str(bids), str(out), "participant",
         "--skip-bids-validation", "-w", str(tmp_path / "work"), "--nprocs", "2",
         "--config-file", str(truth / "samba-bids-demo.toml")],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figure = out / "sub-01" / "figures" / "sub-01_task-rest_desc-mrartifacts_eeg.svg"
    assert _valid_svg(figure)
    info = json.loads((truth / "sub-01" / "sub-01_task-rest_truth.json").read_text())
    align = json.loads((out / "sub-01" / "sub-01_task-rest_alignment.json").read_text())
    assert align["offset_s"] == pytest.approx(info["offset_s"], abs=1e-9)
    channels = pd.read_csv(out / "sub-01" / "eeg" / "sub-01_task-rest_desc-preproc_channels.tsv",
                           sep="\t")
    assert channels.loc[channels["status"] == "bad", "name"].tolist() == info["bad_channels"]
    series = pd.read_csv(out / "sub-01" / "eeg" / "sub-01_task-rest_desc-preproc_timeseries.tsv.gz",
                         sep="\t")
    # EEG-sized (tens of µV; the gradient artifact alone has ~1000 µV peaks)
    assert "ECG" not in series.columns and np.median(series.std()) < 40e-6
