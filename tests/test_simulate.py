"""Tests of the offline demo dataset generator (samba_pipeline.simulate, samba-bids-demo).

Most tests share the session fixture ``demo_dataset`` (2 subjects, 3 minutes: 90 volumes at
TR 2 s, 32 EEG channels at 500 Hz, 4 mm grid, DemoNested 20/50 parcels).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import signal

from samba_pipeline.cli.demo import main as demo_main
from samba_pipeline.errors import SambaUsageError
from samba_pipeline.simulate import generate_demo_dataset
from samba_pipeline.simulate.bold import cosine_basis, double_gamma_hrf

SUBJECTS = ("01", "02")
SPACE = "MNI152NLin2009cAsym"
ATLAS_DIR = Path("derivatives") / "atlases" / f"tpl-{SPACE}"
COARSE = ATLAS_DIR / f"tpl-{SPACE}_res-04_atlas-DemoNested_scale-20_dseg"
FINE = ATLAS_DIR / f"tpl-{SPACE}_res-04_atlas-DemoNested_scale-50_dseg"


def _truth(truth_dir: Path, sub: str):
    stem = truth_dir / f"sub-{sub}" / f"sub-{sub}_task-rest_truth"
    meta = json.loads(stem.with_suffix(".json").read_text())
    with np.load(stem.with_suffix(".npz")) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return meta, arrays


def _preproc(bids_root: Path, sub: str) -> Path:
    return (
        bids_root / "derivatives" / "fmriprep" / f"sub-{sub}" / "func"
        / f"sub-{sub}_task-rest_space-{SPACE}_desc-preproc_bold.nii.gz"
    )


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Column-wise Pearson correlation of two (n_times, n) arrays."""
    a = (a - a.mean(0)) / a.std(0)
    b = (b - b.mean(0)) / b.std(0)
    return (a * b).mean(0)


# --- layout and contents ---------------------------------------------------------------------


def test_layout_and_truth_contract(demo_dataset):
    bids_root, truth_dir = demo_dataset
    assert truth_dir == bids_root.parent / f"{bids_root.name}_groundtruth"
    for name in ("dataset_description.json", "participants.tsv", "participants.json", "README", "CHANGES"):
        assert (bids_root / name).is_file(), name
    desc = json.loads((bids_root / "dataset_description.json").read_text())
    assert desc["BIDSVersion"] == "1.10.0" and desc["DatasetType"] == "raw" and desc["License"] == "CC0"
    fp_desc = json.loads((bids_root / "derivatives/fmriprep/dataset_description.json").read_text())
    assert fp_desc["DatasetType"] == "derivative"
    assert fp_desc["GeneratedBy"][0]["Name"] == "samba-bids-demo (fMRIPrep-like)"
    at_desc = json.loads((bids_root / "derivatives/atlases/dataset_description.json").read_text())
    assert at_desc["DatasetType"] == "derivative"
    assert (bids_root / "derivatives/atlases/atlas-DemoNested_description.json").is_file()
    assert (truth_dir / "simulation.json").is_file()
    sim = json.loads((truth_dir / "simulation.json").read_text())
    assert sim["settings"]["seed"] == 42 and sim["settings"]["minutes"] == 3.0
    assert not any("groundtruth" in str(p) or "truth" in p.name for p in bids_root.rglob("*"))
    participants = pd.read_csv(bids_root / "participants.tsv", sep="\t")
    assert list(participants["participant_id"]) == ["sub-01", "sub-02"]

    for sub in SUBJECTS:
        eeg = bids_root / f"sub-{sub}" / "eeg"
        for suffix in ("eeg.vhdr", "eeg.vmrk", "eeg.eeg", "eeg.json", "channels.tsv", "events.tsv",
                       "events.json"):
            assert (eeg / f"sub-{sub}_task-rest_{suffix}").is_file(), suffix
        func = bids_root / f"sub-{sub}" / "func"
        assert (func / f"sub-{sub}_task-rest_bold.nii.gz").is_file()
        bold_json = json.loads((func / f"sub-{sub}_task-rest_bold.json").read_text())
        assert bold_json["RepetitionTime"] == 2.0 and bold_json["TaskName"] == "rest"
        fdir = _preproc(bids_root, sub).parent
        assert (fdir / f"sub-{sub}_task-rest_space-{SPACE}_desc-brain_mask.nii.gz").is_file()
        assert json.loads(_preproc(bids_root, sub).with_name(
            _preproc(bids_root, sub).name.replace(".nii.gz", ".json")).read_text())["RepetitionTime"] == 2.0

        meta, tz = _truth(truth_dir, sub)
        n_vol, n_fine, n_coarse, n_bands = 90, 50, 20, 3
        for key in ("offset_s", "tr", "n_volumes", "eeg_sfreq", "bad_channels", "line_freq"):
            assert key in meta, key
        assert meta["n_volumes"] == n_vol and meta["tr"] == 2.0 and meta["line_freq"] == 50.0
        assert tz["neural"].shape[0] == n_coarse and float(tz["neural_sfreq"]) == 500.0
        assert tz["band_power"].shape == (n_coarse, n_bands, n_vol)
        assert tz["bands"].shape == (n_bands, 2) and tz["coupling"].shape == (n_bands,)
        assert tz["bold_clean"].shape == (n_vol, n_fine)
        np.testing.assert_allclose(tz["bold_clean"].mean(0), 0.0, atol=1e-10)
        for key in ("hrf_peak_s", "hrf_undershoot_s", "hrf_dispersion", "fine_to_coarse"):
            assert tz[key].shape == (n_fine,), key
        assert np.all((tz["hrf_peak_s"] >= 4.0) & (tz["hrf_peak_s"] <= 7.0))
        assert tz["volume_onsets_s"].shape == (n_vol,) and tz["motion"].shape == (n_vol, 6)
        np.testing.assert_allclose(tz["volume_onsets_s"], meta["offset_s"] + 2.0 * np.arange(n_vol))
        assert np.all(tz["band_power"] > 0)
        # the neural sources are in A·m: parcel dipole moments of tens to hundreds of nA·m
        assert 1e-9 < np.median(tz["neural"].std(1)) < 1e-6


