"""Tests of samba_pipeline.align."""

from __future__ import annotations

import json
import logging

import mne
import numpy as np
import pytest

from samba_pipeline.align import (
    estimate_alignment,
    find_volume_triggers,
    find_volume_triggers_in_annotations,
    make_windows,
    to_sample,
)
from samba_pipeline.errors import SambaInputError

SFREQ = 250.0
TR = 2.0


def test_find_volume_triggers_picks_names_sorted_unique():
    onsets = [5.0, 1.0, 3.0, 3.0, 7.5, 9.0, 11.0, 2.2]
    desc = [
        "R128",
        "Response/R128",
        "Stimulus/S  1",
        "R128 ",
        "Volume",
        "Comment/x",
        "TR",
        "Response/R128",
    ]
    # the same trigger listed twice (3.0 as 'R128 ' only once here; 1.0 once) -> unique
    got = find_volume_triggers(onsets, desc)
    np.testing.assert_array_equal(got, [1.0, 2.2, 3.0, 5.0, 7.5, 11.0])
    got = find_volume_triggers(onsets, desc, names=("Volume",))
    np.testing.assert_array_equal(got, [7.5])
    # duplicates under two spellings collapse
    got = find_volume_triggers([4.0, 4.0, 6.0], ["R128", "Response/R128", "R128"])
    np.testing.assert_array_equal(got, [4.0, 6.0])
    assert find_volume_triggers([], []).size == 0
    with pytest.raises(SambaInputError, match="onsets but"):
        find_volume_triggers([1.0, 2.0], ["R128"])
    with pytest.raises(SambaInputError, match="no valid onset") as err:
        find_volume_triggers([np.nan, 2.0], ["R128", "R128"], path="sub-01_events.tsv")
    assert err.value.path == "sub-01_events.tsv"


def test_triggers_from_annotations_and_raw():
    onsets = 1.5 + TR * np.arange(5)
    ann = mne.Annotations(
        onset=np.r_[onsets, 0.7],
        duration=0.0,
        description=["Response/R128"] * 5 + ["Stimulus/S  1"],
    )
    np.testing.assert_allclose(find_volume_triggers_in_annotations(ann), onsets)
    info = mne.create_info(["Fz"], SFREQ, "eeg")
    raw = mne.io.RawArray(np.zeros((1, int(15 * SFREQ))), info, first_samp=500, verbose=False)
    raw.set_meas_date(0)
    raw.set_annotations(
        mne.Annotations(
            onset=raw.first_time + onsets,
            duration=0.0,
            description=["R128"] * 5,
            orig_time=raw.info["meas_date"],
        )
    )
    np.testing.assert_allclose(find_volume_triggers_in_annotations(raw), onsets, atol=1e-9)
    with pytest.raises(SambaInputError, match="expected mne Annotations"):
        find_volume_triggers_in_annotations([1, 2, 3])


def test_alignment_exact_on_synthetic_triggers():
    offset, n_vol = 3.2, 50
    trig = offset + TR * np.arange(n_vol)
    duration = offset + n_vol * TR + 5.0
    res = estimate_alignment(trig, n_vol, TR, duration, SFREQ)
    assert res["method"] == "triggers"
    assert res["offset_s"] == offset
    assert (res["first_volume"], res["last_volume"], res["n_volumes_kept"]) == (0, 49, 50)
    assert res["ephys_start_sample"] == 800
    assert res["ephys_stop_sample"] == 800 + 50 * 500
    assert res["duration_s"] == pytest.approx(100.0)
    assert res["integer_samples_per_volume"] and res["samples_per_volume"] == 500
    assert res["trigger_spacing_median_s"] == pytest.approx(TR)
    assert res["trigger_spacing_max_deviation_s"] == pytest.approx(0, abs=1e-9)
    assert res["n_extra_triggers"] == 0 and res["warnings"] == []
    json.dumps(res)


