"""Non-simultaneous recordings: the demo's separate sessions, pairing rules, stimulus alignment."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from samba_pipeline.align import (
    estimate_stimulus_alignment,
    match_stimulus_segments,
    read_stimulus_events,
    to_sample,
)
from samba_pipeline.bids.layout import collect_pairs
from samba_pipeline.cli.parser import parse_args
from samba_pipeline.errors import (
    SambaInputError,
    SambaMissingInputError,
    SambaNoMatchError,
    SambaUsageError,
)

TR = 2.0
MINUTES = 1.5
N_VOL = round(MINUTES * 60 / TR)


@pytest.fixture(scope="module")
def ns_demo(tmp_path_factory):
    """Two subjects, each with an EEG session (ses-eeg) and an fMRI session (ses-mri)."""
    from samba_pipeline.simulate import generate_demo_dataset

    bids, truth = generate_demo_dataset(tmp_path_factory.mktemp("ns") / "ns", subjects=2,
                                        minutes=MINUTES, tr=TR, non_simultaneous=True)
    return bids, truth


def _truth(truth: Path, sub: str) -> dict:
    return json.loads((truth / f"sub-{sub}" / f"sub-{sub}_task-movie_truth.json").read_text())


def _events(bids: Path, sub: str) -> tuple[Path, Path]:
    return (bids / f"sub-{sub}" / "ses-eeg" / "eeg" / f"sub-{sub}_ses-eeg_task-movie_events.tsv",
            bids / f"sub-{sub}" / "ses-mri" / "func" / f"sub-{sub}_ses-mri_task-movie_events.tsv")


def _settings(bids: Path, tmp_path: Path, *extra: str):
    return parse_args([str(bids), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"),
                       "--skip-bids-validation", *extra])


def test_demo_writes_separate_sessions_with_stimulus_events(ns_demo):
    bids, truth = ns_demo
    for sub in ("01", "02"):
        eeg_events, fmri_events = _events(bids, sub)
        eeg = pd.read_csv(eeg_events, sep="\t")
        fmri = pd.read_csv(fmri_events, sep="\t")
        assert list(eeg["trial_type"].unique()) == ["movie_segment"]
        assert list(eeg["stim_file"]) == list(fmri["stim_file"])
        assert all((bids / "stimuli" / f).is_file() for f in fmri["stim_file"])
        assert not (eeg["trial_type"] == "R128").any()  # no scanner in the EEG session
        info = _truth(truth, sub)
        assert info["mode"] == "non-simultaneous"
        assert info["offset_s"] == pytest.approx(
            info["ephys_stimulus_start_s"] - info["fmri_stimulus_start_s"])
        # the EEG events are sample-locked triggers; the fMRI log has ms jitter
        on = eeg["onset"].to_numpy() * info["eeg_sfreq"]
        np.testing.assert_allclose(on, np.round(on), atol=1e-6)
    assert (bids / "derivatives" / "fmriprep" / "sub-01" / "ses-mri" / "func").is_dir()


def test_stimulus_locked_drive_is_shared_across_sessions(ns_demo):
    """What makes cross-session translation possible: in the stimulus, the log band power at
    the EEG-clock times of the fMRI volumes follows that of the fMRI session (share 0.8)."""
    _, truth = ns_demo
    info = _truth(truth, "01")
    npz = np.load(truth / "sub-01" / "sub-01_task-movie_truth.npz")
    t = npz["volume_onsets_s"]
    inside = (t > info["fmri_stimulus_start_s"] + 2) & (t < info["fmri_stimulus_start_s"] + 60)
    a = npz["log_band_power_z_ephys"][..., inside].reshape(-1, inside.sum())
    b = npz["log_band_power_z_fmri"][..., inside].reshape(-1, inside.sum())
    r = [np.corrcoef(x, y)[0, 1] for x, y in zip(a, b)]
    assert np.median(r) > 0.6
    outside = t < info["fmri_stimulus_start_s"] - 1  # before the stimulus: nothing shared
    assert outside.sum() >= 2


@pytest.mark.parametrize("sfreq", [200.0, 500.0])
def test_stimulus_alignment_within_one_sample_of_truth(ns_demo, sfreq):
    bids, truth = ns_demo
    for sub in ("01", "02"):
        info = _truth(truth, sub)
        eeg_events, fmri_events = _events(bids, sub)
        align = estimate_stimulus_alignment(
            read_stimulus_events(eeg_events), read_stimulus_events(fmri_events), N_VOL, TR,
            info["eeg_duration_s"], sfreq, ephys_events_file=eeg_events,
            fmri_events_file=fmri_events)
        assert align["method"] == "stimulus_events" and align["n_segments"] == 3
        true_start = to_sample(info["offset_s"] + align["first_volume"] * TR, sfreq)
        assert abs(align["ephys_start_sample"] - true_start) <= 1
        assert align["offset_s"] == pytest.approx(info["offset_s"], abs=1.0 / sfreq)
        n = align["n_volumes_kept"]
        assert align["ephys_stop_sample"] - align["ephys_start_sample"] == round(n * TR * sfreq)
        # only volumes inside the stimulus are kept
        lo, hi = align["stimulus_window_s"]
        t0 = align["offset_s"] + align["first_volume"] * TR
        assert t0 >= lo - 1 / sfreq and t0 + n * TR <= hi + 1 / sfreq
        assert n >= N_VOL - 12


def _cross_subject_copy(ns_demo, tmp_path) -> Path:
    """sub-01 keeps only its EEG session, sub-02 only its fMRI session."""
    src, _ = ns_demo
    bids = tmp_path / "bids"
    shutil.copytree(src, bids)
    shutil.rmtree(bids / "sub-01" / "ses-mri")
    shutil.rmtree(bids / "derivatives" / "fmriprep" / "sub-01")
    shutil.rmtree(bids / "sub-02" / "ses-eeg")
    return bids


def test_pairing_rules(ns_demo, tmp_path):
    bids, _ = ns_demo
    with pytest.raises(SambaNoMatchError, match="--pairing same-subject"):  # the default rule
        collect_pairs(_settings(bids, tmp_path))
    report = collect_pairs(_settings(bids, tmp_path, "--pairing", "same-subject"))
    assert [p.name for p in report.pairs] == ["sub-01_ses-mri_task-movie",
                                              "sub-02_ses-mri_task-movie"]
    pair = report.pairs[1]
    assert "sub-02_ses-eeg_task-movie_eeg.vhdr" in pair.ephys_file
    assert pair.ephys_events.endswith("sub-02_ses-eeg_task-movie_events.tsv")
    assert pair.bold_events.endswith("sub-02_ses-mri_task-movie_events.tsv")
    assert pair.pairing == "same-subject" and pair.confounds_file and pair.mask_file

    cross = _cross_subject_copy(ns_demo, tmp_path)
    with pytest.raises(SambaNoMatchError, match="no EEG/MEG recording of task movie"):
        collect_pairs(_settings(cross, tmp_path, "--pairing", "same-subject"))
    report = collect_pairs(_settings(cross, tmp_path, "--pairing", "same-stimulus",
                                     "--participant-label", "02"))
    assert [p.name for p in report.pairs] == ["sub-02_ses-mri_task-movie"]
    assert "sub-01_ses-eeg_task-movie_eeg.vhdr" in report.pairs[0].ephys_file


def test_pairing_options_and_their_config_file_round_trip(tmp_path):
    import tomli_w

    from samba_pipeline.cli.parser import settings_to_cli_toml

    bids, out = tmp_path / "bids", str(tmp_path / "out")
    bids.mkdir()
    (bids / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.10.0"}')
    with pytest.raises(SystemExit):
        parse_args([str(bids), out, "participant", "--pairing", "nearby"])
    settings = parse_args([str(bids), out, "participant", "--pairing", "same-stimulus",
                           "--stimulus-event", "clip", "--stimulus-tolerance", "0.05"])
    config = tmp_path / "run.toml"
    config.write_text(tomli_w.dumps(settings_to_cli_toml(settings)))
    again = parse_args([str(bids), out, "participant", "--config-file", str(config)])
    assert (again.workflow.pairing, again.workflow.stimulus_event, again.workflow.stimulus_tolerance) \
        == ("same-stimulus", ["clip"], 0.05)


def _write(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False, na_rep="n/a")
    return path


def _seg(onsets, names=("a.mp4", "b.mp4", "c.mp4"), durations=(20.0, 20.0, 20.0), kind="movie_segment"):
    return [{"onset": o, "duration": d, "trial_type": kind, "stim_file": n}
            for o, d, n in zip(onsets, durations, names)]


def test_stimulus_events_bad_input_names_the_file(tmp_path):
    with pytest.raises(SambaMissingInputError, match="missing_events.tsv"):
        read_stimulus_events(tmp_path / "missing_events.tsv")
    none = _write(tmp_path / "none_events.tsv", [{"onset": 1.0, "duration": 0, "trial_type": "R128"}])
    with pytest.raises(SambaInputError, match="none_events.tsv.*no stimulus-segment events.*R128"):
        read_stimulus_events(none)
    no_type = _write(tmp_path / "notype_events.tsv", [{"onset": 1.0, "duration": 0}])
    with pytest.raises(SambaInputError, match="notype_events.tsv.*trial_type"):
        read_stimulus_events(no_type)
    dup = _write(tmp_path / "dup_events.tsv", _seg([1, 2, 3], names=("a", "a", "b")))
    with pytest.raises(SambaInputError, match="dup_events.tsv.*more than once"):
        read_stimulus_events(dup)
    nan = _write(tmp_path / "nan_events.tsv", _seg([1.0, float("nan"), 3.0]))
    with pytest.raises(SambaInputError, match="nan_events.tsv.*no valid onset"):
        read_stimulus_events(nan)
    # other names can be chosen
    custom = _write(tmp_path / "custom_events.tsv", _seg([5, 27, 49], kind="clip"))
    assert len(read_stimulus_events(custom, names=("clip",))) == 3


def test_mismatched_segments_are_clear_errors(tmp_path):
    e = _write(tmp_path / "eeg_events.tsv", _seg([10.0, 32.0, 54.0]))
    ok = _write(tmp_path / "ok_events.tsv", _seg([4.0, 26.0, 48.0]))
    eeg = read_stimulus_events(e)
    kw = dict(ephys_events_file=e)

    match = match_stimulus_segments(eeg, read_stimulus_events(ok), fmri_events_file=ok, **kw)
    assert match["offset_s"] == pytest.approx(6.0)

    other = _write(tmp_path / "other_events.tsv", _seg([4.0, 26.0, 48.0], names=("x", "y", "z")))
    with pytest.raises(SambaInputError, match="no stimulus segment is shared.*other_events.tsv"):
        match_stimulus_segments(eeg, read_stimulus_events(other), fmri_events_file=other, **kw)
    spacing = _write(tmp_path / "spacing_events.tsv", _seg([4.0, 30.0, 48.0]))
    with pytest.raises(SambaInputError, match="spaced differently.*spacing_events.tsv"):
        match_stimulus_segments(eeg, read_stimulus_events(spacing), fmri_events_file=spacing, **kw)
    longer = _write(tmp_path / "longer_events.tsv", _seg([4.0, 26.0, 48.0], durations=(20, 25, 20)))
    with pytest.raises(SambaInputError, match="'b.mp4' lasts 20 s.*25 s"):
        match_stimulus_segments(eeg, read_stimulus_events(longer), fmri_events_file=longer, **kw)
    order = _write(tmp_path / "order_events.tsv", _seg([4.0, 26.0, 48.0], names=("b.mp4", "a.mp4", "c.mp4")))
    with pytest.raises(SambaInputError, match="different order"):
        match_stimulus_segments(eeg, read_stimulus_events(order), fmri_events_file=order, **kw)
    unnamed = pd.DataFrame(_seg([4.0, 26.0])).drop(columns="stim_file")
    unnamed = _write(tmp_path / "unnamed_events.tsv", unnamed.to_dict("records"))
    with pytest.raises(SambaInputError, match="no names.*3 vs 2"):
        match_stimulus_segments(eeg, read_stimulus_events(unnamed), fmri_events_file=unnamed, **kw)
    # a segment in one session only is dropped with a warning, not an error
    partial = _write(tmp_path / "partial_events.tsv", _seg([4.0, 26.0], names=("a.mp4", "b.mp4")))
    match = match_stimulus_segments(eeg, read_stimulus_events(partial), **kw)
    assert match["segments"] == ["a.mp4", "b.mp4"] and match["warnings"]
    # a stimulus that does not overlap the recording
    with pytest.raises(SambaInputError, match="fall within both the stimulus"):
        estimate_stimulus_alignment(eeg, read_stimulus_events(ok), 40, 2.0, 8.0, 200.0, **kw)


def test_preflight_names_the_missing_fmri_events(ns_demo, tmp_path):
    from samba_pipeline.cli.participant import inspect_pair

    bids = tmp_path / "bids"
    shutil.copytree(ns_demo[0], bids)
    (bids / "sub-01" / "ses-mri" / "func" / "sub-01_ses-mri_task-movie_events.tsv").unlink()
    report = collect_pairs(_settings(bids, tmp_path, "--pairing", "same-subject",
                                     "--participant-label", "01"))
    with pytest.raises(SambaMissingInputError, match="sub-01_ses-mri_task-movie_events.tsv"):
        inspect_pair(report.pairs[0], report.layout, ["R128"], ["movie_segment"])


def test_demo_settings_reject_impossible_combinations(tmp_path):
    from samba_pipeline.simulate import generate_demo_dataset

    with pytest.raises(SambaUsageError, match="at least 60 s"):
        generate_demo_dataset(tmp_path / "a", minutes=0.9, non_simultaneous=True)
    with pytest.raises(SambaUsageError, match="MEG cannot be recorded inside"):
        generate_demo_dataset(tmp_path / "b", meg=True)
    with pytest.raises(SambaUsageError, match="mr-artifacts"):
        generate_demo_dataset(tmp_path / "c", mr_artifacts=True, non_simultaneous=True)


@pytest.mark.slow
def test_participant_level_pairs_subjects_by_stimulus(ns_demo, tmp_path):
    """End to end: sub-02's fMRI with sub-01's EEG (another subject, same movie)."""
    _, truth = ns_demo
    bids = _cross_subject_copy(ns_demo, tmp_path)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "samba_pipeline.cli", str(bids), str(out), "participant",
         "--participant-label", "02", "--pairing", "same-stimulus", "--skip-bids-validation",
         "-w", str(tmp_path / "work"), "--nprocs", "2",
         "--config-file", str(truth / "samba-bids-demo.toml")],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stem = out / "sub-02" / "ses-mri" / "sub-02_ses-mri_task-movie"
    align = json.loads(Path(f"{stem}_alignment.json").read_text())
    assert align["method"] == "stimulus_events" and align["pairing"] == "same-stimulus"
    eeg01, fmri02 = _truth(truth, "01"), _truth(truth, "02")
    true_offset = eeg01["ephys_stimulus_start_s"] - fmri02["fmri_stimulus_start_s"]
    sfreq = align["ephys_sfreq"]
    assert abs(align["ephys_start_sample"]
               - to_sample(true_offset + align["first_volume"] * TR, sfreq)) <= 1
    eeg_meta = json.loads((out / "sub-02" / "ses-mri" / "eeg" /
                           "sub-02_ses-mri_task-movie_desc-preproc_timeseries.json").read_text())
    assert any("sub-01/ses-eeg" in s for s in eeg_meta["Sources"])
    fmri = pd.read_csv(next((out / "sub-02" / "ses-mri" / "func").glob("*_stat-mean_timeseries.tsv")),
                       sep="\t")
    assert len(fmri) == align["n_volumes_kept"]
