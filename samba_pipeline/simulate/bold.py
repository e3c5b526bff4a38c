"""BOLD signals: neurovascular coupling, hemodynamics, voxel data, motion and confounds.

Noise-free parcel BOLD (percent signal change, mean-free), per fine parcel ``f`` with coarse
parent ``c``::

    drive_c(t)  = sum_b coupling_b * z_cb(t)          z_cb = standardised log band power
    y_f(t)      = (h_f * drive_c)(t)                  h_f: parcel-specific double-gamma HRF
    bold_clean  = amp_f * standardise(y_f(t_k))       sampled at the volume onsets t_k

Voxel data (intensity units) inside the brain mask, volume k, voxel v in fine parcel f::

    X = B_v * (1 + 0.01 * (w_v * bold_clean_f + physio_v + global)) * spin_history * steady_state
        + B_v * drift_v(t) - a * grad(B)_v . displacement_v(t) + thermal noise

``B_v`` is a tissue-weighted baseline (about 1000 in gray matter, 700 in white matter, 1350 in
CSF, smooth coil bias), ``w_v`` voxel weights with mean 1 within each parcel (so the parcel mean
of the BOLD term is exactly ``bold_clean``), ``physio`` a few spatially smooth components that are
strongest in CSF and white matter (what CompCor is designed to capture), ``global`` a small
brain-wide fluctuation, ``drift`` a slow spatially smooth drift, the displacement term the
partial-volume effect of rigid-body head motion (``a = 1`` in the raw data, ``a = 0.25`` in the
"realigned" preprocessed data) and the spin-history intensity drop at motion spikes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage, signal, stats

from samba_pipeline.simulate.neural import ENV_DT, slow_process

#: Neurovascular coupling weights on standardised log band power (alpha, beta, gamma):
#: gamma power raises BOLD, alpha (and a little beta) power lowers it.
COUPLING = np.array([-0.5, -0.15, 1.0])
UNDERSHOOT_RATIO = 1.0 / 6.0
HRF_LENGTH_S = 32.0

GM_BASELINE, WM_BASELINE, CSF_BASELINE = 1000.0, 700.0, 1350.0
THERMAL_NOISE = 10.0  # intensity units (1 % of the gray-matter baseline)
PHYSIO_PSC = 0.6  # percent, per component, at unit tissue weight
GLOBAL_PSC = 0.25  # percent
DRIFT_PSC = 1.0  # percent, linear drift over the run
REALIGNED_MOTION_FRACTION = 0.25
BACKGROUND_SIGMA = 6.0
ROTATION_CENTRE_MM = np.array([0.0, -20.0, 10.0])
FD_RADIUS_MM = 50.0


def double_gamma_hrf(
    t: np.ndarray, peak_s: np.ndarray, undershoot_s: np.ndarray, dispersion: np.ndarray
) -> np.ndarray:
    """Double-gamma HRF(s), shape (n_parcels, len(t)), unit area of the positive lobe.

    ``h(t) = G(t; peak/d + 1, d) - (1/6) G(t; undershoot/d + 1, d)`` with ``G(t; a, d)`` the gamma
    density of shape ``a`` and scale ``d`` (the dispersion, s). The gamma modes are then exactly
    ``peak`` and ``undershoot`` (s), so ``peak`` is the time to peak of the response (the small
    undershoot term moves the peak of ``h`` by less than 0.1 s).
    """
    peak = np.atleast_1d(peak_s)[:, None]
    under = np.atleast_1d(undershoot_s)[:, None]
    disp = np.atleast_1d(dispersion)[:, None]
    t = np.asarray(t)[None, :]
    pos = stats.gamma.pdf(t, peak / disp + 1.0, scale=disp)
    neg = stats.gamma.pdf(t, under / disp + 1.0, scale=disp)
    return pos - UNDERSHOOT_RATIO * neg


def draw_hrf_parameters(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    peak = rng.uniform(4.0, 7.0, n)
    return {
        "hrf_peak_s": peak,
        "hrf_undershoot_s": peak + rng.uniform(8.0, 12.0, n),
        "hrf_dispersion": rng.uniform(0.8, 1.2, n),
    }


def hemodynamic_response(
    drive: np.ndarray, hrf_params: dict[str, np.ndarray], fine_to_coarse: np.ndarray
) -> np.ndarray:
    """Convolve each fine parcel's coarse drive (n_coarse, n_env) with its HRF -> (n_fine, n_env)."""
    t = np.arange(0.0, HRF_LENGTH_S, ENV_DT)
    kernels = double_gamma_hrf(
        t, hrf_params["hrf_peak_s"], hrf_params["hrf_undershoot_s"], hrf_params["hrf_dispersion"]
    )
    x = drive[fine_to_coarse]
    out = signal.fftconvolve(x, kernels, mode="full", axes=-1)[:, : x.shape[-1]] * ENV_DT
    return out