def test_atlas_pair_is_nested(demo_dataset):
    bids_root, _ = demo_dataset
    coarse_img = nib.load(bids_root / f"{COARSE}.nii.gz")
    fine_img = nib.load(bids_root / f"{FINE}.nii.gz")
    assert coarse_img.get_data_dtype() == np.int16 and fine_img.get_data_dtype() == np.int16
    assert coarse_img.shape == fine_img.shape == (50, 59, 48)
    np.testing.assert_allclose(coarse_img.affine, np.diag([4.0, 4.0, 4.0, 1.0]) + np.array(
        [[0, 0, 0, -98], [0, 0, 0, -134], [0, 0, 0, -72], [0, 0, 0, 0]]))
    coarse = np.asarray(coarse_img.dataobj)
    fine = np.asarray(fine_img.dataobj)
    ct = pd.read_csv(bids_root / f"{COARSE}.tsv", sep="\t")
    ft = pd.read_csv(bids_root / f"{FINE}.tsv", sep="\t")
    for table, n in ((ct, 20), (ft, 50)):
        assert list(table.columns) == ["index", "name", "network", "hemisphere", "region"]
        assert list(table["index"]) == list(range(1, n + 1))
        assert table["name"].str.match(r"^DemoNetworks_(LH|RH)_[A-Za-z]+_\d+$").all()
        assert (table["region"] == table["hemisphere"] + "_" + table["network"]).all()
        assert not table["name"].str.contains("Schaefer").any()
    assert set(np.unique(coarse)) == set(range(21)) and set(np.unique(fine)) == set(range(51))
    assert np.array_equal(fine > 0, coarse > 0)
    # every network in every hemisphere
    for hemi in ("LH", "RH"):
        assert set(ct.loc[ct["hemisphere"] == hemi, "network"]) == {
            "Vis", "SomMot", "DorsAttn", "SalVentAttn", "Limbic", "Cont", "Default"}
    # nesting: each fine parcel inside exactly one coarse parcel with the same region
    _, tz = _truth(demo_dataset[1], "01")
    for f in range(1, 51):
        parents = np.unique(coarse[fine == f])
        assert len(parents) == 1
        assert parents[0] - 1 == tz["fine_to_coarse"][f - 1]
        assert ft.loc[f - 1, "region"] == ct.loc[parents[0] - 1, "region"]
    # hemispheres follow the sign of MNI x
    ijk = np.argwhere(coarse > 0)
    x = nib.affines.apply_affine(coarse_img.affine, ijk)[:, 0]
    hemi = ct.set_index("index").loc[coarse[tuple(ijk.T)], "hemisphere"].to_numpy()
    assert np.all((x < 0) == (hemi == "LH"))


