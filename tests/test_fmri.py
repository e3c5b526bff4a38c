"""Tests of samba_pipeline.fmri.confounds and samba_pipeline.fmri.parcellate."""

from __future__ import annotations

import json
import logging

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from samba_pipeline.errors import SambaInputError, SambaMissingInputError
from samba_pipeline.fmri.confounds import select_confounds
from samba_pipeline.fmri.parcellate import parcellate_bold, read_repetition_time

N_VOLS = 40
TR = 2.0
MOTION = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
TISSUE = ["global_signal", "csf", "white_matter"]
SUFFIXES = ["", "_derivative1", "_power2", "_derivative1_power2"]
BOLD_NAME = "sub-01_task-rest_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz"
CONF_NAME = "sub-01_task-rest_desc-confounds_timeseries.tsv"


# --------------------------------------------------------------------------------------------
# synthetic fMRIPrep derivatives


def _confounds_frame(rng, n=N_VOLS, fd=None):
    cols = {}
    for base in MOTION + TISSUE:
        x = rng.normal(size=n).cumsum()
        d = np.r_[np.nan, np.diff(x)]
        cols[base] = x
        cols[f"{base}_derivative1"] = d
        cols[f"{base}_power2"] = x**2
        cols[f"{base}_derivative1_power2"] = d**2
    cols["csf_wm"] = rng.normal(size=n)
    cols["framewise_displacement"] = (
        np.r_[np.nan, np.abs(rng.normal(0.2, 0.1, n - 1))] if fd is None else fd
    )
    cols["rmsd"] = np.r_[np.nan, rng.random(n - 1)]
    cols["dvars"] = np.r_[np.nan, rng.random(n - 1)]
    cols["std_dvars"] = np.r_[np.nan, rng.random(n - 1)]
    # fMRIPrep numbers aCompCor components across masks: CSF, WM, then combined.
    for i in range(12):
        cols[f"a_comp_cor_{i:02d}"] = rng.normal(size=n)
    for i in range(3):
        cols[f"t_comp_cor_{i:02d}"] = rng.normal(size=n)
    for i in range(3):
        cols[f"cosine{i:02d}"] = np.cos(np.pi * (np.arange(n) + 0.5) * (i + 1) / n)
    nss = np.zeros(n)
    nss[0] = 1
    cols["non_steady_state_outlier00"] = nss  # fMRIPrep spelling
    cols["motion_outlier00"] = np.eye(n)[5]
    return pd.DataFrame(cols)


def _confounds_json():
    meta = {}
    masks = ["CSF"] * 3 + ["WM"] * 3 + ["combined"] * 6
    for i, mask in enumerate(masks):
        meta[f"a_comp_cor_{i:02d}"] = {"Method": "aCompCor", "Mask": mask, "Retained": True}
    for i in range(3):
        meta[f"t_comp_cor_{i:02d}"] = {"Method": "tCompCor", "Retained": True}
    return meta


def _write_tsv(frame, path):
    frame.to_csv(path, sep="\t", index=False, na_rep="n/a")


@pytest.fixture
def fmriprep_func(tmp_path):
    """A tiny fMRIPrep-like func folder: BOLD, sidecar, confounds TSV + JSON."""
    rng = np.random.default_rng(0)
    func = tmp_path / "derivatives" / "fmriprep" / "sub-01" / "func"
    func.mkdir(parents=True)
    bold = rng.normal(100, 1, size=(4, 4, 3, N_VOLS)).astype(np.float32)
    nib.save(nib.Nifti1Image(bold, np.diag([3.0, 3.0, 3.0, 1.0])), func / BOLD_NAME)
    (func / BOLD_NAME.replace(".nii.gz", ".json")).write_text(json.dumps({"RepetitionTime": TR}))
    frame = _confounds_frame(rng)
    _write_tsv(frame, func / CONF_NAME)
    (func / CONF_NAME.replace(".tsv", ".json")).write_text(json.dumps(_confounds_json()))
    return {"bold": func / BOLD_NAME, "confounds": func / CONF_NAME, "frame": frame, "dir": func}


# --------------------------------------------------------------------------------------------
# confounds