def simulate_motion(rng: np.random.Generator, n_volumes: int, first_valid: int) -> tuple[np.ndarray, list]:
    """Six rigid-body parameters (trans_x/y/z in mm, rot_x/y/z in rad), shape (n_volumes, 6).

    Very slow drifts (about 0.1-0.2 mm, 0.002 rad; periods of minutes), small volume-to-volume
    jitter (respiration-induced apparent motion, ~0.02 mm, 0.0003 rad) and 2-4 events, each
    either a one-volume spike or a step, never in the first ``first_valid + 2`` volumes. Mean
    framewise displacement is about 0.1-0.2 mm, as in cooperative adults.
    """
    slow = slow_process(rng, 6, n_volumes, 1.0, band=(0.001, 0.01))
    slow *= np.array([0.1, 0.15, 0.2, 0.002, 0.0015, 0.0015])[:, None]
    jitter = rng.standard_normal((6, n_volumes)) * np.array([0.01, 0.02, 0.025, 3e-4, 2e-4, 2e-4])[:, None]
    motion = (slow + jitter).T.copy()
    events = []
    n_events = int(rng.integers(2, 5))
    candidates = np.arange(first_valid + 2, max(first_valid + 3, n_volumes - 1))
    when = np.sort(rng.choice(candidates, size=min(n_events, len(candidates)), replace=False))
    for k in when:
        kind = "spike" if rng.random() < 0.6 else "step"
        jump = rng.normal(0.0, 1.0, 6) * np.array([0.3, 0.5, 0.6, 0.006, 0.004, 0.004])
        if kind == "spike":
            motion[k] += jump
        else:
            motion[k:] += jump
        events.append({"volume": int(k), "kind": kind})
    motion -= motion[first_valid]
    return motion, events


def framewise_displacement(motion: np.ndarray) -> np.ndarray:
    d = np.abs(np.diff(motion, axis=0))
    fd = d[:, :3].sum(1) + FD_RADIUS_MM * d[:, 3:].sum(1)
    return np.concatenate([[np.nan], fd])


def _smooth_field(rng: np.random.Generator, shape, sigma_vox: float) -> np.ndarray:
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_vox, mode="nearest")
    return (f - f.mean()) / f.std()


@dataclass
class BoldVolumes:
    raw: np.ndarray  # (X, Y, Z, T) int16
    preproc: np.ndarray  # (X, Y, Z, T) float32
    brain_mask: np.ndarray  # (X, Y, Z) bool
    wm_mask: np.ndarray
    csf_mask: np.ndarray
    baseline: np.ndarray  # (X, Y, Z)
    n_non_steady: int
    brain_ts: np.ndarray  # (T, n_brain) preprocessed data of the brain-mask voxels (C order)