# --- EEG -----------------------------------------------------------------------------------


@pytest.mark.parametrize("sub", SUBJECTS)
def test_eeg_reads_back_with_triggers(demo_dataset, sub):
    import mne
    import mne_bids

    bids_root, truth_dir = demo_dataset
    meta, tz = _truth(truth_dir, sub)
    bp = mne_bids.BIDSPath(subject=sub, task="rest", datatype="eeg", root=bids_root)
    raw = mne_bids.read_raw_bids(bp, verbose="error")
    assert raw.info["sfreq"] == 500.0
    assert len(raw.ch_names) == 32
    assert {"Fp1", "Fp2", "Cz", "Oz"} <= set(raw.ch_names)
    assert "FCz" not in raw.ch_names  # the recording reference
    assert raw.info["line_freq"] == 50.0
    assert raw.info["bads"] == []  # the bad channel is for the pipeline to find
    assert raw.n_times == tz["neural"].shape[1]

    onsets = raw.annotations.onset[raw.annotations.description == "R128"]
    assert len(onsets) == meta["n_volumes"] == 90
    np.testing.assert_allclose(np.diff(onsets), meta["tr"], atol=0.5 / raw.info["sfreq"])
    assert onsets[0] == pytest.approx(meta["offset_s"], abs=1e-9)
    # triggers sit exactly on samples, and the EEG outlasts the last volume
    samples = onsets * raw.info["sfreq"]
    np.testing.assert_allclose(samples, np.round(samples), atol=1e-6)
    assert raw.times[-1] > onsets[-1] + meta["tr"]
    # the BrainVision marker file carries Brain Products' volume marker
    vmrk = bp.fpath.with_suffix(".vmrk").read_text()
    assert vmrk.count("Response,R128,") == 90

    data = raw.get_data() * 1e6  # µV
    bad = meta["bad_channels"]
    assert len(bad) == 1 and bad[0] in raw.ch_names
    good = [i for i, c in enumerate(raw.ch_names) if c not in bad]
    filt = mne.filter.filter_data(data[good], raw.info["sfreq"], 1.0, 40.0, verbose="error")
    # realistic amplitude: tens of microvolts
    assert 5.0 < np.median(filt.std(1)) < 50.0
    ib = raw.ch_names.index(bad[0])
    if meta["bad_channel_kind"][bad[0]] == "flat":
        assert data[ib].std() < 1.0
    else:
        assert data[ib].std() > 3 * np.median(data[good].std(1))
    # blinks: frontal channels carry large, slow deflections
    fp1 = filt[[raw.ch_names[i] for i in good].index("Fp1")]
    assert np.ptp(fp1) > 100.0
    # line noise at 50 Hz stands out of the spectrum
    freqs, psd = signal.welch(data[good], fs=raw.info["sfreq"], nperseg=2000)
    p50 = np.median(psd[:, np.argmin(np.abs(freqs - 50.0))])
    p45 = np.median(psd[:, np.argmin(np.abs(freqs - 45.0))])
    assert p50 > 10 * p45


