"""EEG: a real (sphere-model) lead field from MNE and realistic sensor-level artefacts.

* Electrodes: the 10-20 positions of MNE's Colin27 template montage (the template brain of the
  MNI space, so the MNI source positions and the electrodes share one head); recorded against
  FCz (ground AFz), like a Brain Products cap, so neither is a data channel.
* Head model: ``mne.make_sphere_model`` fitted to the electrode positions (4 shells).
* Sources: a discrete source space of a few dipoles per coarse parcel at the parcel's voxel
  positions (MNI mm -> m, Colin27 MRI -> head transform of the montage; scaled about the sphere
  centre only if needed to keep every dipole inside the inner skull), fixed radial orientation.
  ``mne.make_forward_solution`` gives the gain; a parcel's gain is the mean of its dipoles'
  (each carries the parcel's source time course divided by the number of dipoles).
* Sensor data (V): ``gain @ sources`` scaled to tens of microvolts, plus white sensor noise, slow
  drift with DC offsets, 50 Hz line noise (and harmonics), blinks on frontal channels, and one bad
  channel (flat or very noisy), which is *not* marked bad in channels.tsv.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import mne
import numpy as np

from samba_pipeline.errors import SambaUsageError
from samba_pipeline.simulate.neural import slow_process

LOGGER = logging.getLogger("samba_pipeline.simulate")

REFERENCE = "FCz"
GROUND = "AFz"
#: Selection order of the electrodes: the first C names are used (always Fp1, Fp2, Cz, Oz).
#: The first 32 are a standard 32-channel cap, the first 64 a standard 64-channel cap.
_CAP_32 = (
    "Fp1", "Fp2", "Cz", "Oz", "F3", "F4", "C3", "C4", "P3", "P4", "O1", "O2", "F7", "F8", "T7",
    "T8", "P7", "P8", "Fz", "Pz", "FC1", "FC2", "CP1", "CP2", "FC5", "FC6", "CP5", "CP6", "TP9",
    "TP10", "PO9", "PO10",
)
_CAP_64_EXTRA = (
    "AF7", "AF3", "AF4", "AF8", "F5", "F1", "F2", "F6", "FT9", "FT7", "FC3", "FC4", "FT8",
    "FT10", "C5", "C1", "C2", "C6", "TP7", "CP3", "CPz", "CP4", "TP8", "P5", "P1", "P2", "P6",
    "PO7", "PO3", "POz", "PO4", "PO8",
)
_EXCLUDED = {REFERENCE, GROUND, "T3", "T4", "T5", "T6", "M1", "M2", "A1", "A2"}
BLINK_CHANNELS_PREFIX = ("Fp", "AF", "F")

TARGET_BRAIN_UV = 15.0  # median over channels of the std of the brain signal (µV)
SENSOR_NOISE_UV = (1.0, 2.0)
LINE_NOISE_UV = (2.0, 10.0)
DRIFT_UV = 10.0
DC_OFFSET_UV = 40.0
BLINK_RATE_PER_MIN = 12.0
BLINK_AMPLITUDE_UV = (100.0, 180.0)
NOISY_CHANNEL_UV = 80.0
FLAT_CHANNEL_UV = 0.05
DIPOLES_PER_PARCEL = 4
MINDIST_M = 0.007


def _montage() -> mne.channels.DigMontage:
    names = mne.channels.get_builtin_montages()
    return mne.channels.make_standard_montage("colin27_1020" if "colin27_1020" in names else "standard_1020")


def channel_order() -> list[str]:
    """All selectable channel names, in selection priority order."""
    montage_names = _montage().ch_names
    rest = [n for n in montage_names if n not in _EXCLUDED and n not in _CAP_32 and n not in _CAP_64_EXTRA]
    return list(_CAP_32) + list(_CAP_64_EXTRA) + rest


def choose_channels(n_channels: int) -> list[str]:
    """The ``n_channels`` electrodes of the demo cap, in montage order."""
    order = channel_order()
    if not 8 <= n_channels <= len(order):
        raise SambaUsageError(f"--eeg-channels must be between 8 and {len(order)}, got {n_channels}")
    chosen = set(order[:n_channels])
    return [n for n in _montage().ch_names if n in chosen]


@dataclass
class HeadModel:
    ch_names: list[str]
    montage: mne.channels.DigMontage
    gain: np.ndarray  # (n_channels, n_coarse) V per A·m, referenced to FCz
    dipole_pos: np.ndarray  # (n_dipoles, 3) head coordinates, m
    dipole_ori: np.ndarray  # (n_dipoles, 3)
    dipole_parcel: np.ndarray  # (n_dipoles,) 0-based coarse parcel
    sphere_r0: np.ndarray
    sphere_radius: float
    inner_skull_radius: float
    source_scale: float  # scaling applied about r0 to fit the inner skull (1 = none)
    ch_pos: np.ndarray  # (n_channels, 3) head coordinates, m


def _dipole_positions(atlas, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A few voxel positions (MNI mm) per coarse parcel, spread by k-means."""
    from samba_pipeline.simulate.atlas import kmeans

    pos, parcel = [], []
    for c in range(atlas.n_coarse):
        xyz = atlas.voxel_mm(atlas.coarse == c + 1)
        k = min(DIPOLES_PER_PARCEL, len(xyz))
        labels = kmeans(xyz, k, rng)
        for j in range(k):
            pts = xyz[labels == j]
            centre = pts.mean(0)
            pos.append(pts[np.argmin(((pts - centre) ** 2).sum(1))])
            parcel.append(c)
    return np.asarray(pos, dtype=float), np.asarray(parcel, dtype=np.int64)


