"""Source-space parcel time series (samba_pipeline.ephys.source) on the demo's simulated EEG.

The demo's EEG comes from a 4-shell sphere with radial dipoles fitted to *its* electrode set;
the inverse uses a 3-shell sphere, a different source grid and max-power orientations, so these
tests do not commit the "inverse crime" of inverting the model that made the data.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mne
import nibabel as nb
import numpy as np
import pandas as pd
import pytest

from samba_pipeline.atlas import read_label_table
from samba_pipeline.ephys.preprocess import EphysSettings, preprocess_raw
from samba_pipeline.ephys.read import find_ephys_files, read_ephys
from samba_pipeline.ephys.source import (
    atlas_source_points,
    build_source_operator,
    inverse_kernel,
    make_noise_cov,
    parcel_operator,
    similarity_transform,
    source_parcel_timeseries,
)
from samba_pipeline.errors import SambaInputError, SambaUsageError


def _coarse_atlas(bids: Path) -> tuple[Path, pd.DataFrame]:
    tpl = bids / "derivatives" / "atlases" / "tpl-MNI152NLin2009cAsym"
    images = sorted(tpl.glob("*_dseg.nii.gz"), key=lambda p: int(p.name.split("scale-")[1].split("_")[0]))
    return images[0], read_label_table(Path(str(images[0]).replace(".nii.gz", ".tsv")))


@pytest.fixture(scope="module")
def demo_raw(demo_dataset):
    bids, truth = demo_dataset
    raw = read_ephys(find_ephys_files(bids, "01")[0])
    npz = np.load(truth / "sub-01" / "sub-01_task-rest_truth.npz")
    atlas, labels = _coarse_atlas(bids)
    return {"raw": raw, "gain": npz["gain"], "neural": npz["neural"],
            "sfreq": float(npz["neural_sfreq"]), "atlas": atlas, "labels": labels, "bids": bids}


def _neighbours(atlas: Path, labels: pd.DataFrame, k: int = 3) -> np.ndarray:
    pos, parcel, _ = atlas_source_points(atlas, labels, spacing_mm=1.0)
    centroids = np.array([pos[parcel == i].mean(0) for i in range(len(labels))])
    dist = np.linalg.norm(centroids[:, None] - centroids[None], axis=-1)
    return np.argsort(dist, axis=1)[:, 1:k + 1]


def test_single_active_parcel_recovered_better_than_its_neighbours(demo_raw):
    """One parcel active (plus weaker independent activity everywhere and sensor noise): its
    reconstructed time course must follow the truth more closely than its 3 nearest parcels'.

    Threshold: with 20 parcels, the active one wins for every parcel (measured: 20 of 20 with
    eLORETA/mean_flip); we require >= 18 of 20 (90 %) and a median correlation >= 0.7 so a
    sign or co-registration error (chance level: 1 in 4 wins) cannot pass.
    """
    raw, gain = demo_raw["raw"], demo_raw["gain"]
    rng = np.random.default_rng(0)
    n_ch, n_par = gain.shape
    sfreq, n = 200.0, 6000
    picks = mne.pick_types(raw.info, eeg=True)
    info = mne.pick_info(raw.info, picks)
    with info._unlock():
        info["sfreq"] = sfreq
    template = mne.io.RawArray(np.zeros((n_ch, 10)), info, verbose=False)
    template.set_eeg_reference("average", projection=False, verbose=False)
    operator, names, ch_names, report = build_source_operator(
        template, demo_raw["atlas"], demo_raw["labels"], method="eLORETA", extract="mean_flip",
        noise_cov="ad-hoc")
    assert names == demo_raw["labels"]["name"].tolist() and len(ch_names) == n_ch
    neighbours = _neighbours(demo_raw["atlas"], demo_raw["labels"])
    wins, own = 0, []
    scale = 15e-6 / np.median(np.abs(gain))
    for p in range(n_par):
        active = rng.standard_normal(n)
        background = 0.3 * rng.standard_normal((n_par, n))
        background[p] = active
        data = scale * gain @ background + 1e-6 * rng.standard_normal((n_ch, n))
        data -= data.mean(0, keepdims=True)  # average reference
        parcels = operator @ data
        corr = np.abs([np.corrcoef(parcels[q], active)[0, 1] for q in [p, *neighbours[p]]])
        wins += bool(corr[0] > corr[1:].max())
        own.append(corr[0])
    assert wins >= 18, (wins, np.round(own, 2))
    assert np.median(own) >= 0.7


def test_demo_recording_parcels_follow_ground_truth(demo_raw):
    """The default pipeline (preprocess, eLORETA, empirical covariance, pca) on the demo EEG:
    each parcel's course correlates with its own simulated source more than with any of its
    3 neighbours' for >= 75 % of parcels (measured 95 %; chance 25 %), median |r| >= 0.6
    (measured 0.79) in 1-40 Hz."""
    clean, _ = preprocess_raw(demo_raw["raw"], EphysSettings())
    settings = EphysSettings(space="source")
    out, report = source_parcel_timeseries(
        clean, demo_raw["atlas"], demo_raw["labels"], method=settings.inverse_method,
        extract=settings.source_extract, noise_cov=settings.noise_cov)
    assert out.ch_names == demo_raw["labels"]["name"].tolist()
    assert set(out.get_channel_types()) == {"misc"} and out.info["sfreq"] == 200.0
    assert report["coregistration_rms_mm"] < 1.0  # the demo's electrodes are the template's
    from scipy.signal import resample_poly

    truth = resample_poly(demo_raw["neural"], 200, int(demo_raw["sfreq"]), axis=1)
    n = min(truth.shape[1], out.n_times)
    y = mne.filter.filter_data(out.get_data()[:, :n], 200.0, 1.0, 40.0, verbose=False)
    t = mne.filter.filter_data(truth[:, :n], 200.0, 1.0, 40.0, verbose=False)
    k = len(y)
    corr = np.abs(np.corrcoef(np.vstack([y, t]))[:k, k:])
    neighbours = _neighbours(demo_raw["atlas"], demo_raw["labels"])
    wins = np.mean([corr[p, p] > corr[neighbours[p], p].max() for p in range(k)])
    assert wins >= 0.75, wins
    assert np.median(np.diag(corr)) >= 0.6


def test_kernel_equals_mne_apply_inverse_raw(demo_raw):
    """The precomputed linear kernel gives MNE's apply_inverse_raw numbers (all methods)."""
    from samba_pipeline.ephys import source as src_mod

    raw = demo_raw["raw"].copy().pick("eeg").crop(0, 5)
    raw.set_eeg_reference("average", projection=False, verbose=False)
    info = src_mod._inverse_info(raw.info)
    pos_mm, parcel, _ = atlas_source_points(demo_raw["atlas"], demo_raw["labels"], 16.0)
    trans, _ = src_mod.template_to_head(info)
    sphere, rr, _ = src_mod.make_head_model(info, mne.transforms.apply_trans(trans, pos_mm / 1000))
    nn = (rr - sphere["r0"]) / np.linalg.norm(rr - sphere["r0"], axis=1, keepdims=True)
    fwd = src_mod._forward(info, rr, nn, sphere, None)
    cov = make_noise_cov(raw, info, "ad-hoc")
    fwd_s = mne.convert_forward_solution(fwd, surf_ori=True, verbose="error")
    inv = mne.minimum_norm.make_inverse_operator(info, fwd_s, cov, loose=0.0, depth=0.8, fixed=True,
                                                 verbose="error")
    data_raw = mne.io.RawArray(raw.get_data(), info, verbose=False)
    for method in ("MNE", "dSPM", "eLORETA"):
        kernel = inverse_kernel(info, fwd, cov, method, 3.0, 0.8)
        stc = mne.minimum_norm.apply_inverse_raw(data_raw, inv, 1 / 9, method, pick_ori=None,
                                                 verbose="error")
        mine = kernel @ raw.get_data()
        assert np.allclose(mine, stc.data, rtol=1e-6, atol=1e-6 * np.abs(stc.data).max()), method