EXPECTED_N = {
    "24P": 24,
    "36P": 36,
    "acompcor": 24 + 5 + 3,
    "acompcor_gsr": 24 + 5 + 3 + 1,
    "gsr_only": 1,
    "none": 0,
}


@pytest.mark.parametrize("strategy", list(EXPECTED_N))
def test_strategies_nilearn_and_direct_agree(fmriprep_func, strategy):
    reg_n, qc_n = select_confounds(fmriprep_func["bold"], strategy)
    reg_d, qc_d = select_confounds(
        fmriprep_func["bold"], strategy, confounds_file=fmriprep_func["confounds"]
    )
    expected_loader = "none" if strategy == "none" else "nilearn"
    assert qc_n["loader"] == expected_loader
    assert qc_d["loader"] in ("direct", "none")
    nss = 0 if strategy == "none" else 1  # non-steady-state one-hot regressor
    assert reg_n.shape == (N_VOLS, EXPECTED_N[strategy] + nss)
    assert list(reg_n.columns) == list(reg_d.columns) == qc_n["columns"]
    np.testing.assert_allclose(reg_n.to_numpy(), reg_d.to_numpy(), atol=1e-10)
    assert qc_n["n_regressors"] == reg_n.shape[1]
    # never the scrubbing columns
    assert not any(c.startswith("motion_outlier") for c in reg_n.columns)


def test_column_content(fmriprep_func):
    frame = fmriprep_func["frame"]
    reg, _qc = select_confounds(fmriprep_func["bold"], "36P")
    expected = [f"{b}{s}" for s in SUFFIXES for b in MOTION] + [
        f"{b}{s}" for s in SUFFIXES for b in TISSUE
    ]
    assert list(reg.columns) == expected + ["non_steady_state_outlier00"]
    # first n/a row filled with the second row, then each column mean-centred
    ref = frame[expected].copy()
    ref.iloc[0] = ref.iloc[0].fillna(ref.iloc[1])
    ref = ref - ref.mean()
    np.testing.assert_allclose(reg[expected].to_numpy(), ref.to_numpy(), atol=1e-10)
    assert np.abs(reg[expected].mean().to_numpy()).max() < 1e-10
    # aCompCor: the first 5 components of the combined mask (06..10), plus all cosines
    reg, _ = select_confounds(fmriprep_func["bold"], "acompcor")
    comps = [c for c in reg.columns if c.startswith("a_comp_cor")]
    assert comps == [f"a_comp_cor_{i:02d}" for i in range(6, 11)]
    assert [c for c in reg.columns if c.startswith("cosine")] == [
        "cosine00",
        "cosine01",
        "cosine02",
    ]
    reg, _ = select_confounds(fmriprep_func["bold"], "gsr_only", non_steady_state="ignore")
    assert list(reg.columns) == ["global_signal"]


def test_motion_qc_reports_without_censoring(fmriprep_func, tmp_path):
    rng = np.random.default_rng(1)
    fd = np.full(N_VOLS, 0.1)
    fd[0] = np.nan
    fd[[3, 17, 30]] = [0.6, 0.51, 2.0]
    fd[8] = 0.5  # not above the threshold
    frame = _confounds_frame(rng, fd=fd)
    path = tmp_path / "conf.tsv"
    _write_tsv(frame, path)
    reg, qc = select_confounds(None, "24P", confounds_file=path, n_volumes=N_VOLS)
    assert len(reg) == N_VOLS  # no volume removed
    assert qc["high_motion_volumes"] == [3, 17, 30]
    assert qc["n_high_motion"] == 3
    assert qc["high_motion_fraction"] == pytest.approx(3 / N_VOLS)
    assert qc["mean_fd"] == pytest.approx(np.nansum(fd) / N_VOLS)
    assert qc["max_fd"] == pytest.approx(2.0)
    assert qc["non_steady_state_volumes"] == [0]
    json.dumps(qc)  # serialisable
    _, qc = select_confounds(None, "24P", confounds_file=path, n_volumes=N_VOLS, fd_threshold=1.0)
    assert qc["high_motion_volumes"] == [30]


