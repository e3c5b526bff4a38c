"""Write the offline demo dataset: BIDS raw EEG-fMRI, fMRIPrep-like derivatives, atlases, truth.

The layout and the ground-truth keys are fixed by docs/dataflow.md, section 1. Everything is
deterministic for a seed: every random stream is ``numpy.random.default_rng([seed, subject,
stream])``, so subject 1 is the same whatever the number of subjects, and every date written is
fixed.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import logging
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from samba_pipeline.__about__ import __version__
from samba_pipeline.errors import SambaOutputError, SambaUsageError
from samba_pipeline.simulate import bold as bold_mod
from samba_pipeline.simulate import eeg as eeg_mod
from samba_pipeline.simulate.atlas import (
    ATLAS_NAME,
    TEMPLATE,
    DemoAtlas,
    build_demo_atlas,
)
from samba_pipeline.simulate.neural import (
    BAND_NAMES,
    BANDS,
    LOG_POWER_SD,
    interp_rows,
    simulate_neural,
)

LOGGER = logging.getLogger("samba_pipeline.simulate")

BIDS_VERSION = "1.10.0"
TASK = "rest"
LINE_FREQ = 50.0
SPACE = TEMPLATE
DEFAULT_COARSE_PARCELS = 20
DEFAULT_FINE_PARCELS = 50
NON_STEADY_STATE_VOLUMES = 2
TRIGGER = "R128"
TRIGGER_CODE = 128
STIMULUS_CODE = 10
ECG_CHANNEL = "ECG"
MEAS_DATE = dt.datetime(2024, 1, 1, 9, 0, 0, tzinfo=dt.UTC)
#: Random stream ids (the third entry of the seed sequence).
_STREAM = {"timing": 1, "neural": 2, "head": 3, "sensor": 4, "hrf": 5, "motion": 6, "voxels": 7,
           "participant": 8, "neural_mri": 9, "stimulus": 10, "mr": 11, "conditions": 12}


@dataclass(frozen=True)
class DemoSettings:
    subjects: int = 2
    minutes: float = 5.0
    seed: int = 42
    resolution_mm: float = 4.0
    eeg_channels: int = 32
    eeg_sfreq: float = 500.0
    tr: float = 2.0
    coarse_parcels: int = DEFAULT_COARSE_PARCELS
    fine_parcels: int = DEFAULT_FINE_PARCELS
    non_steady_state_volumes: int = NON_STEADY_STATE_VOLUMES
    #: EEG with uncorrected MR gradient and ballistocardiogram artefacts, plus an ECG channel
    mr_artifacts: bool = False
    #: EEG/MEG and fMRI in separate sessions (ses-eeg/ses-meg, ses-mri) watching one stimulus
    non_simultaneous: bool = False
    #: MEG (FIF, 102 magnetometers + 204 planar gradiometers) instead of EEG; non-simultaneous
    meg: bool = False
    #: Stimulus conditions (simultaneous runs): blocks of cond1..condN that raise the band power
    #: of one network each, written as func events.tsv (simulate.conditions); 0 = rest only
    conditions: int = 0

    @property
    def n_volumes(self) -> int:
        return round(self.minutes * 60.0 / self.tr)

    def check(self) -> None:
        if self.subjects < 1:
            raise SambaUsageError(f"--subjects must be at least 1, got {self.subjects}")
        if not 0.5 <= self.tr <= 10.0:
            raise SambaUsageError(f"--tr must be between 0.5 and 10 s, got {self.tr}")
        if self.eeg_sfreq < 200.0 or self.eeg_sfreq > 20000.0:
            raise SambaUsageError(f"--eeg-sfreq must be between 200 and 20000 Hz, got {self.eeg_sfreq}")
        if self.minutes <= 0 or self.n_volumes < self.non_steady_state_volumes + 20:
            raise SambaUsageError(
                f"--minutes {self.minutes} gives {self.n_volumes} volumes at TR {self.tr} s; "
                f"at least {self.non_steady_state_volumes + 20} are needed"
            )
        if self.non_steady_state_volumes < 0:
            raise SambaUsageError("non_steady_state_volumes must be >= 0")
        if self.meg and not self.non_simultaneous:
            raise SambaUsageError("MEG cannot be recorded inside an MR scanner: the MEG demo is "
                                  "non-simultaneous (--non-simultaneous)")
        if self.conditions and self.non_simultaneous:
            raise SambaUsageError("--conditions applies to simultaneous EEG-fMRI runs; it cannot be "
                                  "combined with --non-simultaneous or --meg")
        if self.conditions < 0:
            raise SambaUsageError("--conditions must be >= 0")
        if self.mr_artifacts and self.non_simultaneous:
            raise SambaUsageError("--mr-artifacts belongs to simultaneous EEG-fMRI; it cannot be "
                                  "combined with --non-simultaneous or --meg")
        if self.non_simultaneous and self.n_volumes * self.tr < 60.0:
            raise SambaUsageError(f"the non-simultaneous demo needs fMRI runs of at least 60 s "
                                  f"(--minutes {self.minutes} at TR {self.tr} s is shorter)")


def _rng(seed: int, subject: int, stream: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(subject), _STREAM[stream]])


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_tsv(path: Path, table: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, sep="\t", index=False, na_rep="n/a", lineterminator="\n")


def _save_nifti(img: nib.Nifti1Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def _bold_image(data: np.ndarray, atlas: DemoAtlas, tr: float, xform_code: int) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, atlas.affine)
    hdr = img.header
    hdr.set_xyzt_units("mm", "sec")
    zooms = (float(atlas.resolution_mm),) * 3 + (float(tr),)
    hdr.set_zooms(zooms[: data.ndim])
    hdr.set_qform(atlas.affine, code=xform_code)
    hdr.set_sform(atlas.affine, code=xform_code)
    hdr.set_slope_inter(1.0, 0.0)
    return img


def _is_demo_output(path: Path, marker: str) -> bool:
    """Whether ``path`` holds an earlier samba-bids-demo output (safe to delete)."""
    try:
        meta = json.loads((path / marker).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if marker == "dataset_description.json":
        names = [g.get("Name") for g in meta.get("GeneratedBy", []) if isinstance(g, dict)]
        return "samba-bids-demo" in names
    return meta.get("generator") == "samba-bids-demo"


def _check_dir(path: Path, marker: str, overwrite: bool, what: str) -> bool:
    """Check that ``path`` can be written; returns whether it must be cleared first."""
    if path.exists() and not path.is_dir():
        raise SambaOutputError(f"{what} exists and is not a directory", path)
    if not (path.is_dir() and any(path.iterdir())):
        return False
    if not overwrite:
        raise SambaOutputError(
            f"{what} is not empty; choose an empty or new directory, or pass --overwrite", path
        )
    if not _is_demo_output(path, marker):
        raise SambaOutputError(
            f"{what} is not empty and is not an earlier samba-bids-demo output (see its "
            f"{marker}); refusing to delete it even with --overwrite", path
        )
    return True


def default_truth_dir(outdir: Path) -> Path:
    outdir = Path(outdir).resolve()
    return outdir.parent / f"{outdir.name}_groundtruth"


# --- atlas derivative --------------------------------------------------------------------------


def atlas_paths(root: Path, atlas: DemoAtlas) -> dict[str, Path]:
    base = Path(root) / "derivatives" / "atlases" / f"tpl-{TEMPLATE}"
    out = {}
    for kind, n in (("coarse", atlas.n_coarse), ("fine", atlas.n_fine)):
        stem = atlas.file_stem(n)
        out[f"{kind}_nifti"] = base / f"{stem}.nii.gz"
        out[f"{kind}_tsv"] = base / f"{stem}.tsv"
    return out


def write_atlas_derivative(root: Path, atlas: DemoAtlas) -> dict[str, Path]:
    adir = Path(root) / "derivatives" / "atlases"
    _write_json(
        adir / "dataset_description.json",
        {
            "Name": "DemoNested demo atlas pair (samba-bids demo)",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "License": "CC0",
            "GeneratedBy": [{"Name": "samba-bids-demo", "Version": __version__}],
        },
    )
    _write_json(
        adir / f"atlas-{ATLAS_NAME}_description.json",
        {
            "Name": ATLAS_NAME,
            "Description": (
                "Demo atlas pair for the samba-bids demo data: k-means clusters of cortical "
                "gray-matter voxels of nilearn's MNI152 gray-matter template, assigned to 7 "
                "networks by a fixed spatial rule; the fine parcels are nested in the coarse "
                "ones. Not a published parcellation; do not use for research."
            ),
            "Authors": ["samba-bids developers"],
            "License": "CC0",
            "SpatialReference": {"res": atlas.res_label, "template": TEMPLATE},
            "Scales": [atlas.n_coarse, atlas.n_fine],
        },
    )
    paths = atlas_paths(root, atlas)
    for kind, table, labels in (
        ("coarse", atlas.coarse_table, atlas.coarse),
        ("fine", atlas.fine_table, atlas.fine),
    ):
        _save_nifti(atlas.image(labels), paths[f"{kind}_nifti"])
        _write_tsv(paths[f"{kind}_tsv"], table)
    return paths


# --- one subject -------------------------------------------------------------------------------


def _bids_path(root: Path, sub: str, session: str | None = None, task: str = TASK,
               datatype: str = "eeg"):
    import mne_bids

    return mne_bids.BIDSPath(subject=sub, session=session, task=task, datatype=datatype, root=root)


def _write_eeg(root: Path, sub: str, data: np.ndarray, head, sfreq: float,
               trigger_samples: np.ndarray, meas_date: dt.datetime, *, session: str | None = None,
               task: str = TASK, events: dict | None = None, ecg: np.ndarray | None = None,
               description: str | None = None) -> Path:
    """Write one BrainVision EEG recording with mne-bids.

    The events are the scanner volume triggers (``trigger_samples``), or ``events``
    (``onset`` s, ``duration`` s, ``trial_type``, ``stim_file``: stimulus segments of a
    non-simultaneous session), whose ``stim_file`` column is added to events.tsv. ``ecg`` (V)
    adds an ECG channel (ballistocardiogram correction needs it).
    """
    import mne
    import mne_bids

    names, types = list(head.ch_names), ["eeg"] * len(head.ch_names)
    if ecg is not None:
        names.append(ECG_CHANNEL)
        types.append("ecg")
        data = np.vstack([data, ecg[None, :]])
    info = mne.create_info(names, sfreq, types)
    if events is None:
        onsets, durations = trigger_samples / sfreq, np.zeros(len(trigger_samples))
        descriptions, event_id = [TRIGGER] * len(trigger_samples), {TRIGGER: TRIGGER_CODE}
    else:
        onsets, durations = np.asarray(events["onset"]), np.asarray(events["duration"])
        descriptions = list(events["trial_type"])
        event_id = {name: STIMULUS_CODE + i for i, name in enumerate(sorted(set(descriptions)))}
    with mne.utils.use_log_level("error"), warnings.catch_warnings():
        raw = mne.io.RawArray(data, info, verbose="error")
        raw.set_montage(head.montage)
        raw.set_meas_date(meas_date)
        raw.info["line_freq"] = LINE_FREQ
        raw.set_annotations(mne.Annotations(onset=onsets, duration=durations,
                                            description=descriptions, orig_time=meas_date))
        bids_path = _bids_path(root, sub, session, task)
        # our dataset_description.json (BIDS 1.10.0) is kept: silence mne-bids' version notice
        warnings.filterwarnings("ignore", message="Conflicting BIDSVersion", category=UserWarning)
        mne_bids.write_raw_bids(
            raw, bids_path, format="BrainVision", allow_preload=True, overwrite=True,
            event_id=event_id, verbose="error",
        )
    eeg_dir = Path(bids_path.directory)
    stem = bids_path.copy().update(datatype=None, suffix=None, extension=None).basename
    if events is None:
        # Brain Products writes the volume marker as a "Response" marker "R128"
        vmrk = eeg_dir / f"{stem}_eeg.vmrk"
        text = vmrk.read_text(encoding="utf-8")
        vmrk.write_text(text.replace(f"Stimulus,S{TRIGGER_CODE},", f"Response,{TRIGGER},"),
                        encoding="utf-8")
    else:
        _add_stim_file(eeg_dir / f"{stem}_events.tsv", events)
    sidecar = eeg_dir / f"{stem}_eeg.json"
    meta = json.loads(sidecar.read_text(encoding="utf-8"))
    meta.update(
        {
            "TaskDescription": description or (
                "Simulated eyes-open rest during simultaneous EEG-fMRI (samba-bids demo). The "
                "EEG is given as after MR gradient and ballistocardiogram correction."
            ),
            "InstitutionName": "n/a (simulated)",
            "Manufacturer": "n/a (simulated by samba-bids-demo)",
            "EEGReference": eeg_mod.REFERENCE,
            "EEGGround": f"{eeg_mod.GROUND}",
            "CapManufacturer": "n/a",
            "SoftwareFilters": "n/a",
            "HardwareFilters": "n/a",
        }
    )
    _write_json(sidecar, meta)
    return eeg_dir


def _add_stim_file(path: Path, events: dict) -> None:
    """Add the ``stim_file`` column to an events.tsv mne-bids wrote (rows in onset order)."""
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    order = np.argsort(np.asarray(events["onset"], dtype=float), kind="stable")
    if len(table) != len(order):
        raise RuntimeError(f"{path}: {len(table)} rows written for {len(order)} events")
    table["stim_file"] = [events["stim_file"][i] for i in order]
    _write_tsv(path, table)


def simulate_bold(index: int, settings: DemoSettings, atlas: DemoAtlas, neural,
                  onsets: np.ndarray) -> dict:
    """Noise-free and synthetic BOLD of one run, volume k acquired at ``onsets[k]`` (s, on the
    clock of ``neural``): the drive is the coupled, z-scored log band power of ``neural``."""
    seed, tr = settings.seed, float(settings.tr)
    n_vol, nss = len(onsets), settings.non_steady_state_volumes
    z_env = neural.log_power / LOG_POWER_SD
    drive = np.einsum("b,cbt->ct", bold_mod.COUPLING, z_env)
    rng_hrf = _rng(seed, index, "hrf")
    hrf = bold_mod.draw_hrf_parameters(rng_hrf, atlas.n_fine)
    amp = rng_hrf.uniform(0.6, 1.4, atlas.n_fine)  # BOLD amplitude, percent signal change
    response = bold_mod.hemodynamic_response(drive, hrf, atlas.fine_to_coarse)
    y = interp_rows(neural.env_times, response, onsets).T  # (n_vol, n_fine)
    y = (y - y.mean(0)) / y.std(0)
    bold_clean = y * amp[None, :]
    bold_clean -= bold_clean.mean(0)

    motion, motion_events = bold_mod.simulate_motion(_rng(seed, index, "motion"), n_vol, nss)
    vols = bold_mod.synthesize_volumes(
        _rng(seed, index, "voxels"), atlas, bold_clean, motion, motion_events, nss
    )
    confounds, confounds_meta = bold_mod.make_confounds(vols, motion, tr)
    return {"bold_clean": bold_clean, "hrf": hrf, "amp": amp, "motion": motion,
            "motion_events": motion_events, "vols": vols, "confounds": confounds,
            "confounds_meta": confounds_meta}


def write_bold(bids_root: Path, rel: str, stem: str, hemo: dict, atlas: DemoAtlas, tr: float,
               task: str, description: str) -> tuple[Path, str]:
    """Write the raw BOLD of ``hemo`` (from :func:`simulate_bold`) under ``rel/func`` and its
    fMRIPrep-like derivatives; returns ``(derivatives func folder, preproc stem)``."""
    vols, confounds, confounds_meta = hemo.pop("vols"), hemo["confounds"], hemo["confounds_meta"]
    func = bids_root / rel / "func"
    _save_nifti(_bold_image(vols.raw, atlas, tr, xform_code=1), func / f"{stem}_bold.nii.gz")
    _write_json(
        func / f"{stem}_bold.json",
        {
            "TaskName": task,
            "RepetitionTime": tr,
            "EchoTime": 0.03,
            "FlipAngle": 90,
            "MagneticFieldStrength": 3,
            "Manufacturer": "n/a (simulated by samba-bids-demo)",
            "TaskDescription": description,
        },
    )
    # fMRIPrep-like derivatives
    fdir = bids_root / "derivatives" / "fmriprep" / rel / "func"
    prep = f"{stem}_space-{SPACE}_desc-preproc_bold"
    _save_nifti(_bold_image(vols.preproc, atlas, tr, xform_code=4), fdir / f"{prep}.nii.gz")
    _write_json(
        fdir / f"{prep}.json",
        {
            "TaskName": task,
            "RepetitionTime": tr,
            "SkullStripped": False,
            "Sources": [f"bids:raw:{rel}/func/{stem}_bold.nii.gz"],
        },
    )
    mask_img = _bold_image(vols.brain_mask.astype(np.uint8), atlas, tr, xform_code=4)
    _save_nifti(mask_img, fdir / f"{stem}_space-{SPACE}_desc-brain_mask.nii.gz")
    _write_json(fdir / f"{stem}_space-{SPACE}_desc-brain_mask.json", {"Type": "Brain"})
    _write_tsv(fdir / f"{stem}_desc-confounds_timeseries.tsv", confounds)
    _write_json(fdir / f"{stem}_desc-confounds_timeseries.json", confounds_meta)
    return fdir, prep


def simulate_subject(
    index: int,
    settings: DemoSettings,
    atlas: DemoAtlas,
    head,
    bids_root: Path,
    truth_dir: Path,
) -> dict:
    """Simulate and write one subject; returns the truth JSON dict."""
    sub = f"{index:02d}"
    seed = settings.seed
    sfreq = float(settings.eeg_sfreq)
    tr = float(settings.tr)
    n_vol = settings.n_volumes
    nss = settings.non_steady_state_volumes
    t_start = time.perf_counter()

    # --- timing ---------------------------------------------------------------------------
    rng = _rng(seed, index, "timing")
    offset_sample = round(rng.uniform(3.0, 10.0) * sfreq)
    trigger_samples = offset_sample + np.round(np.arange(n_vol) * tr * sfreq).astype(np.int64)
    tail_s = rng.uniform(3.0, 6.0)
    n_samples = int(trigger_samples[-1] + round(tr * sfreq) + round(tail_s * sfreq))
    offset_s = offset_sample / sfreq
    onsets = trigger_samples / sfreq

    # --- neural sources and EEG -------------------------------------------------------------
    networks = list(atlas.coarse_table["network"])
    blocks = offset_fn = None
    if settings.conditions:
        from samba_pipeline.simulate import conditions as cond_mod

        blocks = cond_mod.make_blocks(_rng(seed, index, "conditions"), settings.conditions, n_vol * tr)
        offset_fn = lambda t: cond_mod.condition_log_power(  # noqa: E731
            blocks, networks, t, offset_s, len(BANDS))
    neural = simulate_neural(_rng(seed, index, "neural"), networks, n_samples, sfreq,
                             log_power_offset=offset_fn)
    brain = head.gain @ neural.sources
    scale = eeg_mod.TARGET_BRAIN_UV * 1e-6 / float(np.median(brain.std(axis=1)))
    brain *= scale
    sources_am = neural.sources * scale
    neural.sources = None  # free memory
    bad_kind = "noisy" if index % 2 == 1 else "flat"
    artefacts = eeg_mod.add_sensor_artefacts(
        _rng(seed, index, "sensor"), brain, head, sfreq, LINE_FREQ, bad_kind
    )
    eeg = brain
    ecg = r_peaks = None
    description = None
    if settings.mr_artifacts:  # the recording as it comes off an MR-compatible amplifier
        rng_mr = _rng(seed, index, "mr")
        eeg_mod.add_gradient_artefact(rng_mr, eeg, sfreq, trigger_samples, tr)
        ecg, r_peaks, _ = eeg_mod.add_cardiac(rng_mr, eeg, sfreq, head.ch_pos)
        description = ("Simulated eyes-open rest during simultaneous EEG-fMRI (samba-bids demo). "
                       "The EEG holds the MR gradient and ballistocardiogram artefacts "
                       f"(uncorrected); channel {ECG_CHANNEL} is the ECG.")
    meas_date = MEAS_DATE + dt.timedelta(days=index - 1)
    eeg_dir = _write_eeg(bids_root, sub, eeg, head, sfreq, trigger_samples, meas_date, ecg=ecg,
                         description=description)
    del eeg, brain, ecg
    LOGGER.info("sub-%s: EEG %d channels x %d samples (%.1f s) written", sub, len(head.ch_names),
                n_samples, n_samples / sfreq)

    # --- hemodynamics ---------------------------------------------------------------------
    band_power = neural.band_power_at(onsets) * scale**2  # (A·m)^2
    hemo = simulate_bold(index, settings, atlas, neural, onsets)
    bold_clean, hrf, amp, motion, motion_events = (
        hemo[k] for k in ("bold_clean", "hrf", "amp", "motion", "motion_events"))
    stem = f"sub-{sub}_task-{TASK}"
    fdir, prep = write_bold(bids_root, f"sub-{sub}", stem, hemo, atlas, tr, TASK,
                            "Simulated eyes-open rest during simultaneous EEG-fMRI.")
    if blocks is not None:  # onsets from the first volume (BIDS func events)
        _write_tsv(bids_root / f"sub-{sub}" / "func" / f"{stem}_events.tsv", pd.DataFrame(blocks))

    # scans.tsv: add the BOLD run, acquired offset_s after the EEG started
    scans = bids_root / f"sub-{sub}" / f"sub-{sub}_scans.tsv"
    table = pd.read_csv(scans, sep="\t", dtype=str, keep_default_na=False)
    bold_time = (meas_date + dt.timedelta(seconds=offset_s)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    table = pd.concat(
        [table, pd.DataFrame({"filename": [f"func/{stem}_bold.nii.gz"], "acq_time": [bold_time]})],
        ignore_index=True,
    ).sort_values("filename", kind="stable")
    _write_tsv(scans, table)

    # --- ground truth -----------------------------------------------------------------------
    tdir = truth_dir / f"sub-{sub}"
    tdir.mkdir(parents=True, exist_ok=True)
    np.savez(
        tdir / f"{stem}_truth.npz",
        neural=sources_am,
        neural_sfreq=np.float64(sfreq),
        band_power=band_power,
        bands=BANDS.copy(),
        coupling=bold_mod.COUPLING.copy(),
        bold_clean=bold_clean,
        hrf_peak_s=hrf["hrf_peak_s"],
        hrf_undershoot_s=hrf["hrf_undershoot_s"],
        hrf_dispersion=hrf["hrf_dispersion"],
        fine_to_coarse=atlas.fine_to_coarse.copy(),
        volume_onsets_s=onsets,
        motion=motion,
        # extras
        volume_samples=trigger_samples,
        bold_amplitude=amp,
        log_band_power_z=neural.log_power_z_at(onsets),
        gain=head.gain,
        dipole_pos=head.dipole_pos,
        dipole_ori=head.dipole_ori,
        dipole_parcel=head.dipole_parcel,
        blink_onsets_s=artefacts.blink_onsets_s,
        **({} if r_peaks is None else {"r_peak_samples": r_peaks}),
    )
    truth = {
        "subject": sub,
        "offset_s": offset_s,
        "tr": tr,
        "n_volumes": n_vol,
        "eeg_sfreq": sfreq,
        "bad_channels": [artefacts.bad_channel],
        "bad_channel_kind": {artefacts.bad_channel: artefacts.bad_kind},
        "line_freq": LINE_FREQ,
        "n_eeg_samples": n_samples,
        "eeg_duration_s": n_samples / sfreq,
        "eeg_channels": list(head.ch_names),
        "eeg_reference": eeg_mod.REFERENCE,
        "eeg_ground": eeg_mod.GROUND,
        "first_volume_sample": int(trigger_samples[0]),
        "non_steady_state_volumes": nss,
        "band_names": list(BAND_NAMES),
        "coupling": dict(zip(BAND_NAMES, map(float, bold_mod.COUPLING))),
        "motion_events": motion_events,
        "mr_artifacts": bool(settings.mr_artifacts),
        **({"ecg_channel": ECG_CHANNEL, "gradient_slices_per_volume": eeg_mod.SLICES_PER_VOLUME}
           if settings.mr_artifacts else {}),
        "source_scale_am": scale,
        "units": {
            "neural": "A·m",
            "band_power": "(A·m)^2",
            "bold_clean": "percent signal change",
            "gain": "V/(A·m)",
            "motion": "mm (trans_*), rad (rot_*)",
            "dipole_pos": "m, head coordinates",
        },
        "files": {
            "eeg": str((eeg_dir / f"{stem}_eeg.vhdr").relative_to(bids_root)),
            "bold": f"sub-{sub}/func/{stem}_bold.nii.gz",
            "preproc_bold": str((fdir / f"{prep}.nii.gz").relative_to(bids_root)),
        },
    }
    _write_json(tdir / f"{stem}_truth.json", truth)
    LOGGER.info("sub-%s: done in %.1f s (bad channel %s, %s)", sub, time.perf_counter() - t_start,
                artefacts.bad_channel, bad_kind)
    return truth


# --- dataset-level files ---------------------------------------------------------------------


def _dataset_name(settings: DemoSettings) -> str:
    if settings.non_simultaneous:
        return (f"samba-bids demo: simulated {'MEG' if settings.meg else 'EEG'} and fMRI in "
                "separate sessions watching one movie")
    return "samba-bids demo: simulated simultaneous EEG-fMRI at rest"


def _write_raw_description(root: Path, settings: DemoSettings) -> None:
    _write_json(
        root / "dataset_description.json",
        {
            "Name": _dataset_name(settings),
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "raw",
            "License": "CC0",
            "Authors": ["samba-bids developers"],
            "GeneratedBy": [
                {
                    "Name": "samba-bids-demo",
                    "Version": __version__,
                    "Description": f"Simulated with seed {settings.seed}",
                }
            ],
        },
    )


def _write_dataset_files(root: Path, settings: DemoSettings, truth_dir: Path) -> None:
    _write_raw_description(root, settings)
    readme = f"""# samba-bids demo dataset