def test_alignment_jitter_extra_triggers_and_skip(caplog):
    rng = np.random.default_rng(0)
    offset, n_vol = 10.0, 30
    trig = offset + TR * np.arange(n_vol + 3) + rng.uniform(-0.002, 0.002, n_vol + 3)
    trig[0] = offset
    with caplog.at_level(logging.WARNING):
        res = estimate_alignment(trig, n_vol, TR, 200.0, SFREQ, ephys_file="sub-01_eeg.vhdr")
    assert res["method"] == "triggers" and res["n_extra_triggers"] == 3
    assert res["offset_s"] == offset
    assert res["trigger_spacing_max_deviation_s"] <= 0.004 + 1e-12
    assert res["max_trigger_drift_s"] <= 0.002 + 1e-12
    assert "3 more volume trigger" in caplog.text and "sub-01_eeg.vhdr" in caplog.text
    # two dummy-scan triggers before the run
    dummies = np.r_[offset - 2 * TR, offset - TR, offset + TR * np.arange(n_vol)]
    res = estimate_alignment(dummies, n_vol, TR, 200.0, SFREQ, skip_triggers=2)
    assert res["offset_s"] == offset and res["n_extra_triggers"] == 0
    assert res["ephys_start_sample"] == 2500


def test_alignment_crops_to_recording():
    offset, n_vol = 4.0, 60
    trig = offset + TR * np.arange(n_vol)
    trig = trig[trig <= 80.9]  # EEG stopped at 80.9 s: triggers only while recording
    res = estimate_alignment(trig, n_vol, TR, 80.9, SFREQ)
    # volume k spans [4 + 2k, 6 + 2k): the last one ending by 80.9 s is k = 37; every volume
    # acquired while recording (k <= 37, trigger at 78 s) has its trigger
    assert res["method"] == "triggers" and res["n_missing_triggers"] == 0
    assert (res["first_volume"], res["last_volume"]) == (0, 37)
    assert (res["fmri_start"], res["fmri_stop"]) == (0, 38)
    assert res["ephys_stop_sample"] == to_sample(4.0 + 38 * TR, SFREQ) == 20000
    assert res["ephys_stop_sample"] <= res["n_ephys_samples"]
    assert any("cropped" in w for w in res["warnings"])


def test_alignment_fallback_first_trigger_plus_tr(caplog):
    with caplog.at_level(logging.WARNING):
        res = estimate_alignment([6.0, 8.0, 10.0], 20, TR, 100.0, SFREQ)
    assert res["method"] == "first_trigger+TR"
    assert res["offset_s"] == 6.0 and res["n_volumes_kept"] == 20
    assert res["ephys_start_sample"] == 1500 and res["ephys_stop_sample"] == 1500 + 20 * 500
    assert res["n_missing_triggers"] == 17
    assert "only 3 volume trigger(s) for 20 volumes" in caplog.text
    # triggers missing while the recording still ran (a gap of 3 TR) fall back too
    trig = np.r_[4.0 + TR * np.arange(10), 4.0 + TR * np.arange(12, 20)]
    res = estimate_alignment(trig, 20, TR, 100.0, SFREQ)
    assert res["method"] == "first_trigger+TR" and res["offset_s"] == 4.0
    assert res["n_missing_triggers"] == 2 and res["n_irregular_spacings"] == 1
    assert res["trigger_spacing_max_deviation_s"] == pytest.approx(2 * TR)
    # a single trigger: no spacing to check, still aligned on it
    res = estimate_alignment([6.0], 20, TR, 100.0, SFREQ)
    assert res["method"] == "first_trigger+TR" and res["trigger_spacing_median_s"] is None


def test_alignment_without_triggers():
    with pytest.raises(SambaInputError, match="no scanner volume triggers") as err:
        estimate_alignment([], 20, TR, 100.0, SFREQ, ephys_file="sub-01_eeg.vhdr")
    assert err.value.path == "sub-01_eeg.vhdr"
    res = estimate_alignment([], 20, TR, 100.0, SFREQ, require_triggers=False)
    assert res["method"] == "assumed_simultaneous_start"
    assert res["offset_s"] == 0.0 and res["ephys_start_sample"] == 0
    assert res["warnings"]


