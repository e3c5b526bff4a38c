"""EEG/MEG source-space parcel time series on a template head (MNE; pure functions, no Nipype).

What :func:`source_parcel_timeseries` does, and why
---------------------------------------------------
1. **Source points** at the voxels of the EEG/MEG atlas (MNI positions from the dseg image's
   affine), subsampled on a regular grid of ``source_spacing`` mm; every parcel keeps at least
   the voxel nearest its centroid. The parcels *are* the source space, so no surface or
   volume-label registration is needed, and the result has exactly the atlas' parcels (the
   columns of the region map SAMBA uses).
2. **Co-registration** of the recording to the template. The template is MNE's Colin27 10-05
   montage, which lives in the Colin27 MRI space (the MNI template brain); its fiducials give the
   MNI -> head transform (``mne.channels.compute_native_head_t``). For EEG with electrode
   positions, a similarity transform (rotation, translation, isotropic scale; Umeyama 1991)
   maps the template's electrodes onto the recording's, matched by name, so the sources follow
   the subject's head size and placement; its residual is reported. Without positions, the
   template positions are used directly. MEG head coordinates are defined by the subject's own
   fiducials: the same similarity fit maps the template's fiducials onto the digitised ones.
   MNE's standard montages carry fsaverage's fiducials, so this is an fsaverage MRI -> head
   transform. With a BEM (fsaverage) the atlas' MNI152 positions go to fsaverage's MNI305 first
   (FreeSurfer's affine); the sphere takes them as the template's (they differ by ~1.5 mm).
3. **Head model** (``head_model``, :mod:`samba_pipeline.ephys.headmodel`): an fsaverage BEM
   (MEG: single shell of the inner skull MNE ships; EEG: FreeSurfer's 3-layer solution when a
   subjects dir has it), sources moved inside the inner skull where needed; or a 3-shell
   sphere (brain 0.87, skull 0.92, scalp 1.0 of the radius; conductivities
   0.33 / 0.0042 / 0.33 S/m, the classic 1:80 skull ratio) fitted to the head digitisation /
   electrodes (``mne.make_sphere_model``), with the source points pulled towards the centre
   (one isotropic factor) only if some would lie outside the inner shell (for MEG only the
   sphere's origin matters).
4. **Forward model** (``mne.make_forward_solution``, free orientation), then one **fixed
   orientation** per source: the direction whose dipole produces the most (whitened) power at
   the sensors (the first right singular vector of the source's 3 gain columns; "max-power",
   as in MNE's LCMV), signed to point away from the sphere centre. A volume source space has no
   cortical normals, and this is the orientation the sensors see best (near-radial for EEG,
   tangential for MEG).
5. **Noise covariance** (``noise_cov``): ``"ad-hoc"`` (MNE's diagonal sensor noise), ``"empirical"``
   (the whole recording, MNE-BIDS-Pipeline's ``"rest"``) or ``[tmin, tmax]`` (a baseline, in s
   from the first sample; e.g. the minutes before the scanner starts), regularised with
   ``mne.cov.regularize``.
6. **Inverse operator** (``mne.minimum_norm.make_inverse_operator``, fixed orientation, depth
   weighting) and method (``inverse_method``: MNE, dSPM, sLORETA or eLORETA), with
   lambda2 = 1 / ``inverse_snr`` ** 2. The inverse is linear in the data, so its kernel is
   computed once, by applying MNE's ``apply_inverse`` to an identity "evoked" (one column per
   channel, projections included), and the whole recording goes through one matrix product
   instead of ``apply_inverse_raw``'s per-buffer work (identical numbers; see the tests).
7. **Parcel time courses** (``source_extract``): ``"mean_flip"`` (MNE's label mode: the mean of
   the parcel's sources after flipping those whose orientation opposes the parcel's dominant
   one) or ``"pca"`` (MNE's ``pca_flip``: the first principal component of the parcel's source
   time courses, scaled by its singular value / sqrt(n_sources), signed to agree with the
   flip vector). Both are linear maps too: one (n_parcels x n_channels) matrix for the run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import mne
import nibabel as nb
import numpy as np
import pandas as pd

from samba_pipeline.errors import SambaInputError, SambaUsageError

LOGGER = logging.getLogger(__name__)

#: Template montage whose MRI space is the MNI template brain (Colin27).
TEMPLATE_MONTAGE = "colin27_1005"
#: 3-shell sphere: relative radii (brain, skull, scalp) and conductivities (S/m).
SPHERE_RELATIVE_RADII = (0.87, 0.92, 1.0)
SPHERE_SIGMAS = (0.33, 0.0042, 0.33)
#: Sources must stay this far inside the inner shell (m); MNE's default mindist is 5 mm.
MINDIST_M = 0.005
INVERSE_METHODS = ("MNE", "dSPM", "sLORETA", "eLORETA")
EXTRACT_MODES = ("mean_flip", "pca")
NOISE_COV_CHOICES = ("ad-hoc", "empirical")
#: Fewest electrodes matched by name to fit the similarity transform to the template.
MIN_MATCHED_ELECTRODES = 6


# --------------------------------------------------------------------------------------------
# source points from the atlas
# --------------------------------------------------------------------------------------------


def atlas_source_points(atlas_img, labels: pd.DataFrame, spacing_mm: float = 8.0,
                        ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Source positions (MNI mm) at the atlas voxels, on a grid of about ``spacing_mm``.

    Returns ``(pos_mm (n, 3), parcel (n,) 0-based row of labels, names)``; every parcel of the
    table has at least one point (the voxel nearest its centroid). A parcel of the table with
    no voxel in the image is a :class:`SambaInputError` naming the atlas image.
    """
    path = Path(atlas_img) if isinstance(atlas_img, (str, Path)) else None
    try:
        img = nb.load(str(atlas_img)) if path is not None else atlas_img
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise SambaInputError(f"cannot read the EEG/MEG atlas image: {exc}", path=path) from None
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise SambaInputError(f"EEG/MEG atlas image must be 3-D, shape is {data.shape}", path=path)
    data = np.rint(data).astype(np.int64)
    index = labels["index"].to_numpy(dtype=np.int64)
    names = labels["name"].astype(str).tolist()
    ijk = np.argwhere(data > 0)
    values = data[tuple(ijk.T)]
    order = np.argsort(index)
    pos_in_sorted = np.searchsorted(index[order], values)
    pos_in_sorted = np.clip(pos_in_sorted, 0, len(index) - 1)
    known = index[order][pos_in_sorted] == values
    ijk, parcel = ijk[known], order[pos_in_sorted[known]]
    counts = np.bincount(parcel, minlength=len(index))
    if (counts == 0).any():
        missing = [names[i] for i in np.flatnonzero(counts == 0)]
        raise SambaInputError(
            f"{len(missing)} parcel(s) of the label table have no voxel in the EEG/MEG atlas "
            f"image, so they cannot get sources: {', '.join(missing[:5])}", path=path)
    zooms = np.abs(np.asarray(img.header.get_zooms()[:3], dtype=float))
    step = np.maximum(1, np.rint(float(spacing_mm) / zooms)).astype(np.int64)
    on_grid = np.all(ijk % step == 0, axis=1)
    xyz = nb.affines.apply_affine(img.affine, ijk)
    keep = on_grid.copy()
    # a parcel the grid misses keeps the voxel nearest its centroid
    missed = np.flatnonzero(np.bincount(parcel[on_grid], minlength=len(index)) == 0)
    if missed.size:
        sums = np.zeros((len(index), 3))
        np.add.at(sums, parcel, xyz)
        centroid = sums / counts[:, None]
        dist = np.linalg.norm(xyz - centroid[parcel], axis=1)
        frame = pd.DataFrame({"parcel": parcel, "dist": dist})
        nearest = frame[np.isin(parcel, missed)].groupby("parcel")["dist"].idxmin().to_numpy()
        keep[nearest] = True
    return xyz[keep], parcel[keep], names