def build_head_model(atlas, ch_names: list[str], rng: np.random.Generator) -> HeadModel:
    """Sphere-model lead field of the coarse parcels for ``ch_names`` (see module doc)."""
    montage = _montage()
    all_names = list(ch_names) + [REFERENCE]
    info = mne.create_info(all_names, 1000.0, "eeg")
    with mne.utils.use_log_level("error"):
        info.set_montage(montage)
        sphere = mne.make_sphere_model("auto", "auto", info)
    r0 = np.asarray(sphere["r0"], dtype=float)
    radius = float(sphere.radius)
    inner = float(sphere["layers"][0]["rad"])

    pos_mm, parcel = _dipole_positions(atlas, rng)
    mri_head = mne.channels.compute_native_head_t(montage)
    pos = mne.transforms.apply_trans(mri_head, pos_mm / 1000.0)
    dist = np.linalg.norm(pos - r0, axis=1)
    limit = inner - MINDIST_M - 0.003
    scale = min(1.0, limit / dist.max())
    pos = r0 + (pos - r0) * scale
    ori = pos - r0
    ori /= np.linalg.norm(ori, axis=1, keepdims=True)

    src = mne.setup_volume_source_space(pos={"rr": pos, "nn": ori}, verbose="error")
    with mne.utils.use_log_level("error"):
        fwd = mne.make_forward_solution(
            info, trans=None, src=src, bem=sphere, meg=False, eeg=True, mindist=MINDIST_M / 2,
            n_jobs=1,
        )
    n_src = fwd["nsource"]
    if n_src != len(pos):
        raise RuntimeError(f"forward model dropped {len(pos) - n_src} of {len(pos)} demo dipoles")
    g_free = fwd["sol"]["data"].reshape(len(all_names), n_src, 3)
    g_fixed = np.einsum("csk,sk->cs", g_free, ori)  # radial, fixed orientation
    ref = all_names.index(REFERENCE)
    g_ref = np.delete(g_fixed - g_fixed[ref], ref, axis=0)
    gain = np.zeros((len(ch_names), atlas.n_coarse))
    counts = np.bincount(parcel, minlength=atlas.n_coarse)
    np.add.at(gain.T, parcel, g_ref.T)
    gain /= counts[None, :]
    ch_pos = np.array([info["chs"][i]["loc"][:3] for i in range(len(ch_names))])
    LOGGER.info(
        "Lead field: %d channels x %d dipoles (%d parcels), sphere R=%.1f mm, source scale %.2f",
        len(ch_names), n_src, atlas.n_coarse, radius * 1000, scale,
    )
    return HeadModel(
        ch_names=list(ch_names),
        montage=montage,
        gain=gain,
        dipole_pos=pos,
        dipole_ori=ori,
        dipole_parcel=parcel,
        sphere_r0=r0,
        sphere_radius=radius,
        inner_skull_radius=inner,
        source_scale=float(scale),
        ch_pos=ch_pos,
    )


@dataclass
class SensorArtefacts:
    bad_channel: str
    bad_kind: str
    blink_onsets_s: np.ndarray