def test_alignment_non_integer_samples_per_volume():
    tr, sfreq, offset = 2.001, 250.0, 1.0
    trig = offset + tr * np.arange(10)
    res = estimate_alignment(trig, 10, tr, 30.0, sfreq)
    assert not res["integer_samples_per_volume"]
    assert res["samples_per_volume"] == pytest.approx(500.25)
    assert res["ephys_start_sample"] == 250
    # (1 + 10 * 2.001) s * 250 Hz = 5252.5 exactly: half rounds up despite float error
    assert res["ephys_stop_sample"] == 5253


def test_alignment_errors():
    # spacing inconsistent with TR names both values
    trig = 1.0 + 2.5 * np.arange(10)
    with pytest.raises(SambaInputError, match=r"median 2\.5000 s.*repetition time 2 s"):
        estimate_alignment(trig, 10, TR, 100.0, SFREQ, ephys_file="x_eeg.vhdr")
    # no overlap: the only trigger lies less than one TR before the end of the recording
    with pytest.raises(SambaInputError, match="do not overlap in time"):
        estimate_alignment([99.5], 10, TR, 100.0, SFREQ)
    with pytest.raises(SambaInputError, match="do not overlap in time"):
        estimate_alignment([], 10, TR, 1.0, SFREQ, require_triggers=False)
    # exactly one volume overlaps
    with pytest.raises(SambaInputError, match="only 1 fMRI volume overlaps"):
        estimate_alignment([97.0], 10, TR, 100.0, SFREQ)
    for kwargs in ({"n_volumes": 0}, {"tr": 0.0}, {"ephys_sfreq": -1}, {"ephys_duration": 0}):
        args = {
            "trigger_onsets": [1.0],
            "n_volumes": 10,
            "tr": TR,
            "ephys_duration": 100.0,
            "ephys_sfreq": SFREQ,
            **kwargs,
        }
        with pytest.raises(SambaInputError, match="must be"):
            estimate_alignment(**args)
    with pytest.raises(SambaInputError, match="skip_triggers=5"):
        estimate_alignment([1.0, 3.0], 10, TR, 100.0, SFREQ, skip_triggers=5)


def test_make_windows():
    win = make_windows(100, TR, SFREQ)
    assert list(win.columns) == [
        "window_id",
        "length_s",
        "label",
        "onset_s",
        "duration_s",
        "fmri_start",
        "fmri_stop",
        "ephys_start",
        "ephys_stop",
    ]
    minute = win[win["label"] == "minute"]
    assert minute["fmri_start"].tolist() == [0, 30, 60]  # 90..120 would be partial
    assert (minute["fmri_stop"] - minute["fmri_start"]).eq(30).all()
    assert minute["ephys_start"].tolist() == [0, 15000, 30000]
    assert (minute["ephys_stop"] - minute["ephys_start"]).eq(15000).all()
    assert minute["window_id"].tolist() == ["minute-000", "minute-001", "minute-002"]
    second = win[win["label"] == "second"]
    # 15 s at TR 2 s -> 8 volumes (7.5 rounded half up); 12 whole windows in 100 volumes
    assert len(second) == 12 and (second["duration_s"] == 16.0).all()
    assert second["fmri_stop"].max() <= 100
    # overlapping windows and an arbitrary length
    win = make_windows(20, TR, SFREQ, lengths_s=(10.0,), step_s=4.0)
    assert win["label"].unique().tolist() == ["10s"]
    assert win["fmri_start"].tolist() == [0, 2, 4, 6, 8, 10, 12, 14]
    assert (win["ephys_stop"] == win["ephys_start"] + 5 * 500).all()
    # nothing fits
    assert make_windows(10, TR, SFREQ, lengths_s=(60.0,)).empty
    with pytest.raises(SambaInputError, match="shorter than the TR"):
        make_windows(10, TR, SFREQ, lengths_s=(0.5,))