def test_confound_errors(fmriprep_func, tmp_path):
    bold = fmriprep_func["bold"]
    with pytest.raises(SambaInputError, match="unknown confound strategy 'bogus'"):
        select_confounds(bold, "bogus")
    # confounds file missing (located from the BOLD name, and given explicitly)
    other = tmp_path / "sub-02_task-rest_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz"
    nib.save(nib.load(bold), other)
    with pytest.raises(SambaMissingInputError) as err:
        select_confounds(other)
    assert err.value.path.endswith("sub-02_task-rest_desc-confounds_timeseries.tsv")
    with pytest.raises(SambaMissingInputError, match="confounds file not found"):
        select_confounds(bold, confounds_file=tmp_path / "nope.tsv")
    # row count mismatch names the file and both counts
    short = tmp_path / "short_desc-confounds_timeseries.tsv"
    _write_tsv(fmriprep_func["frame"].iloc[:-2], short)
    with pytest.raises(SambaInputError, match=f"{N_VOLS - 2} rows .* {N_VOLS} volumes") as err:
        select_confounds(bold, "24P", confounds_file=short)
    assert err.value.path == str(short)
    # required columns missing are listed
    lacking = tmp_path / "lacking.tsv"
    _write_tsv(fmriprep_func["frame"].drop(columns=["csf", "rot_z_power2"]), lacking)
    with pytest.raises(SambaInputError, match="rot_z_power2, csf") as err:
        select_confounds(bold, "36P", confounds_file=lacking)
    assert err.value.path == str(lacking)
    # NaN beyond the first row
    holes = fmriprep_func["frame"].copy()
    holes.loc[7, "trans_y"] = np.nan
    holey = tmp_path / "holey.tsv"
    _write_tsv(holes, holey)
    with pytest.raises(SambaInputError, match="n/a value.*trans_y"):
        select_confounds(bold, "24P", confounds_file=holey)
    # aCompCor needs the JSON sidecar
    with pytest.raises(SambaMissingInputError, match="JSON sidecar") as err:
        select_confounds(bold, "acompcor", confounds_file=holey)
    assert err.value.path.endswith("holey.json")
    # but 24P does not, nor does it need the tissue columns
    no_csf = tmp_path / "no_csf.tsv"
    _write_tsv(fmriprep_func["frame"].drop(columns=["csf"]), no_csf)
    reg, _ = select_confounds(bold, "24P", confounds_file=no_csf)
    assert reg.shape == (N_VOLS, 25)


def test_confounds_nilearn_loader_requires_fmriprep_name(fmriprep_func, tmp_path):
    odd = tmp_path / "bold.nii.gz"
    nib.save(nib.load(fmriprep_func["bold"]), odd)
    with pytest.raises(SambaInputError, match="nilearn confound loader"):
        select_confounds(odd, "24P", confounds_file=fmriprep_func["confounds"], loader="nilearn")
    reg, qc = select_confounds(odd, "24P", confounds_file=fmriprep_func["confounds"])
    assert qc["loader"] == "direct" and reg.shape[1] == 25


# --------------------------------------------------------------------------------------------
# parcellation

AFF2 = np.array([[2.0, 0, 0, -10], [0, 2.0, 0, -12], [0, 0, 2.0, -8], [0, 0, 0, 1]])
SHAPE = (10, 12, 8)


def _atlas2():
    """Integer atlas on the 2 mm grid: 6 box parcels, labels 3, 5, 7, 11, 13, 17."""
    atlas = np.zeros(SHAPE, np.int16)
    ids = [3, 5, 7, 11, 13, 17]
    k = 0
    for xs in (slice(1, 5), slice(5, 9)):
        for ys in (slice(1, 4), slice(4, 8), slice(8, 11)):
            atlas[xs, ys, 1:7] = ids[k]
            k += 1
    return atlas


def _table(ids=(3, 5, 7, 11, 13, 17)):
    return pd.DataFrame({"index": list(ids), "name": [f"P{i}" for i in ids]})


@pytest.fixture
def bold4d():
    rng = np.random.default_rng(3)
    data = rng.normal(50, 2, size=SHAPE + (N_VOLS,)).astype(np.float32)
    return nib.Nifti1Image(data, AFF2)