def add_sensor_artefacts(
    rng: np.random.Generator,
    data: np.ndarray,
    head: HeadModel,
    sfreq: float,
    line_freq: float,
    bad_kind: str,
) -> SensorArtefacts:
    """Add noise, drift, line noise, blinks and one bad channel to ``data`` (V), in place."""
    n_ch, n = data.shape
    uv = 1e-6
    t = np.arange(n) / sfreq

    data += rng.standard_normal((n_ch, n)) * (rng.uniform(*SENSOR_NOISE_UV, n_ch) * uv)[:, None]

    # slow drift: DC offset + linear trend + slow random fluctuation (< 0.05 Hz)
    n_slow = int(np.ceil(n / sfreq)) + 2
    slow = slow_process(rng, n_ch, n_slow, 1.0, band=(0.002, 0.05))
    slow_t = np.arange(n_slow, dtype=float)
    for c in range(n_ch):
        drift = np.interp(t, slow_t, slow[c]) * DRIFT_UV
        drift += rng.uniform(-DC_OFFSET_UV, DC_OFFSET_UV)
        drift += rng.uniform(-20.0, 20.0) * (t / t[-1] - 0.5)
        data[c] += drift * uv

    # line noise and harmonics below Nyquist
    amp = rng.uniform(*LINE_NOISE_UV, n_ch) * uv
    for h, rel in ((1, 1.0), (2, 0.3), (3, 0.1)):
        f = h * line_freq
        if f >= sfreq / 2:
            continue
        phase = rng.uniform(0, 2 * np.pi, n_ch)
        data += (rel * amp)[:, None] * np.sin(2 * np.pi * f * t[None, :] + phase[:, None])

    # blinks: Poisson process, ~12/min, 0.15-0.4 s wide, strongest on Fp1/Fp2
    onsets = []
    tcur = rng.exponential(60.0 / BLINK_RATE_PER_MIN)
    while tcur < n / sfreq - 1.0:
        onsets.append(tcur)
        tcur += 0.5 + rng.exponential(60.0 / BLINK_RATE_PER_MIN)
    onsets = np.asarray(onsets)
    fp = [head.ch_names.index(c) for c in ("Fp1", "Fp2")]
    eye = head.ch_pos[fp].mean(0)
    eye = eye + np.array([0.0, 0.02, -0.03])  # in front of and below Fp1/Fp2
    ref_pos = _ref_position(head)
    w = np.exp(-np.linalg.norm(head.ch_pos - eye, axis=1) / 0.03)
    w_ref = np.exp(-np.linalg.norm(ref_pos - eye) / 0.03)
    w = (w - w_ref) / np.exp(-np.linalg.norm(head.ch_pos[fp[0]] - eye) / 0.03)
    for on in onsets:
        width = rng.uniform(0.05, 0.09)
        a = rng.uniform(*BLINK_AMPLITUDE_UV) * uv
        centre = on + 2.5 * width
        i0, i1 = int(max(0, (on) * sfreq)), int(min(n, (on + 5 * width) * sfreq))
        shape = np.exp(-0.5 * ((t[i0:i1] - centre) / width) ** 2)
        data[:, i0:i1] += a * w[:, None] * shape[None, :]

    # one bad channel (never one of Fp1, Fp2, Cz, Oz or a frontal blink channel)
    candidates = [
        c for c in head.ch_names
        if c not in ("Fp1", "Fp2", "Cz", "Oz") and not c.startswith(BLINK_CHANNELS_PREFIX)
    ]
    bad = candidates[int(rng.integers(len(candidates)))]
    i = head.ch_names.index(bad)
    if bad_kind == "flat":
        data[i] = rng.standard_normal(n) * FLAT_CHANNEL_UV * uv
    else:
        noisy = rng.standard_normal(n) * NOISY_CHANNEL_UV * uv
        noisy += np.interp(t, slow_t, slow_process(rng, 1, n_slow, 1.0, band=(0.01, 0.2))[0]) * 150 * uv
        n_pops = max(1, int(n / sfreq / 20))
        for p in rng.integers(0, n, n_pops):  # electrode "pops": steps that decay
            seg = np.arange(n - p)
            noisy[p:] += rng.choice([-1, 1]) * rng.uniform(200, 400) * uv * np.exp(-seg / (0.5 * sfreq))
        data[i] += noisy
    return SensorArtefacts(bad_channel=bad, bad_kind=bad_kind, blink_onsets_s=onsets)


def _ref_position(head: HeadModel) -> np.ndarray:
    """Head-coordinate position (m) of the reference electrode."""
    info = mne.create_info([REFERENCE], 1000.0, "eeg")
    with mne.utils.use_log_level("error"):
        info.set_montage(head.montage)
    return info["chs"][0]["loc"][:3]


# --------------------------------------------------------------------------------------------
# MR artefacts of simultaneous EEG-fMRI (demo option --mr-artifacts)
# --------------------------------------------------------------------------------------------

GRADIENT_PEAK_UV = 2000.0
SLICES_PER_VOLUME = 30
BCG_UV = 60.0
ECG_MV = 1.0