Simulated simultaneous EEG-fMRI ("rest" task) written by `samba-bids-demo` {__version__}
(seed {settings.seed}). This is synthetic data for testing samba-bids; it contains no data from
any person and must not be used for research.

- EEG: {settings.eeg_channels} channels at {settings.eeg_sfreq:g} Hz, BrainVision, reference
  {eeg_mod.REFERENCE}. Sources are coarse DemoNested parcels projected through a sphere-model
  lead field (MNE). The recording holds the usual artefacts (drift, {LINE_FREQ:g} Hz line noise,
  blinks, one bad channel) but is given as after MR artefact correction. Every fMRI volume has
  a scanner trigger "{TRIGGER}" in the events.
- fMRI: TR {settings.tr:g} s, {settings.n_volumes} volumes, {settings.resolution_mm:g} mm grid in
  {TEMPLATE} space; the first {settings.non_steady_state_volumes} volumes are non-steady-state.
  `derivatives/fmriprep` holds fMRIPrep-like outputs (preprocessed BOLD, brain mask, confounds).
- `derivatives/atlases` holds the DemoNested demo atlas pair (coarse for EEG, fine for fMRI).

The ground truth (sources, band power, noise-free BOLD, HRFs, bad channels) is kept outside the
BIDS folder, in `{truth_dir.name}/`.
"""
    if settings.mr_artifacts:
        readme = readme.replace(
            "but is given as after MR artefact correction.",
            "and the uncorrected MR gradient and ballistocardiogram artefacts (channel "
            f"{ECG_CHANNEL} is the ECG).")
    if settings.non_simultaneous:
        from samba_pipeline.simulate.stimulus import FMRI_SESSION, STIM_EVENT, STIM_TASK

        kind = "MEG" if settings.meg else "EEG"
        readme = f"""# samba-bids demo dataset (non-simultaneous)