def _plain(bold, atlas, table, **kw):
    kw.setdefault("tr", TR)
    return parcellate_bold(
        bold, atlas, table, high_pass=None, standardize=False, detrend=False, **kw
    )


def test_parcel_means_match_numpy(bold4d):
    atlas = _atlas2()
    data = bold4d.get_fdata()
    mask = np.ones(SHAPE, bool)
    mask[1:3, 1:4, 1:7] = False  # half of parcel 3 outside the brain mask
    table = _table().iloc[::-1].reset_index(drop=True)  # table order != label order
    ts, cov = _plain(
        bold4d,
        nib.Nifti1Image(atlas, AFF2),
        table,
        mask_img=nib.Nifti1Image(mask.astype(np.uint8), AFF2),
    )
    assert list(ts.columns) == table["name"].tolist()
    for idx, name in zip(table["index"], table["name"]):
        sel = (atlas == idx) & mask
        np.testing.assert_allclose(ts[name].to_numpy(), data[sel].mean(axis=0), rtol=1e-5)
    row = cov.set_index("name").loc["P3"]
    assert row["coverage"] == pytest.approx(0.5)
    assert row["n_voxels"] == 36 and row["n_voxels_atlas"] == 72


def test_atlas_resampled_to_bold_grid(bold4d):
    """A 1 mm atlas whose every other voxel sits on a BOLD voxel centre."""
    atlas2 = _atlas2()
    atlas1 = np.repeat(np.repeat(np.repeat(atlas2, 2, 0), 2, 1), 2, 2)
    aff1 = AFF2.copy()
    aff1[:3, :3] = np.eye(3)
    ts, cov = _plain(bold4d, nib.Nifti1Image(atlas1, aff1), _table())
    data = bold4d.get_fdata()
    for idx in (3, 5, 7, 11, 13, 17):
        np.testing.assert_allclose(ts[f"P{idx}"], data[atlas2 == idx].mean(axis=0), rtol=1e-5)
    assert (cov["n_voxels_atlas"].to_numpy() == np.bincount(atlas2.ravel())[cov["index"]]).all()


def test_coverage_without_mask_uses_varying_voxels_and_nan_for_low(bold4d, caplog):
    atlas = _atlas2()
    data = bold4d.get_fdata(dtype=np.float32).copy()
    data[5:9, 1:4, 1:7, :] = 0.0  # parcel 11 entirely constant (outside the brain)
    data[5:9, 4:6, 1:7, :] = 7.0  # half of parcel 13 constant
    bold = nib.Nifti1Image(data, AFF2)
    table = pd.concat(
        [_table(), pd.DataFrame({"index": [99], "name": ["Absent"]})], ignore_index=True
    )
    with caplog.at_level(logging.WARNING):
        ts, cov = _plain(bold, nib.Nifti1Image(atlas, AFF2), table, min_coverage=0.6)
    assert "absent from the atlas image" in caplog.text and "Absent" in caplog.text
    cov = cov.set_index("name")
    assert cov.loc["P11", "coverage"] == 0 and cov.loc["P13", "coverage"] == pytest.approx(0.5)
    assert cov.loc["Absent", "coverage"] == 0 and cov.loc["Absent", "n_voxels_atlas"] == 0
    assert ts[["P11", "P13", "Absent"]].isna().all().all()
    assert list(ts.columns)[-1] == "Absent"
    assert not ts[["P3", "P5", "P7", "P17"]].isna().any().any()
    assert cov["used"].tolist() == [True, True, True, False, False, True, False]
    # with min_coverage 0.5 the half-covered parcel is kept and averages its varying voxels
    ts, _ = _plain(bold, nib.Nifti1Image(atlas, AFF2), table, min_coverage=0.5)
    np.testing.assert_allclose(
        ts["P13"], data[5:9, 6:8, 1:7].reshape(-1, N_VOLS).mean(0), rtol=1e-5
    )