def add_gradient_artefact(rng: np.random.Generator, data: np.ndarray, sfreq: float,
                          trigger_samples: np.ndarray, tr: float,
                          n_slices: int = SLICES_PER_VOLUME) -> np.ndarray:
    """Add a volume-locked gradient artefact to ``data`` (V), in place; returns it (n_ch, n).

    Each volume has ``n_slices`` slice-selection / read-out gradient pulses (derivatives of
    Gaussians, as the induced voltage follows dB/dt; 2 samples wide so they stay sampled
    faithfully). The scanner and EEG clocks are not synchronised: each volume starts up to one
    sample *before* its trigger sample (a uniform fraction), which is what the sub-sample
    alignment of the correction has to find. The amplitude drifts by a few percent over the
    run (head position), and every channel has its own gain and sign (loop area).
    """
    n_ch, n = data.shape
    length = int(round(tr * sfreq))
    tau = np.arange(length) / sfreq
    width = 2.0 / sfreq
    centres = (np.arange(n_slices)[:, None] * tr / n_slices
               + np.array([0.004, 0.012, 0.022, 0.030])[None, :]).ravel()
    signs = np.tile([1.0, -0.6, 0.8, -1.0], n_slices)
    jitter = rng.uniform(0.0, 1.0, len(trigger_samples)) / sfreq
    drift = 1.0 + 0.05 * np.sin(2 * np.pi * np.arange(len(trigger_samples)) / 97.0
                                + rng.uniform(0, 2 * np.pi))
    # (n_vol, L) waveform of each volume at its own fractional onset
    wave = np.zeros((len(trigger_samples), length))
    base = tau[None, :] + jitter[:, None]
    for centre, sign in zip(centres, signs):  # (n_vol, L) per pulse: bounded memory
        shifted = base - centre
        wave += sign * (-shifted / width) * np.exp(-0.5 * (shifted / width) ** 2)
    wave *= drift[:, None]
    wave /= np.abs(wave).max()
    gain = rng.uniform(0.3, 1.5, n_ch) * rng.choice([-1.0, 1.0], n_ch) * GRADIENT_PEAK_UV * 1e-6
    artefact = np.zeros_like(data)
    for k, start in enumerate(trigger_samples):
        stop = min(n, start + length)
        if start >= n:
            break
        artefact[:, start:stop] = gain[:, None] * wave[k, : stop - start][None, :]
    data += artefact
    return artefact


def add_cardiac(rng: np.random.Generator, data: np.ndarray, sfreq: float,
                ch_pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Add a ballistocardiogram to ``data`` (V) in place; returns ``(ecg (n,), r_peak_samples,
    bcg (n_ch, n))``.

    Heartbeats at about 67 bpm with slow rate variability; the ECG has a QRS complex and a T
    wave. Each beat adds, 0.15-0.6 s after its R peak, two waveforms with smooth scalp maps
    (pulse-driven rotation and translation of the head in the field), with 10 % beat-to-beat
    amplitude variability.
    """
    n_ch, n = data.shape
    t = np.arange(n) / sfreq
    peaks, tcur = [], rng.uniform(0.2, 0.8)
    while tcur < t[-1]:
        peaks.append(tcur)
        tcur += 0.9 + 0.05 * np.sin(2 * np.pi * tcur / 17.0) + 0.02 * rng.standard_normal()
    peaks = np.asarray(peaks)
    ecg = 5e-6 * rng.standard_normal(n)
    bcg = np.zeros_like(data)
    direction = rng.standard_normal((2, 3))
    centred = ch_pos - ch_pos.mean(0)
    maps = centred @ direction.T  # (n_ch, 2) smooth scalp maps
    maps /= np.abs(maps).max(0, keepdims=True)
    span = int(0.8 * sfreq)
    for p in peaks:
        i0 = int(p * sfreq)
        seg = slice(max(0, i0 - int(0.1 * sfreq)), min(n, i0 + span))
        tau = t[seg] - p
        ecg[seg] += ECG_MV * 1e-3 * (np.exp(-0.5 * (tau / 0.01) ** 2)
                                     + 0.3 * np.exp(-0.5 * ((tau - 0.25) / 0.04) ** 2))
        lobe1 = np.exp(-0.5 * ((tau - 0.25) / 0.05) ** 2) - 0.5 * np.exp(-0.5 * ((tau - 0.4) / 0.06) ** 2)
        lobe2 = np.exp(-0.5 * ((tau - 0.32) / 0.08) ** 2)
        amp = BCG_UV * 1e-6 * (1.0 + 0.1 * rng.standard_normal())
        bcg[:, seg] += amp * (maps[:, :1] * lobe1[None, :] + 0.7 * maps[:, 1:] * lobe2[None, :])
    data += bcg
    return ecg, np.rint(peaks * sfreq).astype(np.int64), bcg