def test_eeg_is_lead_field_projection_of_sources(demo_dataset):
    """The EEG is gain @ neural + sensor-level terms that are small above 30 Hz off the line."""
    import mne
    import mne_bids

    bids_root, truth_dir = demo_dataset
    meta, tz = _truth(truth_dir, "01")
    raw = mne_bids.read_raw_bids(
        mne_bids.BIDSPath(subject="01", task="rest", datatype="eeg", root=bids_root), verbose="error"
    )
    good = [i for i, c in enumerate(raw.ch_names) if c not in meta["bad_channels"]]
    brain = (tz["gain"] @ tz["neural"])[good]
    data = raw.get_data()[good]
    band = {"sfreq": raw.info["sfreq"], "l_freq": 30.0, "h_freq": 45.0, "verbose": "error"}
    r = _corr(mne.filter.filter_data(data, **band).T, mne.filter.filter_data(brain, **band).T)
    # 30-45 Hz holds beta/gamma source power and only white sensor noise (1-2 µV broadband)
    assert np.median(r) > 0.8


# --- fMRI ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sub", SUBJECTS)
def test_bold_grid_and_tr(demo_dataset, sub):
    bids_root, _ = demo_dataset
    atlas = nib.load(bids_root / f"{FINE}.nii.gz")
    raw = nib.load(bids_root / f"sub-{sub}" / "func" / f"sub-{sub}_task-rest_bold.nii.gz")
    prep = nib.load(_preproc(bids_root, sub))
    mask = nib.load(_preproc(bids_root, sub).with_name(
        f"sub-{sub}_task-rest_space-{SPACE}_desc-brain_mask.nii.gz"))
    for img in (raw, prep):
        assert img.shape == (50, 59, 48, 90)
        assert img.header.get_zooms() == (4.0, 4.0, 4.0, 2.0)
        assert img.header.get_xyzt_units() == ("mm", "sec")
        np.testing.assert_allclose(img.affine, atlas.affine)
    assert mask.shape == (50, 59, 48)
    m = np.asarray(mask.dataobj).astype(bool)
    data = prep.get_fdata(dtype=np.float32)
    # gray matter around 1000, background low
    gm_mean = data[np.asarray(atlas.dataobj) > 0, 5:].mean()
    assert 800 < gm_mean < 1200
    assert data[~m, 5:].mean() < 50