def test_confound_regression_residuals_orthogonal(bold4d):
    rng = np.random.default_rng(5)
    atlas = _atlas2()
    conf = rng.normal(size=(N_VOLS, 3))
    data = bold4d.get_fdata() + (conf @ [3.0, -2.0, 1.0])[None, None, None, :]
    bold = nib.Nifti1Image(data.astype(np.float32), AFF2)
    ts, _ = _plain(
        bold,
        nib.Nifti1Image(atlas, AFF2),
        _table(),
        confounds=pd.DataFrame(conf, columns=["a", "b", "c"]),
    )
    resid = ts.to_numpy()
    centred = conf - conf.mean(0)
    # residuals orthogonal to the (centred) confounds ...
    assert np.abs(centred.T @ (resid - resid.mean(0))).max() < 1e-6 * np.abs(resid).max()
    # ... and equal to an ordinary least-squares reference with an intercept
    y = np.stack([data[atlas == i].mean(0) for i in (3, 5, 7, 11, 13, 17)], axis=1)
    design = np.column_stack([np.ones(N_VOLS), conf])
    beta = np.linalg.lstsq(design, y, rcond=None)[0]
    np.testing.assert_allclose(resid, y - centred @ beta[1:], rtol=1e-4, atol=1e-4)


def test_filter_and_standardize(bold4d):
    ts, _ = parcellate_bold(
        bold4d, nib.Nifti1Image(_atlas2(), AFF2), _table(), tr=TR, high_pass=0.01, low_pass=0.1
    )
    np.testing.assert_allclose(ts.mean().to_numpy(), 0, atol=1e-5)
    np.testing.assert_allclose(ts.std(ddof=1).to_numpy(), 1, rtol=1e-4)
    # low-pass removes power above 0.1 Hz (Nyquist 0.25 Hz)
    spec = np.abs(np.fft.rfft(ts.to_numpy(), axis=0)) ** 2
    freqs = np.fft.rfftfreq(N_VOLS, TR)
    assert spec[freqs > 0.15].sum() < 0.05 * spec.sum()


def test_parcellate_from_files(tmp_path, bold4d):
    bpath = tmp_path / "bold.nii.gz"
    apath = tmp_path / "atlas_dseg.nii.gz"
    tpath = tmp_path / "atlas_dseg.tsv"
    nib.save(bold4d, bpath)
    nib.save(nib.Nifti1Image(_atlas2(), AFF2), apath)
    _table().to_csv(tpath, sep="\t", index=False)
    ts, cov = _plain(str(bpath), apath, tpath)
    assert ts.shape == (N_VOLS, 6) and cov["used"].all()


def test_parcellate_errors(bold4d, tmp_path):
    atlas = nib.Nifti1Image(_atlas2(), AFF2)
    table = _table()
    bpath = tmp_path / "bold.nii.gz"
    nib.save(nib.Nifti1Image(bold4d.get_fdata()[..., 0], AFF2), bpath)
    with pytest.raises(SambaInputError, match="3-D .* expected 4-D") as err:
        _plain(bpath, atlas, table)
    assert err.value.path == str(bpath)
    data = bold4d.get_fdata(dtype=np.float32).copy()
    data[0, 0, 0, 3] = np.nan
    data[2, 2, 2, :] = np.inf
    with pytest.raises(SambaInputError, match="NaN or Inf values in 2 voxel"):
        _plain(nib.Nifti1Image(data, AFF2), atlas, table)
    # TR missing / non-positive
    for bad_tr in (None, 0, -2.0, "x"):
        with pytest.raises(SambaInputError, match="repetition time|TR"):
            _plain(bold4d, atlas, table, tr=bad_tr)
    # atlas shifted far away: bounding boxes do not overlap
    far = AFF2.copy()
    far[:3, 3] += 200
    with pytest.raises(SambaInputError, match="bounding boxes overlap by only 0%"):
        _plain(bold4d, nib.Nifti1Image(_atlas2(), far), table)
    # atlas inside the field of view but outside the brain mask
    mask = np.zeros(SHAPE, np.uint8)
    mask[:, :, 7] = 1
    with pytest.raises(SambaInputError, match="does not overlap the brain mask"):
        _plain(bold4d, atlas, table, mask_img=nib.Nifti1Image(mask, AFF2))
    # label in the image missing from the table
    with pytest.raises(SambaInputError, match=r"missing from the label table: \[17\]"):
        _plain(bold4d, atlas, table.iloc[:-1])
    # table without a name column
    with pytest.raises(SambaInputError, match="lacks column"):
        _plain(bold4d, atlas, table.rename(columns={"name": "label"}))
    # confounds of the wrong length
    with pytest.raises(SambaInputError, match="39 rows but the BOLD series has 40"):
        _plain(bold4d, atlas, table, confounds=np.zeros((N_VOLS - 1, 2)))
    # filter above Nyquist
    with pytest.raises(SambaInputError, match="Nyquist"):
        parcellate_bold(bold4d, atlas, table, tr=TR, low_pass=0.3)
    with pytest.raises(SambaMissingInputError):
        _plain(tmp_path / "missing.nii.gz", atlas, table)


