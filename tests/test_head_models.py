"""Head models of source space (samba_pipeline.ephys.headmodel): the point-in-mesh test, MEG's
single-shell fsaverage BEM, EEG's fsaverage 3-layer BEM found in a subjects dir, and the
sphere fallback."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mne
import numpy as np
import pandas as pd
import pytest
from scipy.spatial import ConvexHull

from samba_pipeline.atlas import read_label_table
from samba_pipeline.ephys import headmodel as hm
from samba_pipeline.ephys import source as src_mod
from samba_pipeline.ephys.preprocess import EphysSettings, preprocess_raw
from samba_pipeline.ephys.read import find_ephys_files, read_ephys
from samba_pipeline.errors import SambaInputError, SambaUsageError


def _sphere_mesh(n: int = 800, radial=lambda u: np.ones(len(u))) -> tuple[np.ndarray, np.ndarray]:
    """Closed, outward-oriented star-shaped mesh: the convex hull of a Fibonacci lattice on
    the unit sphere, vertices moved to radius ``radial(direction)``."""
    i = np.arange(n) + 0.5
    z = 1 - 2 * i / n
    phi = i * np.pi * (3 - np.sqrt(5))
    u = np.column_stack([np.sqrt(1 - z ** 2) * np.cos(phi), np.sqrt(1 - z ** 2) * np.sin(phi), z])
    tris = ConvexHull(u).simplices.copy()
    normal = np.cross(u[tris[:, 1]] - u[tris[:, 0]], u[tris[:, 2]] - u[tris[:, 0]])
    flip = np.einsum("tk,tk->t", normal, u[tris].mean(1)) < 0
    tris[flip] = tris[flip][:, ::-1]
    return u * radial(u)[:, None], tris


def test_winding_number_on_analytic_shapes():
    """Sphere (radius 0.08 m, off the origin): +1 inside, 0 outside, -1 with the orientation
    flipped; a non-convex star shape (r = 1 + 0.3 cos 3theta): inside iff |p| < r(p / |p|).
    Points within 3 % of the surface are left out (the mesh's chords cut the true surface)."""
    rng = np.random.default_rng(0)
    rr, tris = _sphere_mesh()
    centre = np.array([0.01, -0.02, 0.04])
    pts = rng.uniform(-1.5, 1.5, (3000, 3))
    radius = np.linalg.norm(pts, axis=1)
    keep = np.abs(radius - 1) > 0.03
    pts, radius = pts[keep], radius[keep]
    w = hm.winding_number(centre + 0.08 * pts, centre + 0.08 * rr, tris)
    np.testing.assert_allclose(w, (radius < 1).astype(float), atol=1e-9)
    w_flipped = hm.winding_number(0.08 * pts, 0.08 * rr, tris[:, ::-1])
    np.testing.assert_allclose(w_flipped, -(radius < 1).astype(float), atol=1e-9)
    inside = hm.points_inside(centre + 0.08 * pts, centre + 0.08 * rr, tris)
    assert np.array_equal(inside, radius < 1)

    def star(u):
        return 1 + 0.3 * np.cos(3 * np.arccos(np.clip(u[:, 2], -1, 1)))

    rr, tris = _sphere_mesh(3000, star)
    pts = rng.uniform(-1.4, 1.4, (3000, 3))
    radius = np.linalg.norm(pts, axis=1)
    bound = star(pts / radius[:, None])
    keep = np.abs(radius / bound - 1) > 0.03
    inside = hm.points_inside(pts[keep], rr, tris)
    assert np.array_equal(inside, radius[keep] < bound[keep])
    assert 0.2 < inside.mean() < 0.8  # both kinds of point are tested


def test_push_inside_fsaverage_inner_skull():
    surf = mne.read_bem_surfaces(hm.INNER_SKULL_FILE, verbose="error")[0]
    centre = surf["rr"].mean(0)
    pts = centre + np.array([[0, 0, 0], [0.2, 0, 0], [0, 0.2, 0.0], [0, 0, 0.02]])
    assert hm.points_inside(pts, surf["rr"], surf["tris"]).tolist() == [True, False, False, True]
    moved_pts, moved = hm.push_inside(pts, surf["rr"], surf["tris"], 0.005)
    assert moved.tolist() == [False, True, True, False]
    assert hm.points_inside(moved_pts, surf["rr"], surf["tris"]).all()
    assert (hm._nearest_vertex_distance(moved_pts, surf["rr"]) >= 0.005).all()
    np.testing.assert_array_equal(moved_pts[~moved], pts[~moved])


# -- MEG -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def meg_demo(tmp_path_factory):
    from samba_pipeline.simulate import generate_demo_dataset

    bids, truth = generate_demo_dataset(tmp_path_factory.mktemp("hmdemo") / "demo", subjects=1,
                                        minutes=1.0, tr=2.0, meg=True, non_simultaneous=True)
    raw = read_ephys(find_ephys_files(bids, "01")[0])
    return {"bids": bids, "truth": truth, "raw": raw, **_atlas(bids)}


def _atlas(bids: Path) -> dict:
    tpl = bids / "derivatives" / "atlases" / "tpl-MNI152NLin2009cAsym"
    image = min(tpl.glob("*_dseg.nii.gz"), key=lambda p: int(p.name.split("scale-")[1].split("_")[0]))
    return {"atlas": image, "labels": read_label_table(Path(str(image).replace(".nii.gz", ".tsv")))}


def test_meg_bem_and_sphere_forward_agree_for_deep_sources(meg_demo):
    """Same sources, same sensors: the single-shell BEM's gain columns correlate with the
    sphere's (the pipeline's own fitted sphere) for sources >= 25 mm inside the inner skull.

    Why > 0.8: for MEG, a sphere is a good model of the inner skull away from the skull base
    and the frontal bone (Hamalainen & Sarvas 1989; Leahy et al. 1998 find few-mm localisation
    differences), so topographies of central sources should agree closely (measured median
    0.98), while a wrong co-registration or a frame mix-up between MRI and head coordinates
    (sources a few cm off) drops it to ~0.5.
    """
    raw = meg_demo["raw"]
    info = src_mod._inverse_info(raw.info)
    pos_mm, _, _ = src_mod.atlas_source_points(meg_demo["atlas"], meg_demo["labels"], 12.0)
    trans, coreg = src_mod.template_to_head(info)
    assert coreg["coregistration_scale"] == pytest.approx(1.0, abs=1e-6)  # demo: template head
    choice = hm.choose_head_model("bem", eeg=False)
    pos_mri = hm.mni152_to_fsaverage(pos_mm)
    bem, head_mri_t, rr, _, _, report = src_mod._bem_setup(choice, trans, pos_mri)
    surf = hm.inner_skull(bem)
    deep = hm._nearest_vertex_distance(rr, surf["rr"]) > 0.025
    assert deep.sum() >= 20
    rr = rr[deep]
    nn = np.tile([0.0, 0.0, 1.0], (len(rr), 1))
    fwd_bem = src_mod._forward(info, rr, nn, bem, None, trans=head_mri_t)
    rr_head = fwd_bem["source_rr"]
    sphere, _, _ = src_mod.make_head_model(info, rr_head)
    fwd_sph = src_mod._forward(info, rr_head, nn, sphere, None)
    np.testing.assert_allclose(fwd_sph["source_rr"], rr_head, atol=1e-9)
    # whiten mags and grads to the same units (ad-hoc noise), as the inverse sees them
    cov = mne.make_ad_hoc_cov(info, verbose="error")
    white, _ = mne.cov.compute_whitener(cov, info, verbose="error")
    gb, gs = white @ fwd_bem["sol"]["data"], white @ fwd_sph["sol"]["data"]
    # tangential components only (a radial dipole is silent in a sphere, nearly in the BEM)
    r0 = np.asarray(sphere["r0"])
    corr = []
    for k in range(len(rr)):
        radial = (rr_head[k] - r0) / np.linalg.norm(rr_head[k] - r0)
        tang = np.linalg.svd(np.eye(3) - np.outer(radial, radial))[0][:, :2]
        for t in tang.T:
            a, b = gb[:, 3 * k:3 * k + 3] @ t, gs[:, 3 * k:3 * k + 3] @ t
            corr.append(np.corrcoef(a, b)[0, 1])
    assert np.median(corr) > 0.8, np.round(np.percentile(corr, [10, 50, 90]), 3)


def test_meg_demo_sources_recovered_with_the_bem(meg_demo):
    """test_meg's criterion (parcels follow their own simulated source: median |r| > 0.3 and
    > 4x the median with other parcels' sources) with the BEM head model; the demo's data come
    from a sphere model, so this is no inverse crime. (MNE inverse and 12 mm sources keep the
    test fast; measured own 0.39, other 0.06.)"""
    raw = meg_demo["raw"]
    clean, _ = preprocess_raw(raw, EphysSettings(ch_types=("meg",)))
    out, report = src_mod.source_parcel_timeseries(
        clean, meg_demo["atlas"], meg_demo["labels"], method="MNE", extract="pca",
        noise_cov="empirical", spacing_mm=12.0)  # head_model "auto": MEG gets the BEM
    assert report["head_model"]["type"] == "bem" and report["head_model"]["n_layers"] == 1
    assert report["HeadModel"].startswith("single-shell BEM")
    assert report["head_model"]["n_sources_moved_inside"] < 0.2 * report["n_sources"]
    npz = np.load(meg_demo["truth"] / "sub-01" / "sub-01_task-movie_truth.npz")
    sfreq = clean.info["sfreq"]
    truth = mne.filter.resample(npz["neural"], sfreq, float(npz["neural_sfreq"]), verbose=False)
    truth = mne.filter.filter_data(truth, sfreq, 0.5, 80.0, verbose=False)
    est = out.get_data()
    n = min(est.shape[1], truth.shape[1])
    r = np.abs(np.corrcoef(est[:, :n], truth[:, :n])[:20, 20:])
    own, other = np.median(np.diag(r)), np.median(r[~np.eye(20, dtype=bool)])
    assert own > 0.3 and own > 4 * other, (own, other)


# -- EEG -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_subjects_dir(tmp_path_factory):
    """A SUBJECTS_DIR whose fsaverage/bem holds a 3-layer BEM solution under FreeSurfer's name,
    made from MNE's fsaverage inner skull (ico-3) and scaled copies of it for the outer skull
    (x 1.06) and the scalp (x 1.16) about its centroid: small enough to solve in seconds."""
    root = tmp_path_factory.mktemp("subjects")
    bem_dir = root / "fsaverage" / "bem"
    bem_dir.mkdir(parents=True)
    inner = mne.read_bem_surfaces(hm.INNER_SKULL_FILE, verbose="error")[0]
    mne.write_surface(str(bem_dir / "inner_skull.surf"), inner["rr"] * 1000, inner["tris"])
    with mne.utils.use_log_level("error"):
        ico3 = mne.make_bem_model("fsaverage", ico=3, conductivity=(0.3,), subjects_dir=root)[0]
    centre = ico3["rr"].mean(0)
    for name, factor in (("inner_skull", 1.0), ("outer_skull", 1.06), ("outer_skin", 1.16)):
        mne.write_surface(str(bem_dir / f"{name}.surf"), (centre + (ico3["rr"] - centre) * factor) * 1000,
                          ico3["tris"], overwrite=True)
    with mne.utils.use_log_level("error"):
        model = mne.make_bem_model("fsaverage", ico=None, subjects_dir=root)
        mne.write_bem_solution(bem_dir / hm.FSAVERAGE_BEM_SOL, mne.make_bem_solution(model))
    return root


def _eeg_raw() -> mne.io.RawArray:
    montage = mne.channels.make_standard_montage("colin27_1020")
    names = [n for n in montage.ch_names if n[-1].isdigit() or n.endswith("z")][:48]
    info = mne.create_info(names, 200.0, "eeg")
    data = np.random.default_rng(3).standard_normal((len(names), 4000)) * 1e-6
    raw = mne.io.RawArray(data, info, verbose=False)
    raw.set_montage(montage, verbose=False)
    raw.set_eeg_reference("average", projection=False, verbose=False)
    return raw


@pytest.fixture
def no_fsaverage(monkeypatch, tmp_path):
    monkeypatch.delenv("SUBJECTS_DIR", raising=False)
    monkeypatch.setenv("MNE_DATA", str(tmp_path / "mne_data"))


def test_eeg_uses_the_fsaverage_bem_of_subjects_dir(meg_demo, fake_subjects_dir, monkeypatch,
                                                    no_fsaverage):
    """$SUBJECTS_DIR (or the subjects_dir key) with fsaverage/bem/*-5120-5120-5120-bem-sol.fif:
    "auto" finds it and the forward, inverse and parcel operator are computed with it."""
    raw = _eeg_raw()
    expected = fake_subjects_dir / "fsaverage" / "bem" / hm.FSAVERAGE_BEM_SOL
    monkeypatch.setenv("SUBJECTS_DIR", str(fake_subjects_dir))
    op, names, chans, report = src_mod.build_source_operator(
        raw, meg_demo["atlas"], meg_demo["labels"], method="MNE", noise_cov="ad-hoc",
        spacing_mm=16.0)
    head = report["head_model"]
    assert head["type"] == "bem" and head["n_layers"] == 3 and head["file"] == str(expected)
    assert head["conductivities_S_per_m"] == pytest.approx([0.3, 0.006, 0.3])
    assert report["HeadModel"].startswith("3-layer BEM")
    assert op.shape == (20, len(raw.ch_names)) and np.isfinite(op).all()
    # the same file through the subjects_dir key, without the environment variable
    monkeypatch.delenv("SUBJECTS_DIR")
    op2, _, _, report2 = src_mod.build_source_operator(
        raw, meg_demo["atlas"], meg_demo["labels"], method="MNE", noise_cov="ad-hoc",
        spacing_mm=16.0, subjects_dir=str(fake_subjects_dir))
    assert report2["head_model"]["file"] == str(expected)
    np.testing.assert_allclose(op2, op)


def test_auto_falls_back_to_the_sphere_with_a_reason(meg_demo, no_fsaverage, caplog):
    raw = _eeg_raw()
    with caplog.at_level(logging.INFO, logger="samba_pipeline.ephys.headmodel"):
        _, _, _, report = src_mod.build_source_operator(
            raw, meg_demo["atlas"], meg_demo["labels"], method="MNE", noise_cov="ad-hoc",
            spacing_mm=16.0)
    assert report["head_model"]["type"] == "sphere"
    assert "no fsaverage 3-layer BEM" in report["head_model"]["reason"]
    assert any("using the 3-shell sphere" in r.getMessage() for r in caplog.records)
    with pytest.raises(SambaInputError, match="head_model='bem' but no fsaverage 3-layer BEM"):
        hm.choose_head_model("bem", eeg=True)
    assert hm.choose_head_model("sphere", eeg=False).kind == "sphere"


# -- bad input -------------------------------------------------------------------------------


def test_explicit_bem_file_missing_or_broken_is_named(tmp_path, fake_subjects_dir):
    missing = tmp_path / "nothere-bem-sol.fif"
    with pytest.raises(SambaInputError, match="nothere-bem-sol.fif: BEM solution file not found"):
        hm.choose_head_model("auto", eeg=True, bem_file=missing)
    broken = tmp_path / "broken-bem-sol.fif"
    good = fake_subjects_dir / "fsaverage" / "bem" / hm.FSAVERAGE_BEM_SOL
    broken.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(SambaInputError, match="broken-bem-sol.fif: cannot read the BEM solution"):
        hm.choose_head_model("bem", eeg=False, bem_file=broken)
    one_layer = tmp_path / "one-bem-sol.fif"
    mne.write_bem_solution(one_layer, hm.meg_single_shell_bem(1.0))
    with pytest.raises(SambaInputError, match="one-bem-sol.fif: EEG needs a 3-layer BEM"):
        hm.choose_head_model("auto", eeg=True, bem_file=one_layer)
    assert hm.choose_head_model("auto", eeg=False, bem_file=one_layer).bem_file == str(one_layer)
    # a broken fsaverage BEM found in a subjects dir is named as well
    bad_dir = tmp_path / "subjects" / "fsaverage" / "bem"
    bad_dir.mkdir(parents=True)
    (bad_dir / hm.FSAVERAGE_BEM_SOL).write_bytes(b"not a fif file")
    with pytest.raises(SambaInputError, match=hm.FSAVERAGE_BEM_SOL):
        hm.choose_head_model("auto", eeg=True, subjects_dir=tmp_path / "subjects")


@pytest.mark.parametrize("options, message", [
    ({"head_model": "openmeeg"}, "head_model="),
    ({"bem_file": 3}, "bem_file="),
    ({"subjects_dir": ""}, "subjects_dir="),
])
def test_bad_head_model_settings(options, message):
    with pytest.raises(SambaUsageError, match=message):
        EphysSettings.from_dict(options)


def test_sidecar_records_the_head_model(tmp_path):
    from samba_pipeline.interfaces.participant import MakeSidecar

    report = tmp_path / "report.json"
    report.write_text(json.dumps({"source_space": {"HeadModel": "3-layer BEM (x)", "n_parcels": 20}}))
    result = MakeSidecar(base={"Space": "source"}, extra_json=str(report),
                         extra_key="Preprocessing").run(cwd=str(tmp_path))
    meta = result.outputs.metadata
    assert meta["HeadModel"] == "3-layer BEM (x)" and meta["Preprocessing"]["source_space"]["n_parcels"] == 20
    assert pd.Series(EphysSettings().to_dict())["head_model"] == "auto"