Simulated {kind} and fMRI recorded in separate sessions ("{STIM_TASK}" task) while each subject
watched the same movie, written by `samba-bids-demo` {__version__} (seed {settings.seed}).
Synthetic data for testing samba-bids; no data from any person; not for research.

- {kind} in `ses-{kind.lower()}`, fMRI (TR {settings.tr:g} s, {settings.n_volumes} volumes) in
  `ses-{FMRI_SESSION}`. The movie has segments with their own `stim_file` (see `stimuli/`); the
  onset of each is an event `{STIM_EVENT}` in the events.tsv of both sessions. Part of the
  neural activity follows the movie, so the sessions are aligned by these events
  (`samba-bids ... --pairing same-subject`). There are no scanner triggers in the {kind}.
- `derivatives/fmriprep` holds fMRIPrep-like outputs; `derivatives/atlases` the DemoNested
  atlas pair (coarse for {kind}, fine for fMRI).

The ground truth (true offsets between the sessions, sources, noise-free BOLD) is kept outside
the BIDS folder, in `{truth_dir.name}/`.
"""
    (root / "README").write_text(readme, encoding="utf-8")
    (root / "CHANGES").write_text(
        f"1.0.0 {MEAS_DATE.date().isoformat()}\n"
        f"  - Simulated by samba-bids-demo {__version__} (seed {settings.seed}).\n",
        encoding="utf-8",
    )
    rng = _rng(settings.seed, 0, "participant")
    subs = [f"sub-{i:02d}" for i in range(1, settings.subjects + 1)]
    participants = pd.DataFrame(
        {
            "participant_id": subs,
            "age": rng.integers(20, 41, len(subs)),
            "sex": rng.choice(["M", "F"], len(subs)),
            "handedness": rng.choice(["R", "R", "R", "L"], len(subs)),
        }
    )
    _write_tsv(root / "participants.tsv", participants)
    _write_json(
        root / "participants.json",
        {
            "participant_id": {"Description": "Unique participant identifier"},
            "age": {"Description": "Age of the simulated participant", "Units": "year"},
            "sex": {"Description": "Sex of the simulated participant",
                    "Levels": {"M": "male", "F": "female"}},
            "handedness": {"Description": "Handedness of the simulated participant",
                           "Levels": {"R": "right", "L": "left"}},
        },
    )
    _write_json(
        root / "derivatives" / "fmriprep" / "dataset_description.json",
        {
            "Name": "fMRIPrep-like outputs of the samba-bids demo",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "GeneratedBy": [
                {
                    "Name": "samba-bids-demo (fMRIPrep-like)",
                    "Version": __version__,
                    "Description": "Simulated; the demo BOLD is generated in template space.",
                }
            ],
            "DatasetLinks": {"raw": "../../"},
        },
    )


# --- public API ----------------------------------------------------------------------------


def generate_demo_dataset(
    outdir,
    *,
    subjects: int = 2,
    minutes: float = 5.0,
    seed: int = 42,
    resolution_mm: float = 4.0,
    eeg_channels: int = 32,
    eeg_sfreq: float = 500.0,
    tr: float = 2.0,
    coarse_parcels: int = DEFAULT_COARSE_PARCELS,
    fine_parcels: int = DEFAULT_FINE_PARCELS,
    truth_dir=None,
    overwrite: bool = False,
    non_steady_state_volumes: int = NON_STEADY_STATE_VOLUMES,
    mr_artifacts: bool = False,
    non_simultaneous: bool = False,
    meg: bool = False,
    conditions: int = 0,
) -> tuple[Path, Path]:
    """Write the demo dataset to ``outdir`` and its ground truth beside it.

    Returns ``(bids_root, truth_dir)`` (absolute paths). See docs/dataflow.md, section 1.
    Raises :class:`~samba_pipeline.errors.SambaOutputError` (exit code 73) for a non-empty
    ``outdir`` without ``overwrite`` and :class:`~samba_pipeline.errors.SambaUsageError` for
    settings out of range.
    """
    settings = DemoSettings(
        subjects=int(subjects), minutes=float(minutes), seed=int(seed),
        resolution_mm=float(resolution_mm), eeg_channels=int(eeg_channels),
        eeg_sfreq=float(eeg_sfreq), tr=float(tr), coarse_parcels=int(coarse_parcels),
        fine_parcels=int(fine_parcels), non_steady_state_volumes=int(non_steady_state_volumes),
        mr_artifacts=bool(mr_artifacts), non_simultaneous=bool(non_simultaneous), meg=bool(meg),
        conditions=int(conditions),
    )
    settings.check()
    ch_names = eeg_mod.choose_channels(settings.eeg_channels)
    bids_root = Path(outdir).resolve()
    truth = Path(truth_dir).resolve() if truth_dir is not None else default_truth_dir(bids_root)
    if truth == bids_root or bids_root in truth.parents:
        raise SambaUsageError("the ground-truth directory must lie outside the BIDS folder", truth)
    if truth in bids_root.parents:
        raise SambaUsageError("the BIDS folder must not lie inside the ground-truth directory", truth)
    clear = [
        path
        for path, marker, what in (
            (bids_root, "dataset_description.json", "output directory"),
            (truth, "simulation.json", "ground-truth directory"),
        )
        if _check_dir(path, marker, overwrite, what)
    ]
    for path in clear:
        LOGGER.info("Overwriting %s", path)
        shutil.rmtree(path)
    for path in (bids_root, truth):
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SambaOutputError(f"cannot create directory: {err.strerror}", path) from err

    # mark both folders as demo outputs at once, so that --overwrite can clear a partial run
    _write_raw_description(bids_root, settings)
    _write_json(truth / "simulation.json", {"generator": "samba-bids-demo", "version": __version__,
                                             "settings": asdict(settings), "complete": False})

    t0 = time.perf_counter()
    LOGGER.info("Generating the samba-bids demo dataset in %s (truth in %s)", bids_root, truth)
    atlas = build_demo_atlas(settings.resolution_mm, settings.coarse_parcels,
                             settings.fine_parcels, settings.seed)
    apaths = write_atlas_derivative(bids_root, atlas)
    if settings.meg:
        from samba_pipeline.simulate import meg as meg_mod

        head = meg_mod.build_meg_head_model(atlas, _rng(settings.seed, 0, "head"))
    else:
        head = eeg_mod.build_head_model(atlas, ch_names, _rng(settings.seed, 0, "head"))

    subjects_truth = []
    task = TASK
    if settings.non_simultaneous:
        from samba_pipeline.simulate import stimulus as stim_mod

        networks = list(atlas.coarse_table["network"])
        stim = stim_mod.make_stimulus(
            _rng(settings.seed, 0, "stimulus"), networks,
            settings.n_volumes * settings.tr - stim_mod.STIMULUS_MARGIN_S)
        stim_mod.write_stimuli(bids_root, stim)
        task = stim_mod.STIM_TASK
        for i in range(1, settings.subjects + 1):
            subjects_truth.append(stim_mod.simulate_subject_non_simultaneous(
                i, settings, atlas, head, bids_root, truth, stim))
    else:
        for i in range(1, settings.subjects + 1):
            subjects_truth.append(simulate_subject(i, settings, atlas, head, bids_root, truth))
    _write_dataset_files(bids_root, settings, truth)

    _write_json(
        truth / "simulation.json",
        {
            "generator": "samba-bids-demo",
            "version": __version__,
            "settings": asdict(settings),
            "complete": True,
            "n_volumes": settings.n_volumes,
            "bids_root": bids_root.name,
            "task": task,
            "space": SPACE,
            "line_freq": LINE_FREQ,
            "trigger": TRIGGER,
            "eeg_channels": list(head.ch_names),
            "eeg_reference": eeg_mod.REFERENCE,
            "bands": {n: list(map(float, b)) for n, b in zip(BAND_NAMES, BANDS)},
            "coupling": dict(zip(BAND_NAMES, map(float, bold_mod.COUPLING))),
            "hrf_model": (
                "h(t) = G(t; peak/d + 1, d) - G(t; undershoot/d + 1, d) / 6, G = gamma pdf with "
                "shape and scale d (dispersion); drive = sum_b coupling_b * z-scored log band "
                "power of the coarse parent; bold_clean = amplitude * standardised (h * drive) "
                "at the volume onsets (percent signal change)"
            ),
            "atlas": {
                "name": ATLAS_NAME,
                "template": TEMPLATE,
                "resolution_mm": atlas.resolution_mm,
                "n_coarse": atlas.n_coarse,
                "n_fine": atlas.n_fine,
                "coarse": str(apaths["coarse_nifti"].relative_to(bids_root)),
                "fine": str(apaths["fine_nifti"].relative_to(bids_root)),
            },
            "head_model": {
                "type": "sphere (mne.make_sphere_model fitted to the electrodes)",
                "r0_m": [float(v) for v in head.sphere_r0],
                "head_radius_m": head.sphere_radius,
                "inner_skull_radius_m": head.inner_skull_radius,
                "source_scale": head.source_scale,
                "dipoles_per_parcel": eeg_mod.DIPOLES_PER_PARCEL,
                "orientation": "radial, fixed",
            },
            "subjects": [
                {k: t[k] for k in ("subject", "offset_s", "bad_channels", "n_volumes")}
                for t in subjects_truth
            ],
        },
    )
    write_samba_config(truth / DEMO_CONFIG_NAME, apaths["coarse_nifti"], apaths["fine_nifti"])
    LOGGER.info("Demo dataset written in %.1f s", time.perf_counter() - t0)
    return bids_root, truth


DEMO_CONFIG_NAME = "samba-bids-demo.toml"


def write_samba_config(path: Path, coarse: Path, fine: Path) -> Path:
    """A ``samba-bids --config-file`` that points the pipeline at the demo atlases."""
    import tomli_w

    text = (
        "# samba-bids options for the demo dataset: its atlases are DemoNested (built offline),\n"
        "# not the default Schaefer2018 from TemplateFlow.\n"
        "# Relative paths are read relative to this file.\n"
        + tomli_w.dumps({"ephys_atlas": os.path.relpath(Path(coarse).resolve(), path.parent.resolve()),
                         "fmri_atlas": os.path.relpath(Path(fine).resolve(), path.parent.resolve())})
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