def synthesize_volumes(
    rng: np.random.Generator,
    atlas,
    bold_clean: np.ndarray,
    motion: np.ndarray,
    motion_events: list,
    n_non_steady: int,
) -> BoldVolumes:
    """Voxel data of the raw and preprocessed BOLD runs (see module doc)."""
    shape = atlas.shape
    res = float(atlas.resolution_mm)
    n_vol = bold_clean.shape[0]
    mask = atlas.brain_mask
    n_mask = int(mask.sum())

    # baseline image with a smooth coil-sensitivity bias
    bias = 1.0 + 0.08 * _smooth_field(rng, shape, 30.0 / res)
    base = (GM_BASELINE * atlas.gm + WM_BASELINE * atlas.wm + CSF_BASELINE * atlas.csf) * bias
    base = np.where(mask, base, 0.0)
    b = base[mask].astype(np.float32)

    # parcel BOLD term (percent): w_v * bold_clean[:, fine(v)], w averaged to 1 per parcel
    fine = atlas.fine[mask].astype(np.int64)
    in_parcel = fine > 0
    w = (0.5 + atlas.gm[mask]) * rng.uniform(0.8, 1.2, n_mask)
    sums = np.bincount(fine, weights=w, minlength=bold_clean.shape[1] + 1)
    counts = np.bincount(fine, minlength=bold_clean.shape[1] + 1)
    w = np.where(in_parcel, w / np.maximum(sums[fine] / np.maximum(counts[fine], 1), 1e-12), 0.0)
    psc = np.zeros((n_vol, n_mask), dtype=np.float32)
    psc[:, in_parcel] = bold_clean[:, fine[in_parcel] - 1] * w[in_parcel]

    # physiological components (strongest in CSF, then WM) and a global fluctuation
    tissue = (0.3 * atlas.gm + 0.5 * atlas.wm + 1.5 * atlas.csf)[mask]
    n_phys = 4
    phys_t = np.vstack(
        [
            slow_process(rng, 2, n_vol, 1.0, band=(0.005, 0.1)),
            rng.standard_normal((2, n_vol)),  # aliased cardiac / respiratory
        ]
    )
    phys_t = (phys_t - phys_t.mean(1, keepdims=True)) / phys_t.std(1, keepdims=True)
    for j in range(n_phys):
        spatial = _smooth_field(rng, shape, 12.0 / res)[mask] * tissue * PHYSIO_PSC
        psc += np.outer(phys_t[j].astype(np.float32), spatial.astype(np.float32))
    glob = slow_process(rng, 1, n_vol, 1.0, band=(0.005, 0.1))[0]
    psc += (GLOBAL_PSC * glob)[:, None].astype(np.float32)

    # slow drift (percent of baseline), spatially smooth amplitude
    tt = np.linspace(-1.0, 1.0, n_vol)
    d1 = DRIFT_PSC * (1.0 + 0.5 * _smooth_field(rng, shape, 20.0 / res)[mask])
    d2 = 0.3 * DRIFT_PSC * _smooth_field(rng, shape, 20.0 / res)[mask]
    psc += (np.outer(tt, d1) + np.outer(1.5 * tt**2 - 0.5, d2)).astype(np.float32)

    data = b[None, :] * (1.0 + 0.01 * psc)
    del psc

    # spin-history intensity drop at motion events (a few percent, spatially smooth)
    history = np.ones((n_vol, n_mask), dtype=np.float32)
    for ev in motion_events:
        k = ev["volume"]
        drop = 0.02 * (1.0 + 0.5 * _smooth_field(rng, shape, 15.0 / res)[mask])
        history[k] -= drop
        if k + 1 < n_vol:
            history[k + 1] -= 0.4 * drop
    data *= history
    del history

    # non-steady-state (T1 saturation) transient
    for k in range(n_non_steady):
        data[k] *= 1.0 + 0.6 * 0.3**k

    # partial-volume effect of head motion: dI = -(grad B . T + omega . (r x grad B))
    grads = np.stack(np.gradient(base, res), axis=-1)[mask]  # intensity per mm
    pos = atlas.voxel_mm(mask) - ROTATION_CENTRE_MM
    lever = np.cross(pos, grads)
    design = np.hstack([grads, lever]).astype(np.float32)  # (n_mask, 6)
    motion_term = (motion.astype(np.float32) @ design.T)  # (n_vol, n_mask)

    noise = rng.standard_normal((n_vol, n_mask), dtype=np.float32) * THERMAL_NOISE
    data += noise
    del noise
    preproc_in = data - REALIGNED_MOTION_FRACTION * motion_term
    raw_in = data - motion_term
    del data, motion_term

    # Fill the 4D images (Fortran order, as NIfTI stores them: fast to write) volume by volume;
    # outside the brain: Rayleigh noise (integer valued, as from a scanner), same in both.
    raw = np.empty(shape + (n_vol,), dtype=np.int16, order="F")
    preproc = np.empty(shape + (n_vol,), dtype=np.float32, order="F")
    raw2d = raw.reshape(-1, n_vol, order="F")  # views
    pre2d = preproc.reshape(-1, n_vol, order="F")
    in_idx = np.ravel_multi_index(np.nonzero(mask), shape, order="F")  # C-order mask voxels
    out_idx = np.flatnonzero(~mask.ravel(order="F"))
    for k in range(n_vol):
        expo = rng.standard_exponential(len(out_idx), dtype=np.float32)
        bg = np.round(BACKGROUND_SIGMA * np.sqrt(2.0 * expo))
        col = pre2d[:, k]
        col[out_idx] = bg
        col[in_idx] = preproc_in[k]
        rcol = raw2d[:, k]
        rcol[out_idx] = bg.astype(np.int16)
        rcol[in_idx] = np.clip(np.round(raw_in[k]), -32768, 32767).astype(np.int16)
    del raw_in

    wm_mask = ndimage.binary_erosion(atlas.wm > 0.9) & mask
    if wm_mask.sum() < 20:
        wm_mask = (atlas.wm > 0.9) & mask
    csf_mask = (atlas.csf > 0.8) & mask
    return BoldVolumes(
        raw=raw,
        preproc=preproc,
        brain_mask=mask,
        wm_mask=wm_mask,
        csf_mask=csf_mask,
        baseline=base,
        n_non_steady=n_non_steady,
        brain_ts=preproc_in,
    )