@pytest.mark.parametrize("sub", SUBJECTS)
def test_nilearn_load_confounds(demo_dataset, sub):
    from nilearn.interfaces.fmriprep import load_confounds

    bids_root, truth_dir = demo_dataset
    meta, tz = _truth(truth_dir, sub)
    confounds, sample_mask = load_confounds(
        str(_preproc(bids_root, sub)),
        strategy=("motion", "high_pass", "compcor"),
        compcor="anat_combined",
        n_compcor=5,
    )
    assert len(confounds) == 90
    assert not confounds.isna().any().any()
    cols = set(confounds.columns)
    assert {f"a_comp_cor_{i:02d}" for i in range(5)} <= cols
    assert {"trans_x", "rot_z", "trans_x_derivative1_power2"} <= cols
    assert any(c.startswith("cosine") for c in cols)
    # the non-steady-state volumes are dropped through the sample mask
    nss = meta["non_steady_state_volumes"]
    assert nss == 2
    np.testing.assert_array_equal(sample_mask, np.arange(nss, 90))
    table = pd.read_csv(
        _preproc(bids_root, sub).parent / f"sub-{sub}_task-rest_desc-confounds_timeseries.tsv",
        sep="\t",
    )
    for col in ("framewise_displacement", "global_signal", "csf", "white_matter",
                "c_comp_cor_04", "w_comp_cor_04", "non_steady_state_outlier01", "std_dvars"):
        assert col in table.columns, col
    assert np.isnan(table["framewise_displacement"].iloc[0])
    np.testing.assert_allclose(
        table[["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]].to_numpy(), tz["motion"],
        atol=1e-5,
    )


def test_neurovascular_coupling_is_real(demo_dataset):
    """Band power of each fine parcel's coarse source, through an HRF, predicts its clean BOLD."""
    from nilearn.glm.first_level import spm_hrf

    _, truth_dir = demo_dataset
    for sub in SUBJECTS:
        meta, tz = _truth(truth_dir, sub)
        tr = meta["tr"]
        f2c = tz["fine_to_coarse"]
        logp = np.log(tz["band_power"])  # (coarse, band, volume)
        z = (logp - logp.mean(-1, keepdims=True)) / logp.std(-1, keepdims=True)
        combined = np.einsum("b,cbt->ct", tz["coupling"], z)[f2c].T  # (volume, fine)
        gamma = z[:, 2, :][f2c].T
        bold = tz["bold_clean"]

        # 1) with each parcel's own HRF, the TR-sampled model reproduces bold_clean almost
        #    exactly: only the TR sampling of the 0.1 s envelope grid differs (envelope power
        #    lies below ~0.17 Hz, under the 0.25 Hz Nyquist frequency), so r > 0.9.
        t = np.arange(0.0, 32.0, tr)
        own = double_gamma_hrf(t, tz["hrf_peak_s"], tz["hrf_undershoot_s"], tz["hrf_dispersion"])
        pred_own = np.stack(
            [signal.lfilter(own[f], 1.0, combined[:, f]) for f in range(bold.shape[1])], 1
        )
        assert np.median(_corr(pred_own[10:], bold[10:])) > 0.9

        # 2) with the canonical SPM HRF (time to peak ~5 s) the parcels' HRFs (peaks 4-7 s)
        #    are mismatched by up to 2 s; for envelope periods of 6-40 s this costs a part of
        #    the correlation, which stays well above chance (|r| < 0.25 for 90 volumes).
        #    Measured medians over seeds 1-6 and the default seed: 0.85-0.91 (coupled
        #    combination) and 0.76-0.81 (gamma alone); the thresholds leave room for other seeds.
        h = spm_hrf(tr, oversampling=1)
        pred = signal.lfilter(h, 1.0, combined, axis=0)
        assert np.median(_corr(pred[10:], bold[10:])) > 0.6
        pred_gamma = signal.lfilter(h, 1.0, gamma, axis=0)
        # gamma carries 1/(1 + 0.5^2 + 0.15^2) ~ 80 % of the drive's variance: r ~ 0.9 x 0.85
        assert np.median(_corr(pred_gamma[10:], bold[10:])) > 0.5


def test_bold_voxels_carry_the_clean_signal(demo_dataset):
    """Parcel means of the preprocessed BOLD follow bold_clean, at a realistic SNR."""
    bids_root, truth_dir = demo_dataset
    fine = np.asarray(nib.load(bids_root / f"{FINE}.nii.gz").dataobj)
    labels = fine[fine > 0].astype(int) - 1
    counts = np.bincount(labels, minlength=50)
    for sub in SUBJECTS:
        meta, tz = _truth(truth_dir, sub)
        nss = meta["non_steady_state_volumes"]
        data = nib.load(_preproc(bids_root, sub)).get_fdata(dtype=np.float32)[fine > 0]  # (vox, T)
        means = np.stack([np.bincount(labels, weights=data[:, k], minlength=50) / counts
                          for k in range(data.shape[1])])  # (T, fine)
        y = means[nss:]
        y = 100.0 * (y / y.mean(0) - 1.0)  # percent signal change
        basis = np.column_stack([np.ones(len(y)), cosine_basis(len(y), meta["tr"])])
        y -= basis @ np.linalg.lstsq(basis, y, rcond=None)[0]  # 128 s high-pass
        r = _corr(y, tz["bold_clean"][nss:])
        # Signal: 0.6-1.4 % per parcel. Noise in a parcel mean (a few hundred voxels): thermal
        # 1 %/sqrt(n) ~ 0.07 %, four smooth physiological components (~0.2 % each in gray
        # matter), 0.25 % global signal, residual motion and spin-history dips at motion
        # events: noise/signal std ~ 0.5, so r ~ 1/sqrt(1 + 0.25) ~ 0.9 (measured medians
        # 0.83-0.90 and minima 0.54-0.75 over seeds 1-6). Threshold 0.7 on the median, and
        # every parcel clearly positive (> 0.4).
        assert np.median(r) > 0.7
        assert r.min() > 0.4
        # and the first volumes show the non-steady-state transient
        gm = means[:, :].mean(1)
        assert gm[0] > 1.3 * np.median(gm[nss:])


# --- determinism, validator, CLI ----------------------------------------------------------


def test_same_seed_same_files(tmp_path):
    kwargs = {"subjects": 1, "minutes": 1.0, "seed": 7, "coarse_parcels": 14, "fine_parcels": 20}
    a_root, a_truth = generate_demo_dataset(tmp_path / "a" / "demo", **kwargs)
    b_root, b_truth = generate_demo_dataset(tmp_path / "b" / "demo", **kwargs)
    ha, hb = _hashes(a_root), _hashes(b_root)
    assert ha.keys() == hb.keys() and ha == hb
    assert _hashes(a_truth) == _hashes(b_truth)
    _, ta = _truth(a_truth, "01")
    _, tb = _truth(b_truth, "01")
    for key in ta:
        np.testing.assert_array_equal(ta[key], tb[key])
    # and another seed gives other data
    _c_root, c_truth = generate_demo_dataset(tmp_path / "c" / "demo", **{**kwargs, "seed": 8})
    _, tc = _truth(c_truth, "01")
    assert not np.array_equal(ta["bold_clean"], tc["bold_clean"])


def _validator() -> str | None:
    local = Path(sys.executable).with_name("bids-validator-deno")
    return str(local) if local.exists() else shutil.which("bids-validator-deno")


def test_bids_validator_finds_no_errors(demo_dataset):
    exe = _validator()
    if exe is None:
        pytest.skip("bids-validator-deno is not installed (pip install bids-validator-deno)")
    bids_root, _ = demo_dataset
    proc = subprocess.run(
        [exe, "--format", "json", str(bids_root)], check=False, capture_output=True, text=True, timeout=300
    )
    assert proc.stdout.strip(), proc.stderr
    report = json.loads(proc.stdout)
    errors = [i for i in report["issues"]["issues"] if i.get("severity") == "error"]
    assert errors == [], json.dumps(errors[:5], indent=1)


def test_cli_refuses_non_empty_outdir(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert demo_main([str(out)]) == 73
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not empty" in err
    # --overwrite does not delete a folder that is not a demo dataset
    assert demo_main([str(out), "--overwrite"]) == 73
    assert (out / "keep.txt").read_text() == "precious"
    assert not (tmp_path / "busy_groundtruth").exists() or not any((tmp_path / "busy_groundtruth").iterdir())


def test_cli_usage_errors(tmp_path):
    assert demo_main([]) == 2
    assert demo_main([str(tmp_path / "x"), "--subjects", "zero"]) == 2
    assert demo_main([str(tmp_path / "x"), "--minutes", "-1"]) == 2
    assert demo_main([str(tmp_path / "x"), "--coarse-parcels", "10"]) == 64
    with pytest.raises(SambaUsageError):
        generate_demo_dataset(tmp_path / "y", fine_parcels=10)
    with pytest.raises(SambaUsageError):
        generate_demo_dataset(tmp_path / "z", eeg_channels=200)


def test_cli_writes_and_overwrites(tmp_path):
    out = tmp_path / "small"
    args = [str(out), "--subjects", "1", "--minutes", "1", "--coarse-parcels", "14",
            "--fine-parcels", "18", "--eeg-channels", "16", "--eeg-sfreq", "250", "--tr", "1.5",
            "--truth-dir", str(tmp_path / "truth"), "-q"]
    assert demo_main(args) == 0
    meta, tz = _truth(tmp_path / "truth", "01")
    assert meta["n_volumes"] == 40 and meta["tr"] == 1.5 and meta["eeg_sfreq"] == 250.0
    assert len(meta["eeg_channels"]) == 16
    assert tz["bold_clean"].shape == (40, 18)
    assert (out / ATLAS_DIR / f"tpl-{SPACE}_res-04_atlas-DemoNested_scale-14_dseg.nii.gz").is_file()
    assert demo_main(args) == 73
    assert demo_main(args + ["--overwrite"]) == 0