# --------------------------------------------------------------------------------------------
# co-registration to the template
# --------------------------------------------------------------------------------------------


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """4x4 similarity transform (rotation, translation, isotropic scale) with the least
    squared error mapping the points ``src`` (n, 3) onto ``dst`` (Umeyama 1991)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    cov = b.T @ a / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1.0
    rot = u @ np.diag(d) @ vt
    var = (a ** 2).sum() / len(src)
    scale = float((s * d).sum() / var) if var > 0 else 1.0
    trans = np.eye(4)
    trans[:3, :3] = scale * rot
    trans[:3, 3] = mu_d - scale * rot @ mu_s
    return trans


def _eeg_positions(info: mne.Info, picks: np.ndarray) -> np.ndarray:
    return np.array([info["chs"][i]["loc"][:3] for i in picks], dtype=float).reshape(-1, 3)


def template_to_head(info: mne.Info, source: str | None = None) -> tuple[np.ndarray, dict]:
    """MNI (m) -> head (m) transform of the recording, and a report (see module doc, step 2)."""
    template = mne.channels.make_standard_montage(TEMPLATE_MONTAGE)
    mni_to_template_head = mne.channels.compute_native_head_t(template)["trans"]
    eeg = mne.pick_types(info, meg=False, eeg=True, exclude=())
    report: dict[str, Any] = {"template_montage": TEMPLATE_MONTAGE}
    if len(eeg) == 0:
        return _fiducial_fit(info, template, mni_to_template_head, report, source)
    pos = _eeg_positions(info, eeg)
    valid = np.isfinite(pos).all(1) & (np.linalg.norm(pos, axis=1) > 0)
    tpl_pos = template.get_positions()["ch_pos"]
    lower = {k.lower(): np.asarray(v, dtype=float) for k, v in tpl_pos.items()}
    names = [info["ch_names"][i] for i in eeg]
    matched = np.array([valid[k] and names[k].lower() in lower for k in range(len(names))])
    if matched.sum() >= MIN_MATCHED_ELECTRODES:
        tpl = np.array([lower[names[k].lower()] for k in np.flatnonzero(matched)])
        tpl_head = mne.transforms.apply_trans(mni_to_template_head, tpl)
        fit = similarity_transform(tpl_head, pos[matched])
        resid = np.linalg.norm(mne.transforms.apply_trans(fit, tpl_head) - pos[matched], axis=1)
        scale = float(np.cbrt(np.linalg.det(fit[:3, :3])))
        report.update(coregistration="similarity fit of the template electrodes to the recording's",
                      n_matched_electrodes=int(matched.sum()),
                      coregistration_rms_mm=float(np.sqrt((resid ** 2).mean()) * 1000),
                      coregistration_scale=scale)
        if not 0.7 < scale < 1.4:
            raise SambaInputError(
                f"the electrode positions do not fit a human head: the template has to be scaled "
                f"by {scale:.2f} to match them (check the units of *_electrodes.tsv and "
                "*_coordsystem.json)", path=source)
        return fit @ mni_to_template_head, report
    if valid.all():
        raise SambaInputError(
            f"only {int(matched.sum())} EEG channel names match the 10-05 system, too few "
            f"(< {MIN_MATCHED_ELECTRODES}) to co-register the electrodes with the template head "
            "for source space; use ephys_space='sensor'", path=source)
    report["coregistration"] = "template electrode positions (the recording has none)"
    return mni_to_template_head, report


def _fiducial_fit(info: mne.Info, template, mni_to_template_head: np.ndarray, report: dict,
                  source) -> tuple[np.ndarray, dict]:
    """MEG: similarity fit of the template's fiducials (head coordinates) to the recording's
    digitised ones (nasion, LPA, RPA), so the template follows the head's size; the template's
    own head frame when the recording has no fiducials."""
    from mne.io.constants import FIFF

    cardinal = {FIFF.FIFFV_POINT_NASION: "nasion", FIFF.FIFFV_POINT_LPA: "lpa",
                FIFF.FIFFV_POINT_RPA: "rpa"}
    got = {cardinal[d["ident"]]: np.asarray(d["r"], dtype=float) for d in (info["dig"] or [])
           if d["kind"] == FIFF.FIFFV_POINT_CARDINAL and d["ident"] in cardinal
           and d["coord_frame"] == FIFF.FIFFV_COORD_HEAD}
    if len(got) < 3:
        report["coregistration"] = "template fiducials (MEG head coordinates; no digitised fiducials)"
        return mni_to_template_head, report
    tpl = template.get_positions()
    tpl_head = mne.transforms.apply_trans(mni_to_template_head,
                                          np.array([tpl[k] for k in ("nasion", "lpa", "rpa")]))
    rec = np.array([got[k] for k in ("nasion", "lpa", "rpa")])
    fit = similarity_transform(tpl_head, rec)
    resid = np.linalg.norm(mne.transforms.apply_trans(fit, tpl_head) - rec, axis=1)
    scale = float(np.cbrt(np.linalg.det(fit[:3, :3])))
    report.update(coregistration="similarity fit of the template fiducials to the recording's",
                  coregistration_rms_mm=float(np.sqrt((resid ** 2).mean()) * 1000),
                  coregistration_scale=scale)
    if not 0.7 < scale < 1.4:
        raise SambaInputError(
            f"the digitised fiducials do not fit a human head: the template has to be scaled by "
            f"{scale:.2f} to match them (check the digitisation's units)", path=source)
    return fit @ mni_to_template_head, report


def _info_with_template_positions(info: mne.Info, source: str | None) -> mne.Info:
    """``info`` with template positions for EEG channels that have none (matched by name)."""
    eeg = mne.pick_types(info, meg=False, eeg=True, exclude=())
    pos = _eeg_positions(info, eeg)
    if len(eeg) == 0 or (np.isfinite(pos).all() and (np.linalg.norm(pos, axis=1) > 0).all()):
        return info
    template = mne.channels.make_standard_montage(TEMPLATE_MONTAGE)
    lower = {k.lower() for k in template.ch_names}
    missing = [info["ch_names"][i] for i in eeg if info["ch_names"][i].lower() not in lower]
    if missing:
        raise SambaInputError(
            f"EEG channel(s) {missing[:5]} have no position and no 10-05 name; source space "
            "needs electrode positions (*_electrodes.tsv) or ephys_space='sensor'", path=source)
    info = info.copy()
    with mne.utils.use_log_level("error"):
        info.set_montage(template, match_case=False)
    return info


# --------------------------------------------------------------------------------------------
# forward, covariance, inverse
# --------------------------------------------------------------------------------------------


def _inverse_info(info: mne.Info) -> mne.Info:
    """Data channels only; EEG re-expressed as an active average-reference projector (the
    data were average-referenced already, so the projector changes nothing) because MNE's
    inverse refuses a "custom" reference."""
    picks = mne.pick_types(info, meg=True, eeg=True, ref_meg=False, exclude="bads")
    out = mne.pick_info(info, picks)
    if "eeg" in out.get_channel_types():
        with out._unlock():
            out["custom_ref_applied"] = mne.io.constants.FIFF.FIFFV_MNE_CUSTOM_REF_OFF
            out["projs"] = [p for p in out["projs"] if "Average EEG" not in p["desc"]]
        holder = mne.io.RawArray(np.zeros((len(out["ch_names"]), 1)), out, verbose=False)
        holder.set_eeg_reference("average", projection=True, verbose=False)
        holder.apply_proj(verbose=False)  # activates the projector
        out = holder.info
    return out


def make_head_model(info: mne.Info, pos_head: np.ndarray) -> tuple[mne.bem.ConductorModel,
                                                                   np.ndarray, float]:
    """3-shell sphere fitted to the head; source positions scaled to fit inside the brain.

    Returns ``(sphere, positions, scale)``.
    """
    with mne.utils.use_log_level("error"):
        sphere = mne.make_sphere_model("auto", "auto", info, relative_radii=SPHERE_RELATIVE_RADII,
                                       sigmas=SPHERE_SIGMAS)
    r0 = np.asarray(sphere["r0"], dtype=float)
    inner = float(sphere["layers"][0]["rad"]) if sphere["layers"] else float(sphere.radius)
    dist = np.linalg.norm(pos_head - r0, axis=1)
    limit = inner - MINDIST_M - 0.002
    scale = min(1.0, limit / float(dist.max()))
    return sphere, r0 + (pos_head - r0) * scale, float(scale)


def _forward(info, rr, nn, sphere, source, trans=None) -> mne.Forward:
    """Free-orientation forward of the sources ``rr`` (MRI coordinates, m; with ``trans``
    None, the sphere's head coordinates) for the conductor model ``sphere`` (or a BEM)."""
    src = mne.setup_volume_source_space(pos={"rr": rr, "nn": nn}, verbose="error")
    types = set(info.get_channel_types())
    try:
        with mne.utils.use_log_level("error"):
            fwd = mne.make_forward_solution(info, trans=trans, src=src, bem=sphere,
                                            meg=bool({"mag", "grad"} & types), eeg="eeg" in types,
                                            mindist=0.0, n_jobs=1)
    except (RuntimeError, ValueError) as exc:
        raise SambaInputError(f"cannot compute the forward model: {exc}", path=source) from None
    if fwd["nsource"] != len(rr):
        raise SambaInputError(f"the forward model dropped {len(rr) - fwd['nsource']} of {len(rr)} "
                              "source points", path=source)
    return fwd


def _oriented(fwd: mne.Forward, nn: np.ndarray) -> mne.Forward:
    """``fwd`` with its sources' orientations set to ``nn`` (head coordinates, as the forward
    holds them): the fixed-orientation inverse then uses the gain along ``nn``."""
    out = fwd.copy()
    src = out["src"][0]
    nn_all = np.array(src["nn"], dtype=float)
    nn_all[src["vertno"]] = nn
    src["nn"] = nn_all
    return out


def _bem_setup(choice, mri_head: np.ndarray, pos_mri: np.ndarray):
    """BEM, head -> MRI transform, source points (MRI, m; inside the inner skull), inner-skull
    centroid (MRI, m), template scale and report, for a BEM ``choice`` (see headmodel).

    ``mri_head`` (fsaverage MRI -> head) is a similarity transform. A BEM made here (MEG's
    single shell) is scaled with the template, so the transform stays rigid; a BEM read from a
    file cannot be rescaled without a new BEM solution, so the template keeps fsaverage's size,
    placed by the fit's rotation with the inner skull's centroid where the fit puts it (MNE
    projects EEG electrodes onto the BEM scalp).
    """
    from samba_pipeline.ephys import headmodel as hm

    scale = float(np.cbrt(np.linalg.det(mri_head[:3, :3])))
    rigid = mri_head.copy()
    rigid[:3, :3] /= scale
    if choice.scalable:
        bem = hm.meg_single_shell_bem(scale)
        used_scale = round(scale, 3)
        rigid[:3, :3] *= scale / used_scale  # the rounding of the cached scale stays exact
        surf = hm.inner_skull(bem)
        rr = pos_mri * used_scale
        description = (f"single-shell BEM (fsaverage inner skull shipped with MNE, ico-{hm.MEG_BEM_ICO}, "
                       f"{hm.MEG_BEM_CONDUCTIVITY[0]} S/m), scaled by {used_scale:.3f}")
    else:
        bem = choice.bem
        used_scale = 1.0
        surf = hm.inner_skull(bem)
        centre = surf["rr"].mean(axis=0)
        rigid[:3, 3] += (scale - 1.0) * rigid[:3, :3] @ centre
        rr = pos_mri
        description = (f"{len(bem['surfs'])}-layer BEM ({Path(choice.bem_file).name}), "
                       "fsaverage size (not scaled)")
    rr, moved = hm.push_inside(rr, surf["rr"], surf["tris"], MINDIST_M)
    shift = np.linalg.norm(rr[moved] - (pos_mri * used_scale)[moved], axis=1)
    head_mri_t = mne.transforms.Transform("head", "mri", np.linalg.inv(rigid))
    report = {"type": "bem", "description": description, "template": "fsaverage",
              "file": choice.bem_file or str(hm.INNER_SKULL_FILE),
              "n_layers": len(bem["surfs"]),
              "conductivities_S_per_m": [float(s["sigma"]) for s in bem["surfs"]],
              "n_vertices": [int(s["np"]) for s in bem["surfs"]],
              "template_scale": used_scale,
              "source_coordinates": "MNI152 -> MNI305 (fsaverage MRI), FreeSurfer's affine",
              "n_sources_moved_inside": int(moved.sum()),
              "max_source_shift_mm": float(shift.max() * 1000) if shift.size else 0.0}
    return bem, head_mri_t, rr, surf["rr"].mean(axis=0), used_scale, report


def max_power_orientations(gain_free: np.ndarray, rr: np.ndarray, r0: np.ndarray) -> np.ndarray:
    """(n_sources, 3) unit orientations of largest sensor power, pointing away from ``r0``.

    ``gain_free`` is (n_channels, 3 * n_sources) (x, y, z per source), whitened or projected as
    the inverse sees it.
    """
    n_ch = gain_free.shape[0]
    g = gain_free.reshape(n_ch, -1, 3).transpose(1, 0, 2)  # (n_src, n_ch, 3)
    _, _, vt = np.linalg.svd(g, full_matrices=False)  # batched
    nn = vt[:, 0, :]
    outward = np.einsum("sk,sk->s", nn, rr - r0)
    nn = nn * np.where(outward < 0, -1.0, 1.0)[:, None]
    return nn / np.linalg.norm(nn, axis=1, keepdims=True)


def make_noise_cov(raw: mne.io.BaseRaw, info: mne.Info, noise_cov, source=None) -> mne.Covariance:
    """The noise covariance of ``noise_cov`` (see module doc, step 5), regularised."""
    if isinstance(noise_cov, str) and noise_cov == "ad-hoc":
        with mne.utils.use_log_level("error"):
            return mne.make_ad_hoc_cov(info)
    if isinstance(noise_cov, str) and noise_cov == "empirical":
        tmin, tmax = 0.0, None
    else:
        tmin, tmax = noise_cov
        tmin = 0.0 if tmin is None else float(tmin)
    duration = raw.n_times / raw.info["sfreq"]
    stop = duration if tmax is None else float(tmax)
    if not 0 <= tmin < stop <= duration + 1e-9 or stop - tmin < 10.0:
        raise SambaInputError(
            f"noise_cov baseline [{tmin}, {tmax}] s must lie within the recording (0 to "
            f"{duration:.1f} s) and last at least 10 s", path=source)
    picks = [raw.ch_names.index(c) for c in info["ch_names"]]
    start, stop_s = int(round(tmin * raw.info["sfreq"])), int(round(stop * raw.info["sfreq"]))
    data = raw.get_data(picks=picks, start=start, stop=stop_s)
    data = data - data.mean(axis=1, keepdims=True)
    cov = mne.Covariance(data @ data.T / max(data.shape[1] - 1, 1), info["ch_names"],
                         info["bads"], info["projs"], nfree=data.shape[1] - 1)
    with mne.utils.use_log_level("error"):
        return mne.cov.regularize(cov, info, mag=0.1, grad=0.1, eeg=0.1, rank=None)


def inverse_kernel(info: mne.Info, fwd: mne.Forward, cov: mne.Covariance, method: str,
                   snr: float, depth: float | None) -> np.ndarray:
    """(n_sources, n_channels) linear inverse of ``method`` (projections included)."""
    fwd = mne.convert_forward_solution(fwd, surf_ori=True, verbose="error")
    with mne.utils.use_log_level("error"):
        inv = mne.minimum_norm.make_inverse_operator(info, fwd, cov, loose=0.0, depth=depth,
                                                     fixed=True)
        identity = mne.EvokedArray(np.eye(len(info["ch_names"])), info, tmin=0.0, nave=1)
        stc = mne.minimum_norm.apply_inverse(identity, inv, lambda2=1.0 / snr ** 2,
                                             method=method, pick_ori=None)
    return np.asarray(stc.data, dtype=float)


# --------------------------------------------------------------------------------------------
# parcels
# --------------------------------------------------------------------------------------------


def sign_flips(nn: np.ndarray, parcel: np.ndarray, n_parcels: int) -> np.ndarray:
    """+-1 per source: MNE's ``label_sign_flip`` rule, per parcel (sign of each orientation
    on the parcel's dominant orientation), the majority made positive. Vectorised."""
    outer = np.einsum("si,sj->sij", nn, nn)
    scatter = np.zeros((n_parcels, 3, 3))
    np.add.at(scatter, parcel, outer)
    _, vecs = np.linalg.eigh(scatter)
    dominant = vecs[:, :, -1]  # (n_parcels, 3)
    flip = np.sign(np.einsum("sk,sk->s", nn, dominant[parcel]))
    flip[flip == 0] = 1.0
    majority = np.zeros(n_parcels)
    np.add.at(majority, parcel, flip)
    return flip * np.where(majority[parcel] < 0, -1.0, 1.0)


def parcel_operator(kernel: np.ndarray, parcel: np.ndarray, n_parcels: int, flip: np.ndarray,
                    mode: str = "mean_flip", data_cov: np.ndarray | None = None) -> np.ndarray:
    """(n_parcels, n_channels) map from sensor data to parcel time courses (module doc, 7)."""
    counts = np.bincount(parcel, minlength=n_parcels).astype(float)
    flipped = kernel * flip[:, None]
    mean = np.zeros((n_parcels, kernel.shape[1]))
    np.add.at(mean, parcel, flipped)
    mean /= counts[:, None]
    if mode == "mean_flip":
        return mean
    if mode != "pca":
        raise SambaUsageError(f"source_extract={mode!r}; choose from {list(EXTRACT_MODES)}")
    if data_cov is None:
        raise ValueError("pca needs the sensor data covariance")
    # padded batch: (n_parcels, n_max, n_channels) kernels, zero rows beyond each parcel's size
    n_max = int(counts.max())
    order = np.argsort(parcel, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts.astype(int))[:-1]])
    slot = np.arange(len(parcel)) - starts[parcel[order]]
    padded = np.zeros((n_parcels, n_max, kernel.shape[1]))
    padded[parcel[order], slot] = kernel[order]
    flips = np.zeros((n_parcels, n_max))
    flips[parcel[order], slot] = flip[order]
    cov = padded @ data_cov @ padded.transpose(0, 2, 1)  # source covariance per parcel
    _, vecs = np.linalg.eigh(cov)
    u0 = vecs[:, :, -1]  # (n_parcels, n_max)
    # MNE's pca_flip: s0 * V0 / sqrt(n) == u0^T data / sqrt(n)
    pca = np.einsum("pk,pkc->pc", u0, padded) / np.sqrt(counts)[:, None]
    # MNE signs the component by the flip vector; with few sources per parcel that vote can
    # tie or mislead, so the sign is taken from the covariance with the mean_flip course
    # (falling back to the flip vote when they are uncorrelated)
    agree = np.einsum("pc,cd,pd->p", pca, data_cov, mean)
    vote = np.einsum("pk,pk->p", u0, flips)
    sign = np.where(agree != 0, np.sign(agree), np.sign(vote))
    sign[sign == 0] = 1.0
    return pca * sign[:, None]