# --- fMRIPrep-like confounds ----------------------------------------------------------------


def cosine_basis(n_volumes: int, tr: float, period_cut: float = 128.0) -> np.ndarray:
    """Discrete cosine high-pass basis as fMRIPrep writes it (cosine00, ...), without constant."""
    order = int(np.floor(2.0 * n_volumes * tr / period_cut))
    order = min(order, n_volumes - 1)
    k = np.arange(1, order + 1)
    n = np.arange(n_volumes)
    return np.sqrt(2.0 / n_volumes) * np.cos(np.pi / n_volumes * (n[:, None] + 0.5) * k[None, :])


def _expansions(name: str, x: np.ndarray, first_na: bool = False) -> dict[str, np.ndarray]:
    d1 = np.concatenate([[np.nan], np.diff(x)])
    if first_na:
        x = x.copy()
        x[0] = np.nan
    return {
        name: x,
        f"{name}_derivative1": d1,
        f"{name}_power2": x**2,
        f"{name}_derivative1_power2": d1**2,
    }


def _compcor(
    ts: np.ndarray, first_valid: int, basis: np.ndarray, n_comp: int
) -> tuple[np.ndarray, np.ndarray]:
    """aCompCor-style components of voxel time series ``ts`` (n_vol, n_vox).

    The non-steady-state volumes are left out, the cosine basis and the mean are regressed out,
    voxels are variance-normalised, and the left singular vectors are the components (zero in
    the non-steady-state rows). Returns (components (n_vol, n_comp), singular values (all)).
    """
    y = ts[first_valid:].astype(np.float64)
    x = np.column_stack([np.ones(len(y)), basis[first_valid:]])
    beta, *_ = np.linalg.lstsq(x, y, rcond=None)
    y = y - x @ beta
    sd = y.std(0)
    y = y[:, sd > 0] / sd[sd > 0]
    # left singular vectors and singular values from the (small) time-by-time Gram matrix
    w, u = np.linalg.eigh(y @ y.T)
    order = np.argsort(w)[::-1]
    s = np.sqrt(np.clip(w[order], 0.0, None))
    u = u[:, order]
    # fix the arbitrary sign so that results are reproducible
    signs = np.sign(u[np.abs(u).argmax(0), np.arange(u.shape[1])])
    u = u * signs
    comps = np.zeros((ts.shape[0], n_comp))
    comps[first_valid:] = u[:, :n_comp]
    return comps, s