def test_read_repetition_time(fmriprep_func, tmp_path):
    assert read_repetition_time(fmriprep_func["bold"]) == TR
    assert read_repetition_time(str(fmriprep_func["bold"]).replace(".nii.gz", ".json")) == TR
    assert read_repetition_time(nib.load(fmriprep_func["bold"])) == TR
    img = nib.Nifti1Image(np.zeros((2, 2, 2, 3), np.float32), np.eye(4))
    img.header.set_zooms((1, 1, 1, 1.5))
    img.header.set_xyzt_units("mm", "sec")
    assert read_repetition_time(img) == 1.5
    bad = tmp_path / "x_bold.json"
    bad.write_text(json.dumps({"TaskName": "rest"}))
    with pytest.raises(SambaInputError, match="no RepetitionTime") as err:
        read_repetition_time(bad)
    assert err.value.path == str(bad)
    with pytest.raises(SambaMissingInputError) as err:
        read_repetition_time(tmp_path / "y_bold.nii.gz")
    assert err.value.path == str(tmp_path / "y_bold.json")
    bad.write_text(json.dumps({"RepetitionTime": 0}))
    with pytest.raises(SambaInputError, match="positive"):
        read_repetition_time(bad)


def test_streamed_parcellation_matches_nilearn_masker(tmp_path):
    """The streaming parcel means + nilearn.signal.clean equal NiftiLabelsMasker's output.

    The BOLD is written as gzipped int16 with a scale factor, so that the streaming reader's
    handling of the file offset, byte order, Fortran layout and scaling is checked too.
    """
    from nilearn.maskers import NiftiLabelsMasker

    rng = np.random.default_rng(3)
    shape, n_t, tr = (9, 8, 7), 80, 2.0
    atlas = np.zeros(shape, np.int16)
    atlas[1:4, 1:7, 1:6] = 1
    atlas[4:8, 1:4, 1:6] = 2
    atlas[4:8, 4:7, 1:6] = 3
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    signal = rng.standard_normal((n_t, 3)).cumsum(0)
    data = 1000 + 20 * rng.standard_normal(shape + (n_t,))
    for label in (1, 2, 3):
        data[atlas == label] += 5 * signal[:, label - 1]
    img = nib.Nifti1Image(np.round(data * 4).astype(np.int16), affine)
    img.header.set_slope_inter(0.25, 0.0)
    bold_path = tmp_path / "bold.nii.gz"
    img.to_filename(bold_path)
    atlas_img = nib.Nifti1Image(atlas, affine)
    table = pd.DataFrame({"index": [1, 2, 3], "name": ["a", "b", "c"]})
    conf = pd.DataFrame(rng.standard_normal((n_t, 2)), columns=["x", "y"])

    ours, _ = parcellate_bold(str(bold_path), atlas_img, table, confounds=conf, tr=tr,
                              high_pass=0.01, low_pass=0.1, min_coverage=0.0)
    masker = NiftiLabelsMasker(labels_img=atlas_img, standardize="zscore_sample", detrend=True,
                               high_pass=0.01, low_pass=0.1, t_r=tr)
    ref = masker.fit_transform(str(bold_path), confounds=conf)
    np.testing.assert_allclose(ours.to_numpy(), ref, atol=1e-5)
