"""MEG: the demo's FIF recording (mne-bids), MEG preprocessing and source space, end to end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mne
import numpy as np
import pandas as pd
import pytest

from samba_pipeline.align import to_sample
from samba_pipeline.ephys.preprocess import EphysSettings, detect_bad_channels, preprocess_raw
from samba_pipeline.ephys.read import find_ephys_files, read_ephys
from samba_pipeline.errors import SambaInputError

TR = 2.0


@pytest.fixture(scope="module")
def meg_demo(tmp_path_factory):
    """One subject: MEG in ses-meg, fMRI in ses-mri, 60 s runs.

    (The folder is not called ``meg``: pybids would read a dataset root named like a data type
    as the data type of every file in it.)
    """
    from samba_pipeline.simulate import generate_demo_dataset

    bids, truth = generate_demo_dataset(tmp_path_factory.mktemp("megdemo") / "demo", subjects=1,
                                        minutes=1.0, tr=TR, meg=True, non_simultaneous=True)
    return bids, truth


@pytest.fixture(scope="module")
def meg_raw(meg_demo):
    bids, _ = meg_demo
    return read_ephys(find_ephys_files(bids, "01")[0])


def test_meg_demo_is_a_fif_recording_mne_bids_reads(meg_demo, meg_raw):
    bids, truth = meg_demo
    raw = meg_raw
    assert raw.filenames[0].name == "sub-01_ses-meg_task-movie_meg.fif"
    assert raw.get_channel_types().count("mag") == 102
    assert raw.get_channel_types().count("grad") == 204
    coils = {ch["coil_type"] for ch in raw.info["chs"]}
    assert coils == {mne.io.constants.FIFF.FIFFV_COIL_VV_MAG_T3,
                     mne.io.constants.FIFF.FIFFV_COIL_VV_PLANAR_T1}
    assert raw.info["dev_head_t"] is not None and len(raw.info["dig"]) > 10
    channels = pd.read_csv(bids / "sub-01" / "ses-meg" / "meg" /
                           "sub-01_ses-meg_task-movie_channels.tsv", sep="\t")
    assert set(channels["type"]) == {"MEGMAG", "MEGGRADPLANAR"}
    events = pd.read_csv(bids / "sub-01" / "ses-meg" / "meg" /
                         "sub-01_ses-meg_task-movie_events.tsv", sep="\t")
    assert list(events["trial_type"].unique()) == ["movie_segment"] and "stim_file" in events
    # physical scale: ~200 fT of brain signal on the magnetometers, gradiometers in T/m
    data = raw.get_data()
    mag = np.median(data[mne.pick_types(raw.info, meg="mag")].std(1))
    grad = np.median(data[mne.pick_types(raw.info, meg="grad")].std(1))
    assert 1e-13 < mag < 1e-12 and 1e-12 < grad < 1e-10
    info = json.loads((truth / "sub-01" / "sub-01_task-movie_truth.json").read_text())
    assert info["modality"] == "meg" and info["files"]["meg"].endswith("_meg.fif")


def test_generator_lead_field_is_mne_sphere_forward(meg_demo, meg_raw):
    """The demo's gain is MNE's sphere-model forward of its dipoles, recomputed here from the
    sensor definitions read back from the FIF (coil types, positions, dev_head_t), and radial
    dipoles give no field outside a sphere."""
    _, truth = meg_demo
    npz = np.load(truth / "sub-01" / "sub-01_task-movie_truth.npz")
    sim = json.loads((truth / "simulation.json").read_text())
    r0 = np.asarray(sim["head_model"]["r0_m"])
    info = mne.pick_info(meg_raw.info, mne.pick_types(meg_raw.info, meg=True))
    rr, ori, parcel = npz["dipole_pos"], npz["dipole_ori"], npz["dipole_parcel"]
    radial = (rr - r0) / np.linalg.norm(rr - r0, axis=1, keepdims=True)
    src = mne.setup_volume_source_space(pos={"rr": rr, "nn": ori}, verbose="error")
    sphere = mne.make_sphere_model(r0=r0, head_radius=None, verbose="error")
    fwd = mne.make_forward_solution(info, None, src, sphere, meg=True, eeg=False, mindist=0.0,
                                    verbose="error")
    g = fwd["sol"]["data"].reshape(len(info["ch_names"]), len(rr), 3)
    fixed = np.einsum("csk,sk->cs", g, ori)
    gain = np.stack([fixed[:, parcel == p].mean(1) for p in range(npz["gain"].shape[1])], 1)
    # FIF stores the sensor geometry in float32: agreement to ~1e-4
    np.testing.assert_allclose(gain, npz["gain"], rtol=1e-3, atol=1e-6 * np.abs(gain).max())
    g_radial = np.einsum("csk,sk->cs", g, radial)
    assert np.abs(g_radial).max() < 1e-6 * np.abs(g).max()


def test_meg_preprocessing_handles_mags_and_grads_as_mne_does(meg_raw):
    raw = meg_raw.copy().crop(0, 30)
    mags = mne.pick_types(raw.info, meg="mag")
    grads = mne.pick_types(raw.info, meg="grad")
    raw._data[grads[7]] *= 1e-4  # a dead gradiometer
    raw._data[mags[11]] += np.random.default_rng(0).normal(scale=3e-12, size=raw.n_times)
    found = detect_bad_channels(raw, EphysSettings(ch_types=("meg",)))
    assert raw.ch_names[grads[7]] in found["flat"]
    assert raw.ch_names[mags[11]] in found["noisy"]
    # per-type statistics: the gradiometers' T/m values never count against the magnetometers'
    assert set(found["scores"].loc[found["scores"]["flat"]].ch_type) == {"grad"}
    clean, report = preprocess_raw(raw, EphysSettings(ch_types=("meg",)))
    assert report["n_channels"] == 306 and report["reference"] is None
    assert set(report["interpolated"]) == {raw.ch_names[grads[7]], raw.ch_names[mags[11]]}
    assert clean.info["sfreq"] == 200.0 and "eeg" not in clean
    with pytest.raises(SambaInputError, match="no channels of type"):
        preprocess_raw(raw, EphysSettings(ch_types=("eeg",)))


def test_broken_fif_is_named(meg_demo, tmp_path):
    bids = tmp_path / "bids"
    shutil.copytree(meg_demo[0], bids, ignore=shutil.ignore_patterns("derivatives"))
    fif = bids / "sub-01" / "ses-meg" / "meg" / "sub-01_ses-meg_task-movie_meg.fif"
    fif.write_bytes(fif.read_bytes()[:20000])
    with pytest.raises(SambaInputError, match="sub-01_ses-meg_task-movie_meg.fif"):
        read_ephys(find_ephys_files(bids, "01")[0])


@pytest.mark.slow
def test_participant_level_runs_on_meg_in_source_space(meg_demo, tmp_path):
    """MEG session + fMRI session of one subject: stimulus-locked alignment, MEG source space
    on the template head (fsaverage single-shell BEM), parcel series that follow the simulated
    sources."""
    bids, truth = meg_demo
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "samba_pipeline.cli", str(bids), str(out), "participant",
         "--pairing", "same-subject", "--ephys-space", "source", "--skip-bids-validation",
         "-w", str(tmp_path / "work"), "--nprocs", "2",
         "--config-file", str(truth / "samba-bids-demo.toml")],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ses = out / "sub-01" / "ses-mri"
    align = json.loads((ses / "sub-01_ses-mri_task-movie_alignment.json").read_text())
    info = json.loads((truth / "sub-01" / "sub-01_task-movie_truth.json").read_text())
    sfreq = align["ephys_sfreq"]
    assert abs(align["ephys_start_sample"]
               - to_sample(info["offset_s"] + align["first_volume"] * TR, sfreq)) <= 1
    series = next((ses / "meg").glob("*_desc-preproc_timeseries.tsv.gz"))
    meta = json.loads(Path(str(series).replace(".tsv.gz", ".json")).read_text())
    prep = meta["Preprocessing"]
    assert prep["ch_types"] == ["meg"] and prep["n_channels"] == 306
    assert prep["source_space"]["n_channels"] == 306 and prep["source_space"]["n_parcels"] == 20
    # head_model "auto": MEG gets the single-shell fsaverage BEM (the demo's data come from a
    # sphere), recorded in the sidecar; the demo's fiducials are the template's
    head = prep["source_space"]["head_model"]
    assert head["type"] == "bem" and head["n_layers"] == 1
    assert meta["HeadModel"].startswith("single-shell BEM")
    assert abs(prep["source_space"]["coregistration_scale"] - 1.0) < 1e-3
    # the parcel series follow the simulated sources of their own parcel
    est = pd.read_csv(series, sep="\t").to_numpy().T
    npz = np.load(truth / "sub-01" / "sub-01_task-movie_truth.npz")
    src = mne.filter.resample(npz["neural"], sfreq, float(npz["neural_sfreq"]), verbose=False)
    src = mne.filter.filter_data(src, sfreq, 0.5, 80.0, verbose=False)
    src = src[:, align["ephys_start_sample"]:align["ephys_stop_sample"]]
    r = np.abs(np.corrcoef(est, src)[:20, 20:])
    own, other = np.median(np.diag(r)), np.median(r[~np.eye(20, dtype=bool)])
    assert own > 0.3 and own > 4 * other