def test_pca_operator_equals_mne_pca_flip_formula():
    """pca rows give s0 * V0 / sqrt(n) of each parcel's source time courses (MNE's pca_flip)."""
    rng = np.random.default_rng(1)
    n_src, n_ch, n_t = 12, 8, 500
    kernel = rng.standard_normal((n_src, n_ch))
    parcel = np.repeat([0, 1, 2], [3, 4, 5])
    data = rng.standard_normal((n_ch, n_t))
    flip = np.ones(n_src)
    op = parcel_operator(kernel, parcel, 3, flip, "pca", data @ data.T / n_t)
    for p in range(3):
        src = kernel[parcel == p] @ data
        u, s, vt = np.linalg.svd(src, full_matrices=False)
        expected = s[0] * vt[0] / np.sqrt((parcel == p).sum())
        got = op[p] @ data
        assert np.allclose(np.abs(got), np.abs(expected), rtol=1e-8)
        mean = kernel[parcel == p].mean(0) @ data
        assert got @ mean >= 0  # signed to agree with the mean course


def test_similarity_transform_recovers_a_known_transform():
    rng = np.random.default_rng(2)
    pts = rng.standard_normal((30, 3))
    rot = mne.transforms.rotation(0.1, -0.2, 0.3)[:3, :3]
    true = np.eye(4)
    true[:3, :3] = 1.1 * rot
    true[:3, 3] = [0.01, -0.02, 0.03]
    fit = similarity_transform(pts, mne.transforms.apply_trans(true, pts))
    assert np.allclose(fit, true, atol=1e-10)


