"""Non-simultaneous demo (``samba-bids-demo --non-simultaneous``): EEG/MEG and fMRI recorded in
separate sessions while the subject watched the same stimulus, as in StudyForrest.

* **Stimulus**: ``N_SEGMENTS`` movie segments of equal length with ``SEGMENT_GAP_S`` of blank
  screen between them, the same for every session and subject. While it plays, a share
  ``STIMULUS_SHARE`` of the log band-power variance of every coarse parcel is *stimulus-locked*
  (a function of the time into the stimulus, shared across sessions and subjects); the rest,
  and everything before and after the stimulus, is the session's own
  (:func:`samba_pipeline.simulate.neural.simulate_neural`). So the EEG/MEG of one session
  predicts the fMRI of another once both are put on the stimulus' clock.
* **EEG/MEG session** (``ses-eeg`` or ``ses-meg``): the stimulus starts a random 5-15 s after
  the recording starts; each segment onset is a trigger on an ephys sample, listed in
  events.tsv as ``trial_type = movie_segment`` with its ``stim_file``. No scanner triggers.
* **fMRI session** (``ses-mri``): the stimulus starts a random 4-12 s after volume 0 (to the
  millisecond); events.tsv (``func/``) lists the segment onsets from the presentation log, with
  up to 1 ms of jitter, relative to the start of volume 0 as BIDS defines them.

Truth (``sub-XX/sub-XX_task-movie_truth.json``): ``offset_s`` = the ephys time of fMRI volume 0
on the common stimulus clock (``ephys_stimulus_start_s - fmri_stimulus_start_s``): volume k
lies at ``offset_s + k * TR`` on the ephys clock.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from samba_pipeline.simulate import eeg as eeg_mod
from samba_pipeline.simulate.neural import BAND_NAMES, BANDS, ENV_DT, NETWORK_SHARE, slow_process

LOGGER = logging.getLogger("samba_pipeline.simulate")

STIM_TASK = "movie"
STIM_EVENT = "movie_segment"
N_SEGMENTS = 3
SEGMENT_GAP_S = 2.0
#: Share of the log band-power variance that follows the stimulus while it plays.
STIMULUS_SHARE = 0.8
#: fMRI run time (s) not covered by the stimulus (before + after it).
STIMULUS_MARGIN_S = 20.0
FMRI_PRE_S = (4.0, 12.0)
EPHYS_PRE_S = (5.0, 15.0)
EPHYS_POST_S = (5.0, 10.0)
PRESENTATION_JITTER_S = 0.001
FMRI_SESSION = "mri"


@dataclass
class Stimulus:
    onsets: np.ndarray  # (n_segments,) s from the stimulus start
    durations: np.ndarray  # (n_segments,) s
    files: list[str]  # stim_file of each segment (relative to stimuli/)
    times: np.ndarray  # (n_times,) grid of the stimulus-locked processes, s
    log_power_z: np.ndarray  # (n_coarse, n_bands, n_times) unit-SD stimulus-locked log power
    share: float = STIMULUS_SHARE

    @property
    def total_s(self) -> float:
        return float(self.onsets[-1] + self.durations[-1])


def make_stimulus(rng: np.random.Generator, networks: list[str], total_s: float,
                  n_segments: int = N_SEGMENTS) -> Stimulus:
    """The stimulus of ``total_s`` seconds and its stimulus-locked log band power."""
    seg = round((total_s - (n_segments - 1) * SEGMENT_GAP_S) / n_segments, 3)
    onsets = np.round(np.arange(n_segments) * (seg + SEGMENT_GAP_S), 3)
    durations = np.full(n_segments, seg)
    total = float(onsets[-1] + seg)
    n_times = int(np.ceil(total / ENV_DT)) + 2
    times = ENV_DT * np.arange(n_times)
    net_names = sorted(set(networks))
    net_index = np.array([net_names.index(n) for n in networks])
    n_bands = len(BANDS)
    shared = slow_process(rng, len(net_names) * n_bands, n_times, ENV_DT).reshape(
        len(net_names), n_bands, n_times)
    own = slow_process(rng, len(networks) * n_bands, n_times, ENV_DT).reshape(
        len(networks), n_bands, n_times)
    log_power_z = np.sqrt(NETWORK_SHARE) * shared[net_index] + np.sqrt(1 - NETWORK_SHARE) * own
    files = [f"demo_movie_seg-{i + 1:02d}.json" for i in range(n_segments)]
    return Stimulus(onsets=onsets, durations=durations, files=files, times=times,
                    log_power_z=log_power_z)


def write_stimuli(root: Path, stim: Stimulus) -> None:
    """``stimuli/<stim_file>``: what each segment is (the stim_file the events.tsv name)."""
    from samba_pipeline.simulate.dataset import _write_json

    for i, name in enumerate(stim.files):
        _write_json(Path(root) / "stimuli" / name, {
            "Description": "Segment of the simulated movie of the samba-bids demo (there is no "
                           "video: the stimulus is the stimulus-locked part of the simulated "
                           "neural activity)",
            "Segment": i + 1,
            "OnsetInStimulus": float(stim.onsets[i]),
            "Duration": float(stim.durations[i]),
        })


def _segment_table(stim: Stimulus, onsets: np.ndarray, decimals: int | None = None) -> dict:
    on = np.round(onsets, decimals) if decimals is not None else onsets
    return {"onset": on, "duration": stim.durations.copy(), "trial_type": [STIM_EVENT] * len(on),
            "stim_file": list(stim.files)}


def simulate_subject_non_simultaneous(index: int, settings, atlas, head, bids_root: Path,
                                      truth_dir: Path, stim: Stimulus) -> dict:
    """Simulate and write one subject's EEG/MEG session and fMRI session; returns its truth."""
    from samba_pipeline.simulate import dataset as ds
    from samba_pipeline.simulate.neural import simulate_neural

    sub = f"{index:02d}"
    seed, sfreq, tr, n_vol = settings.seed, float(settings.eeg_sfreq), float(settings.tr), \
        settings.n_volumes
    modality = "meg" if settings.meg else "eeg"
    t_start = time.perf_counter()

    rng = ds._rng(seed, index, "timing")
    pre_f = round(float(rng.uniform(*FMRI_PRE_S)), 3)
    pre_e_samples = int(round(rng.uniform(*EPHYS_PRE_S) * sfreq))
    pre_e = pre_e_samples / sfreq
    post_e = float(rng.uniform(*EPHYS_POST_S))
    jitter = rng.uniform(-PRESENTATION_JITTER_S, PRESENTATION_JITTER_S, len(stim.onsets))
    n_samples = pre_e_samples + int(round((stim.total_s + post_e) * sfreq))
    offset_s = pre_e - pre_f

    # --- EEG/MEG session ----------------------------------------------------------------------
    networks = list(atlas.coarse_table["network"])
    neural = simulate_neural(ds._rng(seed, index, "neural"), networks, n_samples, sfreq,
                             stimulus=(stim, pre_e))
    brain = head.gain @ neural.sources
    scale = (eeg_mod.TARGET_BRAIN_UV * 1e-6 / float(np.median(brain.std(axis=1)))
             if modality == "eeg" else head.scale_for(brain))
    brain *= scale
    sources_am = neural.sources * scale
    neural.sources = None
    # segment triggers on ephys samples (the true stimulus starts exactly at pre_e + onset)
    ephys_onsets = np.round((pre_e + stim.onsets) * sfreq) / sfreq
    events = _segment_table(stim, ephys_onsets)
    meas_date = ds.MEAS_DATE + dt.timedelta(days=index - 1)
    description = (f"Simulated {modality.upper()} while watching a movie of {len(stim.onsets)} "
                   "segments (samba-bids demo); the fMRI of the same movie is in session "
                   f"'{FMRI_SESSION}'.")
    if modality == "eeg":
        bad_kind = "noisy" if index % 2 == 1 else "flat"
        artefacts = eeg_mod.add_sensor_artefacts(ds._rng(seed, index, "sensor"), brain, head,
                                                 sfreq, ds.LINE_FREQ, bad_kind)
        bad = {"bad_channels": [artefacts.bad_channel],
               "bad_channel_kind": {artefacts.bad_channel: artefacts.bad_kind}}
        ephys_dir = ds._write_eeg(bids_root, sub, brain, head, sfreq, np.zeros(0, np.int64),
                                  meas_date, session="eeg", task=STIM_TASK, events=events,
                                  description=description)
    else:
        from samba_pipeline.simulate import meg as meg_mod

        meg_mod.add_sensor_noise(ds._rng(seed, index, "sensor"), brain, head, sfreq,
                                 ds.LINE_FREQ)
        bad = {"bad_channels": [], "bad_channel_kind": {}}
        ephys_dir = meg_mod.write_meg(bids_root, sub, brain, head, sfreq, meas_date,
                                      session="meg", task=STIM_TASK, events=events,
                                      description=description)
    del brain
    ephys_stem = f"sub-{sub}_ses-{modality}_task-{STIM_TASK}"
    ephys_ext = ".vhdr" if modality == "eeg" else ".fif"
    LOGGER.info("sub-%s: %s session, %d samples (%.1f s), stimulus at %.3f s", sub,
                modality.upper(), n_samples, n_samples / sfreq, pre_e)

    # --- fMRI session (another day): only its neural drive matters -----------------------------
    n_env = int(round((n_vol * tr + tr) * sfreq))
    neural_f = simulate_neural(ds._rng(seed, index, "neural_mri"), networks, n_env, sfreq,
                               stimulus=(stim, pre_f), with_sources=False)
    onsets_f = np.arange(n_vol) * tr
    hemo = ds.simulate_bold(index, settings, atlas, neural_f, onsets_f)
    rel = f"sub-{sub}/ses-{FMRI_SESSION}"
    stem_f = f"sub-{sub}_ses-{FMRI_SESSION}_task-{STIM_TASK}"
    fdir, prep = ds.write_bold(bids_root, rel, stem_f, hemo, atlas, tr, STIM_TASK,
                               "Simulated fMRI while watching the demo movie (samba-bids demo).")
    fmri_events = _segment_table(stim, pre_f + stim.onsets + jitter, decimals=4)
    ds._write_tsv(bids_root / rel / "func" / f"{stem_f}_events.tsv", pd.DataFrame(fmri_events))
    scans_time = (meas_date + dt.timedelta(days=7)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    ds._write_tsv(bids_root / rel / f"sub-{sub}_ses-{FMRI_SESSION}_scans.tsv", pd.DataFrame(
        {"filename": [f"func/{stem_f}_bold.nii.gz"], "acq_time": [scans_time]}))

    # --- truth ---------------------------------------------------------------------------------
    tdir = truth_dir / f"sub-{sub}"
    tdir.mkdir(parents=True, exist_ok=True)
    stem = f"sub-{sub}_task-{STIM_TASK}"
    np.savez(
        tdir / f"{stem}_truth.npz",
        neural=sources_am,
        neural_sfreq=np.float64(sfreq),
        bands=BANDS.copy(),
        bold_clean=hemo["bold_clean"],
        hrf_peak_s=hemo["hrf"]["hrf_peak_s"],
        hrf_undershoot_s=hemo["hrf"]["hrf_undershoot_s"],
        hrf_dispersion=hemo["hrf"]["hrf_dispersion"],
        fine_to_coarse=atlas.fine_to_coarse.copy(),
        volume_onsets_s=onsets_f,
        volume_onsets_ephys_s=offset_s + onsets_f,
        motion=hemo["motion"],
        bold_amplitude=hemo["amp"],
        log_band_power_z_ephys=neural.log_power_z_at(offset_s + onsets_f),
        log_band_power_z_fmri=neural_f.log_power_z_at(onsets_f),
        gain=head.gain,
        dipole_pos=head.dipole_pos,
        dipole_ori=head.dipole_ori,
        dipole_parcel=head.dipole_parcel,
    )
    truth = {
        "subject": sub,
        "mode": "non-simultaneous",
        "modality": modality,
        "offset_s": offset_s,
        "ephys_stimulus_start_s": pre_e,
        "fmri_stimulus_start_s": pre_f,
        "tr": tr,
        "n_volumes": n_vol,
        "eeg_sfreq": sfreq,
        **bad,
        "line_freq": ds.LINE_FREQ,
        "n_eeg_samples": n_samples,
        "eeg_duration_s": n_samples / sfreq,
        "non_steady_state_volumes": settings.non_steady_state_volumes,
        "band_names": list(BAND_NAMES),
        "stimulus_share": stim.share,
        "segments": [{"stim_file": f, "onset_in_stimulus_s": float(o), "duration_s": float(d),
                      "fmri_jitter_s": float(j)}
                     for f, o, d, j in zip(stim.files, stim.onsets, stim.durations, jitter)],
        "motion_events": hemo["motion_events"],
        "source_scale_am": scale,
        "files": {
            modality: str((ephys_dir / f"{ephys_stem}_{modality}{ephys_ext}").relative_to(bids_root)),
            "bold": f"{rel}/func/{stem_f}_bold.nii.gz",
            "preproc_bold": str((fdir / f"{prep}.nii.gz").relative_to(bids_root)),
            "fmri_events": f"{rel}/func/{stem_f}_events.tsv",
        },
    }
    ds._write_json(tdir / f"{stem}_truth.json", truth)
    LOGGER.info("sub-%s: done in %.1f s (offset %.4f s)", sub, time.perf_counter() - t_start,
                offset_s)
    return truth


__all__ = ["Stimulus", "make_stimulus", "simulate_subject_non_simultaneous", "write_stimuli",
           "STIM_TASK", "STIM_EVENT"]
