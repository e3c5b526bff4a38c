"""MEG for the demo (``samba-bids-demo --meg``): a Vectorview-like helmet, a sphere-model lead
field from MNE, and a FIF recording written with mne-bids.

* **Sensors**: ``N_LOCATIONS`` = 102 locations spread evenly (a Fibonacci lattice) over a
  spherical cap of radius ``HELMET_RADIUS_M`` around the head's sphere centre, down to
  ``HELMET_LOWEST_COS`` (a little below the equator), as in an Elekta/MEGIN Vectorview: at
  each location one magnetometer (``FIFFV_COIL_VV_MAG_T3``) and two orthogonal planar
  gradiometers (``FIFFV_COIL_VV_PLANAR_T1``), all facing the head. MNE's own coil definitions
  give their geometry, so the forward model integrates over the real coil shapes. The device
  origin is the sphere centre (``dev_head_t`` a translation).
* **Head**: the Colin27 template head of the EEG demo (the MNI template brain): fiducials and,
  as head-shape points, its 10-05 electrode positions, so that MNE can fit a sphere to the
  digitisation as it does for real MEG data.
* **Lead field**: ``mne.make_forward_solution`` with a sphere model (``mne.make_sphere_model``,
  the origin is all that matters for MEG: a spherically symmetric conductor gives the same
  field whatever its layers) for dipoles at the coarse parcels (as for the EEG demo), each with
  a fixed random *tangential* orientation (a radial dipole makes no field outside a sphere).
* **Sensor data** (T, T/m): sources scaled so that the median magnetometer carries
  ``TARGET_MAG_FT`` fT of brain signal, plus white sensor noise, slow drift and line noise.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import mne
import numpy as np

from samba_pipeline.simulate import eeg as eeg_mod

LOGGER = logging.getLogger("samba_pipeline.simulate")

N_LOCATIONS = 102
HELMET_RADIUS_M = 0.115
HELMET_LOWEST_COS = -0.3
TARGET_MAG_FT = 200.0
MAG_NOISE_FT = 40.0  # white noise SD per magnetometer (fT)
GRAD_NOISE_FT_CM = 5.0  # white noise SD per gradiometer (fT/cm)
LINE_NOISE_FT = 30.0
DRIFT_FT = 100.0


@dataclass
class MEGHead:
    ch_names: list[str]
    info: mne.Info  # sensors, dev_head_t and digitisation (sampling rate set when writing)
    gain: np.ndarray  # (n_channels, n_coarse) T or T/m per A·m
    mag_picks: np.ndarray
    grad_picks: np.ndarray
    dipole_pos: np.ndarray
    dipole_ori: np.ndarray
    dipole_parcel: np.ndarray
    sphere_r0: np.ndarray
    sphere_radius: float
    inner_skull_radius: float
    source_scale: float
    target_std: float = TARGET_MAG_FT * 1e-15

    def scale_for(self, brain: np.ndarray) -> float:
        """Factor that gives the median magnetometer ``target_std`` of brain signal."""
        return self.target_std / float(np.median(brain[self.mag_picks].std(axis=1)))


def helmet(r0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sensor positions (head coordinates, m) and normals of the ``N_LOCATIONS`` locations."""
    i = np.arange(N_LOCATIONS) + 0.5
    z = 1.0 - i / N_LOCATIONS * (1.0 - HELMET_LOWEST_COS)  # equal areas on the cap
    phi = i * np.pi * (3.0 - np.sqrt(5.0))  # golden angle
    rho = np.sqrt(1.0 - z**2)
    normal = np.column_stack([rho * np.cos(phi), rho * np.sin(phi), z])
    return r0 + HELMET_RADIUS_M * normal, normal