def make_confounds(
    vols: BoldVolumes, motion: np.ndarray, tr: float, n_compcor: int = 5
) -> tuple[pd.DataFrame, dict]:
    """fMRIPrep-named confounds table and sidecar for the preprocessed run."""
    n_vol = vols.preproc.shape[-1]
    nss = vols.n_non_steady
    brain_ts = vols.brain_ts  # (n_vol, n_brain)
    wm_ts = brain_ts[:, vols.wm_mask[vols.brain_mask]]
    csf_ts = brain_ts[:, vols.csf_mask[vols.brain_mask]]
    basis = cosine_basis(n_vol, tr)

    cols: dict[str, np.ndarray] = {}
    cols.update(_expansions("global_signal", brain_ts.mean(1)))
    cols.update(_expansions("csf", csf_ts.mean(1)))
    cols.update(_expansions("white_matter", wm_ts.mean(1)))
    cols["csf_wm"] = np.concatenate([csf_ts, wm_ts], axis=1).mean(1)

    diff = np.diff(brain_ts, axis=0)
    dvars = np.concatenate([[np.nan], np.sqrt((diff.astype(np.float64) ** 2).mean(1))])
    ref = np.nanmedian(dvars[nss + 1:]) if n_vol > nss + 1 else np.nanmedian(dvars)
    cols["std_dvars"] = dvars / ref
    cols["dvars"] = dvars
    fd = framewise_displacement(motion)
    cols["framewise_displacement"] = fd
    dm = np.diff(motion, axis=0)
    # RMS displacement over a sphere of radius FD_RADIUS_MM: |dt|^2 + (2/3) r^2 |domega|^2
    rmsd = np.sqrt((dm[:, :3] ** 2).sum(1) + (2.0 / 3.0) * FD_RADIUS_MM**2 * (dm[:, 3:] ** 2).sum(1))
    cols["rmsd"] = np.concatenate([[np.nan], rmsd])

    meta: dict[str, dict] = {}
    for prefix, mask_name, ts in (
        ("c", "CSF", csf_ts),
        ("w", "WM", wm_ts),
        ("a", "combined", np.concatenate([csf_ts, wm_ts], axis=1)),
    ):
        comps, s = _compcor(ts, nss, basis, n_compcor)
        var = s**2 / (s**2).sum()
        cum = np.cumsum(var)
        for j in range(n_compcor):
            name = f"{prefix}_comp_cor_{j:02d}"
            cols[name] = comps[:, j]
            meta[name] = {
                "Method": "aCompCor",
                "Mask": mask_name,
                "SingularValue": float(s[j]),
                "VarianceExplained": float(var[j]),
                "CumulativeVarianceExplained": float(cum[j]),
                "Retained": True,
            }
    for j in range(basis.shape[1]):
        cols[f"cosine{j:02d}"] = basis[:, j]
    for j in range(nss):
        col = np.zeros(n_vol)
        col[j] = 1.0
        cols[f"non_steady_state_outlier{j:02d}"] = col
    outliers = np.flatnonzero((np.nan_to_num(fd) > 0.5) | (np.nan_to_num(cols["std_dvars"]) > 1.5))
    outliers = outliers[outliers >= nss]
    for j, k in enumerate(outliers):
        col = np.zeros(n_vol)
        col[k] = 1.0
        cols[f"motion_outlier{j:02d}"] = col
    for j, name in enumerate(("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")):
        cols.update(_expansions(name, motion[:, j]))

    table = pd.DataFrame(cols)
    for j in range(basis.shape[1]):
        meta[f"cosine{j:02d}"] = {"Method": "cosine", "CutoffPeriod": 128.0}
    for name in ("trans_x", "trans_y", "trans_z"):
        meta[name] = {"Units": "mm"}
    for name in ("rot_x", "rot_y", "rot_z"):
        meta[name] = {"Units": "rad"}
    meta["framewise_displacement"] = {
        "Description": f"Framewise displacement (Power et al. 2012), head radius {FD_RADIUS_MM:g} mm",
        "Units": "mm",
    }
    return table, meta