# --------------------------------------------------------------------------------------------
# the whole step
# --------------------------------------------------------------------------------------------


def build_source_operator(raw: mne.io.BaseRaw, atlas_img, labels: pd.DataFrame, *,
                          method: str = "eLORETA", extract: str = "mean_flip",
                          noise_cov="ad-hoc", snr: float = 3.0, depth: float | None = 0.8,
                          spacing_mm: float = 8.0, head_model: str = "auto",
                          subjects_dir=None, bem_file=None,
                          ) -> tuple[np.ndarray, list[str], list[str], dict]:
    """The (n_parcels, n_channels) operator from ``raw``'s good data channels to parcels.

    ``head_model``, ``subjects_dir``, ``bem_file``: see :mod:`samba_pipeline.ephys.headmodel`.
    Returns ``(operator, parcel_names, channel_names, report)``.
    """
    from samba_pipeline.ephys import headmodel as hm

    if method not in INVERSE_METHODS:
        raise SambaUsageError(f"inverse_method={method!r}; choose from {list(INVERSE_METHODS)}")
    if extract not in EXTRACT_MODES:
        raise SambaUsageError(f"source_extract={extract!r}; choose from {list(EXTRACT_MODES)}")
    source = _source_name(raw)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    info = _inverse_info(_info_with_template_positions(raw.info, source))
    if len(info["ch_names"]) < 3:
        raise SambaInputError("fewer than 3 good EEG/MEG channels: no source space", path=source)
    pos_mm, parcel, names = atlas_source_points(atlas_img, labels, spacing_mm)
    trans, coreg = template_to_head(info, source)  # fsaverage MRI (m) -> head
    has_eeg = "eeg" in info.get_channel_types()
    choice = hm.choose_head_model(head_model, eeg=has_eeg, subjects_dir=subjects_dir,
                                  bem_file=bem_file)
    if choice.kind == "sphere":  # MNI positions taken as the template's (~1.5 mm apart)
        sphere, rr, scale = make_head_model(info, mne.transforms.apply_trans(trans, pos_mm / 1000.0))
        conductor, head_mri_t = sphere, None
        r0 = np.asarray(sphere["r0"], dtype=float)
        head_report = {"type": "sphere", "relative_radii": list(SPHERE_RELATIVE_RADII),
                       "sigmas_S_per_m": list(SPHERE_SIGMAS), "r0_m": [float(x) for x in r0],
                       "radius_m": float(sphere.radius)}
        summary = "3-shell sphere fitted to the head digitisation"
    else:
        conductor, head_mri_t, rr, r0, scale, head_report = _bem_setup(
            choice, trans, hm.mni152_to_fsaverage(pos_mm))
        summary = head_report["description"]
    head_report["reason"] = choice.reason
    radial = (rr - r0) / np.maximum(np.linalg.norm(rr - r0, axis=1, keepdims=True), 1e-9)
    timings["source_space"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    cov = make_noise_cov(raw, info, noise_cov, source)
    fwd_free = _forward(info, rr, radial, conductor, source, trans=head_mri_t)
    r0_head = r0 if head_mri_t is None else mne.transforms.apply_trans(
        mne.transforms.invert_transform(head_mri_t), r0)
    whitener, _ = mne.cov.compute_whitener(cov, info, verbose="error")
    proj = np.eye(len(info["ch_names"]))
    eeg = mne.pick_types(info, meg=False, eeg=True)
    proj[np.ix_(eeg, eeg)] -= 1.0 / max(len(eeg), 1)  # the average reference
    nn = max_power_orientations(whitener @ proj @ fwd_free["sol"]["data"],
                                fwd_free["source_rr"], r0_head)
    fwd = _oriented(fwd_free, nn)  # same gain, sources oriented along nn
    timings["forward"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    kernel = inverse_kernel(info, fwd, cov, method, snr, depth)
    timings["inverse"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    flip = sign_flips(nn, parcel, len(names))
    data_cov = None
    if extract == "pca":
        picks = [raw.ch_names.index(c) for c in info["ch_names"]]
        data = raw.get_data(picks=picks)
        data_cov = (data @ data.T) / max(data.shape[1], 1)
    operator = parcel_operator(kernel, parcel, len(names), flip, extract, data_cov)
    timings["parcels"] = round(time.perf_counter() - t0, 3)
    counts = np.bincount(parcel, minlength=len(names))
    report = {
        "space": "source",
        "template": ("MNI152NLin2009cAsym (atlas) on the Colin27 template head" if choice.kind == "sphere"
                     else "MNI152NLin2009cAsym (atlas) on the fsaverage template head"),
        "HeadModel": summary,
        "head_model": head_report,
        **coreg,
        "source_scale": scale,
        "n_sources": int(len(rr)),
        "sources_per_parcel": {"min": int(counts.min()), "median": float(np.median(counts)),
                               "max": int(counts.max())},
        "source_spacing_mm": float(spacing_mm),
        "orientation": "fixed, max-power (whitened), outward",
        "noise_cov": noise_cov if isinstance(noise_cov, str) else list(noise_cov),
        "inverse_method": method,
        "lambda2": 1.0 / snr ** 2,
        "depth": depth,
        "source_extract": extract,
        "n_parcels": len(names),
        "n_channels": len(info["ch_names"]),
        "timings_s": timings,
    }
    return operator, names, list(info["ch_names"]), report


def source_parcel_timeseries(raw: mne.io.BaseRaw, atlas_img, labels: pd.DataFrame,
                             **kwargs) -> tuple[mne.io.BaseRaw, dict]:
    """Parcel time courses of a preprocessed recording, as a Raw of ``misc`` channels named
    after the atlas parcels (same sampling, first sample and annotations as ``raw``)."""
    operator, names, ch_names, report = build_source_operator(raw, atlas_img, labels, **kwargs)
    t0 = time.perf_counter()
    picks = [raw.ch_names.index(c) for c in ch_names]
    data = operator @ raw.get_data(picks=picks)
    info = mne.create_info(names, raw.info["sfreq"], "misc")
    out = mne.io.RawArray(data, info, first_samp=raw.first_samp, verbose=False)
    ann = raw.annotations
    out.set_annotations(mne.Annotations(onset=np.asarray(ann.onset) - raw.first_time,
                                        duration=ann.duration, description=ann.description,
                                        orig_time=None))
    report["timings_s"]["apply"] = round(time.perf_counter() - t0, 3)
    report["units"] = "A*m" if report["inverse_method"] in ("MNE", "eLORETA") else "unitless"
    return out, report


def _source_name(raw: mne.io.BaseRaw) -> str | None:
    names = [f for f in (getattr(raw, "filenames", None) or []) if f]
    return str(names[0]) if names else None


__all__ = ["atlas_source_points", "build_source_operator", "make_noise_cov", "parcel_operator",
           "similarity_transform", "sign_flips", "source_parcel_timeseries", "template_to_head"]