# -- bad input ------------------------------------------------------------------------------


def test_atlas_parcel_without_voxels_names_the_image(demo_raw, tmp_path):
    img = nb.load(str(demo_raw["atlas"]))
    data = np.asanyarray(img.dataobj).copy()
    data[data == 3] = 0
    path = tmp_path / "atlas_dseg.nii.gz"
    nb.save(nb.Nifti1Image(data, img.affine, img.header), path)
    with pytest.raises(SambaInputError, match="no voxel in the EEG/MEG atlas") as err:
        atlas_source_points(path, demo_raw["labels"])
    assert str(path) in str(err.value)
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(SambaInputError, match="cannot read the EEG/MEG atlas image"):
        atlas_source_points(tmp_path / "bad.nii.gz", demo_raw["labels"])


def test_channels_without_positions_or_standard_names(demo_raw):
    info = mne.create_info([f"X{i}" for i in range(10)], 200.0, "eeg")
    raw = mne.io.RawArray(np.random.default_rng(0).standard_normal((10, 4000)) * 1e-6, info,
                          verbose=False)
    with pytest.raises(SambaInputError, match="no position and no 10-05 name"):
        build_source_operator(raw, demo_raw["atlas"], demo_raw["labels"])


def test_noise_cov_baseline_outside_recording(demo_raw):
    raw = demo_raw["raw"].copy().pick("eeg").crop(0, 20)
    raw.set_eeg_reference("average", projection=False, verbose=False)
    with pytest.raises(SambaInputError, match="noise_cov baseline"):
        build_source_operator(raw, demo_raw["atlas"], demo_raw["labels"], noise_cov=(0.0, 60.0))


@pytest.mark.parametrize("options, message", [
    ({"space": "surface"}, "space="),
    ({"inverse_method": "beamformer"}, "inverse_method="),
    ({"source_extract": "max"}, "source_extract="),
    ({"noise_cov": "emptyroom"}, "noise_cov="),
    ({"noise_cov": [30, 10]}, "noise_cov="),
    ({"depth": 2}, "depth="),
    ({"source_spacing": 0}, "source_spacing="),
])
def test_bad_source_settings(options, message):
    with pytest.raises(SambaUsageError, match=message):
        EphysSettings.from_dict(options)


def test_interface_without_atlas_is_a_usage_error(demo_raw, tmp_path):
    from samba_pipeline.interfaces.participant import PreprocessEphys

    node = PreprocessEphys(ephys_file=str(demo_raw["raw"].filenames[0]).replace(".eeg", ".vhdr"),
                           settings={"space": "source"})
    with pytest.raises(SambaUsageError, match="source space needs the EEG/MEG atlas"):
        node.run(cwd=str(tmp_path))


# -- the pipeline ---------------------------------------------------------------------------


@pytest.mark.slow
def test_participant_level_source_space_loads_for_training(demo_dataset, tmp_path):
    """`--ephys-space source`: parcel-named EEG series under space-/atlas- entities whose columns
    are the region map's, loadable by training.load_runs with the region map applied."""
    from samba_pipeline.training import load_runs
    from samba_pipeline.training.data import region_map_for

    bids, truth = demo_dataset
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "samba_pipeline.cli", str(bids), str(out), "participant",
         "--participant-label", "01", "-w", str(tmp_path / "work"), "--skip-bids-validation",
         "--config-file", str(truth / "samba-bids-demo.toml"), "--ephys-space", "source",
         "--inverse-method", "dSPM", "--source-extract", "mean_flip"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    eeg = sorted((out / "sub-01" / "eeg").glob("*timeseries.tsv.gz"))
    assert [p.name for p in eeg] == [
        "sub-01_task-rest_space-MNI152NLin2009cAsym_atlas-DemoNested_scale-20_desc-preproc_"
        "timeseries.tsv.gz"]
    meta = json.loads(eeg[0].with_name(eeg[0].name.replace(".tsv.gz", ".json")).read_text())
    assert meta["Space"] == "source" and meta["Preprocessing"]["source_space"]["inverse_method"] == "dSPM"
    runs = load_runs(out)
    rmap = region_map_for(runs)
    assert runs[0].ephys_space == "source" and runs[0].ephys_graph is not None
    assert rmap is not None and rmap.shape == (len(runs[0].fmri_names), 20)