def _sensor_frames(normal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two tangential unit vectors (ex, ey) per normal ez, right-handed."""
    up = np.where(np.abs(normal[:, 2:3]) < 0.9, [[0.0, 0.0, 1.0]], [[1.0, 0.0, 0.0]])
    ex = np.cross(up, normal)
    ex /= np.linalg.norm(ex, axis=1, keepdims=True)
    ey = np.cross(normal, ex)
    return ex, ey


def sensor_info(r0: np.ndarray, sfreq: float = 1000.0) -> mne.Info:
    """Info of the 306-channel helmet around ``r0`` (device origin), with the template head's
    fiducials and head-shape points."""
    from mne.io.constants import FIFF

    pos, ez = helmet(r0)
    ex, ey = _sensor_frames(ez)
    names, types, locs = [], [], []
    for k in range(N_LOCATIONS):
        base = f"MEG{k + 1:03d}"
        for suffix, kind, frame in (("1", "mag", (ex[k], ey[k])), ("2", "grad", (ex[k], ey[k])),
                                    ("3", "grad", (ey[k], -ex[k]))):
            names.append(base + suffix)
            types.append(kind)
            # device coordinates: the device origin is the sphere centre
            locs.append(np.concatenate([pos[k] - r0, frame[0], frame[1], ez[k]]))
    info = mne.create_info(names, sfreq, types)
    with info._unlock():
        for ch, loc in zip(info["chs"], locs):
            ch["loc"] = loc.astype(float)
            ch["coord_frame"] = FIFF.FIFFV_COORD_DEVICE
        trans = np.eye(4)
        trans[:3, 3] = r0
        info["dev_head_t"] = mne.transforms.Transform("meg", "head", trans)
    montage = eeg_mod._montage()
    fid = {d["ident"]: d["r"] for d in montage.dig if d["kind"] == FIFF.FIFFV_POINT_CARDINAL}
    head_t = mne.channels.compute_native_head_t(montage)
    to_head = lambda x: mne.transforms.apply_trans(head_t, np.asarray(x))  # noqa: E731
    eeg_pos = np.array([d["r"] for d in montage.dig if d["kind"] == FIFF.FIFFV_POINT_EEG])
    dig = mne.channels.make_dig_montage(
        nasion=to_head(fid[FIFF.FIFFV_POINT_NASION]), lpa=to_head(fid[FIFF.FIFFV_POINT_LPA]),
        rpa=to_head(fid[FIFF.FIFFV_POINT_RPA]), hsp=to_head(eeg_pos), coord_frame="head")
    with mne.utils.use_log_level("error"):
        info.set_montage(dig)
    return info


def build_meg_head_model(atlas, rng: np.random.Generator) -> MEGHead:
    """Sphere-model MEG lead field of the coarse parcels (module docstring)."""
    montage = eeg_mod._montage()
    eeg_info = mne.create_info([n for n in montage.ch_names if n not in ("LPA", "RPA", "Nz")],
                               1000.0, "eeg")
    with mne.utils.use_log_level("error"):
        eeg_info.set_montage(montage, on_missing="ignore")
        scalp = mne.make_sphere_model("auto", "auto", eeg_info)
    r0 = np.asarray(scalp["r0"], dtype=float)
    inner = float(scalp["layers"][0]["rad"])
    info = sensor_info(r0)
    sphere = mne.make_sphere_model(r0=r0, head_radius=None, verbose="error")

    pos_mm, parcel = eeg_mod._dipole_positions(atlas, rng)
    pos = mne.transforms.apply_trans(mne.channels.compute_native_head_t(montage), pos_mm / 1000.0)
    dist = np.linalg.norm(pos - r0, axis=1)
    scale = min(1.0, (inner - eeg_mod.MINDIST_M - 0.003) / dist.max())
    pos = r0 + (pos - r0) * scale
    radial = (pos - r0) / np.linalg.norm(pos - r0, axis=1, keepdims=True)
    ori = rng.standard_normal(pos.shape)
    ori -= (ori * radial).sum(1, keepdims=True) * radial  # tangential
    ori /= np.linalg.norm(ori, axis=1, keepdims=True)
    src = mne.setup_volume_source_space(pos={"rr": pos, "nn": ori}, verbose="error")
    with mne.utils.use_log_level("error"):
        fwd = mne.make_forward_solution(info, trans=None, src=src, bem=sphere, meg=True,
                                        eeg=False, mindist=0.0, n_jobs=1)
    n_src = fwd["nsource"]
    if n_src != len(pos):
        raise RuntimeError(f"MEG forward model dropped {len(pos) - n_src} of {len(pos)} dipoles")
    n_ch = len(info["ch_names"])
    g_free = fwd["sol"]["data"].reshape(n_ch, n_src, 3)
    g_fixed = np.einsum("csk,sk->cs", g_free, ori)
    gain = np.zeros((n_ch, atlas.n_coarse))
    np.add.at(gain.T, parcel, g_fixed.T)
    gain /= np.bincount(parcel, minlength=atlas.n_coarse)[None, :]
    mags = mne.pick_types(info, meg="mag")
    grads = mne.pick_types(info, meg="grad")
    LOGGER.info("MEG lead field: %d magnetometers + %d gradiometers x %d dipoles (%d parcels)",
                len(mags), len(grads), n_src, atlas.n_coarse)
    return MEGHead(ch_names=list(info["ch_names"]), info=info, gain=gain, mag_picks=mags,
                   grad_picks=grads, dipole_pos=pos, dipole_ori=ori, dipole_parcel=parcel,
                   sphere_r0=r0, sphere_radius=float(scalp.radius), inner_skull_radius=inner,
                   source_scale=float(scale))


def add_sensor_noise(rng: np.random.Generator, data: np.ndarray, head: MEGHead, sfreq: float,
                     line_freq: float) -> None:
    """White sensor noise, slow drift and line noise (with two harmonics), in place (T, T/m)."""
    from samba_pipeline.simulate.neural import slow_process

    n_ch, n = data.shape
    unit = np.full(n_ch, 1e-15)  # fT
    unit[head.grad_picks] = 1e-13  # fT/cm in T/m
    noise = np.where(np.isin(np.arange(n_ch), head.grad_picks), GRAD_NOISE_FT_CM, MAG_NOISE_FT)
    data += rng.standard_normal((n_ch, n)) * (noise * unit)[:, None]
    t = np.arange(n) / sfreq
    n_slow = int(np.ceil(n / sfreq)) + 2
    slow = slow_process(rng, n_ch, n_slow, 1.0, band=(0.002, 0.05))
    slow_t = np.arange(n_slow, dtype=float)
    for c in range(n_ch):  # one interpolation per channel keeps memory at one row
        data[c] += np.interp(t, slow_t, slow[c]) * DRIFT_FT * unit[c]
    amp = rng.uniform(0.5, 1.5, n_ch) * LINE_NOISE_FT * unit
    for h, rel in ((1, 1.0), (2, 0.3), (3, 0.1)):
        if h * line_freq < sfreq / 2:
            phase = rng.uniform(0, 2 * np.pi, n_ch)
            data += (rel * amp)[:, None] * np.sin(2 * np.pi * h * line_freq * t[None, :]
                                                  + phase[:, None])


def write_meg(root: Path, sub: str, data: np.ndarray, head: MEGHead, sfreq: float,
              meas_date: dt.datetime, *, session: str, task: str, events: dict,
              description: str) -> Path:
    """Write one FIF MEG recording with mne-bids; ``events`` as for the EEG writer."""
    import mne_bids

    from samba_pipeline.simulate import dataset as ds

    info = head.info.copy()
    with info._unlock():
        info["sfreq"] = float(sfreq)
        info["line_freq"] = ds.LINE_FREQ
        info["lowpass"] = float(sfreq) / 2
    descriptions = list(events["trial_type"])
    event_id = {name: ds.STIMULUS_CODE + i for i, name in enumerate(sorted(set(descriptions)))}
    with mne.utils.use_log_level("error"), warnings.catch_warnings():
        raw = mne.io.RawArray(data, info, verbose="error")
        raw.set_meas_date(meas_date)
        raw.set_annotations(mne.Annotations(onset=np.asarray(events["onset"]),
                                            duration=np.asarray(events["duration"]),
                                            description=descriptions, orig_time=meas_date))
        bids_path = ds._bids_path(root, sub, session, task, datatype="meg")
        warnings.filterwarnings("ignore", message="Conflicting BIDSVersion", category=UserWarning)
        mne_bids.write_raw_bids(raw, bids_path, format="FIF", allow_preload=True,
                                overwrite=True, event_id=event_id, verbose="error")
    meg_dir = Path(bids_path.directory)
    stem = bids_path.copy().update(datatype=None, suffix=None, extension=None).basename
    ds._add_stim_file(meg_dir / f"{stem}_events.tsv", events)
    sidecar = meg_dir / f"{stem}_meg.json"
    meta = json.loads(sidecar.read_text(encoding="utf-8"))
    meta.update({"TaskDescription": description, "InstitutionName": "n/a (simulated)",
                 "Manufacturer": "n/a (simulated by samba-bids-demo, Vectorview-like helmet)",
                 "DewarPosition": "upright", "SoftwareFilters": "n/a",
                 "DigitizedLandmarks": True, "DigitizedHeadPoints": True})
    ds._write_json(sidecar, meta)
    return meg_dir


__all__ = ["MEGHead", "build_meg_head_model", "add_sensor_noise", "helmet", "sensor_info",
           "write_meg"]
