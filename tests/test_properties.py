"""Property-based tests (hypothesis): alignment, windowing and the wavelet round trip."""

from __future__ import annotations

import numpy as np
import pytest
import pywt
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from samba_pipeline.align import estimate_alignment, find_volume_triggers, make_windows, to_sample
from samba_pipeline.errors import SambaInputError
from samba_pipeline.models.samba.wavelet import dwt, idwt
from samba_pipeline.training.data import RunData, WindowDataset, window_volumes
from samba_pipeline.training.splits import check_split, split_by_time

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TRS = st.sampled_from([0.5, 0.72, 1.0, 1.5, 2.0, 2.5, 3.0])
SFREQS = st.sampled_from([100.0, 128.0, 250.0, 256.0, 500.0, 512.0, 1000.0, 5000.0])


# ---------------------------------------------------------------------------------------------
# Alignment
# ---------------------------------------------------------------------------------------------
@FAST
@given(tr=TRS, sfreq=SFREQS, n_volumes=st.integers(3, 200), offset=st.floats(0.0, 30.0),
       jitter=st.floats(0.0, 0.4), extra_s=st.floats(-100.0, 60.0), seed=st.integers(0, 2**16))
def test_alignment_recovers_the_offset_within_one_sample(tr, sfreq, n_volumes, offset, jitter, extra_s, seed):
    """Triggers at offset + k TR (sampled, so jittered by < 1 sample): the alignment puts volume 0 at
    the first trigger, within one sample; the kept volumes and EEG samples never leave the data."""
    rng = np.random.default_rng(seed)
    exact = offset + tr * np.arange(n_volumes)
    sampled = to_sample(exact, sfreq) / sfreq + rng.uniform(-jitter, jitter, n_volumes) / sfreq
    duration = float(exact[-1] + tr + extra_s)  # the recording may stop before the run ends
    assume(duration > 0 and sampled[0] >= 0)
    names = np.where(rng.random(n_volumes) < 0.5, "R128", "Response/R128")
    trig = find_volume_triggers(np.concatenate([sampled, [1.0, 2.0]]), np.concatenate([names, ["S1", "S2"]]),
                                names=("R128", "Response/R128"))
    np.testing.assert_allclose(trig, np.sort(sampled), atol=1e-9)
    try:
        result = estimate_alignment(trig, n_volumes=n_volumes, tr=tr, ephys_duration=duration,
                                    ephys_sfreq=sfreq)
    except SambaInputError as exc:  # only when fewer than 2 volumes fit into the recording
        assert "overlap" in str(exc)
        assert sum(to_sample(exact + tr, sfreq) <= to_sample(duration, sfreq)) < 2 + 1
        return
    assert abs(result["offset_s"] - offset) <= 1.0 / sfreq + 1e-9
    n_samples = result["n_ephys_samples"]
    assert 0 <= result["ephys_start_sample"] < result["ephys_stop_sample"] <= n_samples
    assert 2 <= result["n_volumes_kept"] <= n_volumes
    assert result["fmri_stop"] - result["fmri_start"] == result["n_volumes_kept"]
    assert result["ephys_stop_sample"] - result["ephys_start_sample"] == pytest.approx(
        result["n_volumes_kept"] * tr * sfreq, abs=1.0)


@FAST
@given(tr=TRS, sfreq=SFREQS, n_volumes=st.integers(1, 300),
       lengths=st.lists(st.floats(0.5, 120.0), min_size=1, max_size=3, unique_by=lambda x: f"{x:g}"),
       step=st.none() | st.floats(0.5, 60.0))
def test_windows_never_exceed_the_data(tr, sfreq, n_volumes, lengths, step):
    assume(all(np.floor(length / tr + 0.5 + 1e-9) >= 1 for length in lengths))
    assume(step is None or np.floor(step / tr + 0.5 + 1e-9) >= 1)
    table = make_windows(n_volumes, tr, sfreq, lengths, step_s=step)
    n_samples = int(to_sample(n_volumes * tr, sfreq))
    assert (table["fmri_start"] >= 0).all() and (table["fmri_stop"] <= n_volumes).all()
    assert (table["ephys_start"] >= 0).all() and (table["ephys_stop"] <= n_samples).all()
    assert (table["fmri_stop"] > table["fmri_start"]).all()
    for length, group in table.groupby("length_s"):
        n_win = window_volumes(length, tr)
        assert (group["fmri_stop"] - group["fmri_start"] == n_win).all()
        if step is None:  # non-overlapping and as many as fit
            assert (np.diff(group["fmri_start"]) == n_win).all()
            assert len(group) == n_volumes // n_win
        assert len(set(group["window_id"])) == len(group)


# ---------------------------------------------------------------------------------------------
# Windowing of training data: splits never overlap, gaps are respected, windows stay inside
# ---------------------------------------------------------------------------------------------
def _run(n_volumes: int, tr: float, sfreq: float, subject: str) -> RunData:
    spv = int(round(tr * sfreq))
    rng = np.random.default_rng(n_volumes)
    return RunData.from_arrays(rng.standard_normal((3, n_volumes * spv)), rng.standard_normal((2, n_volumes)),
                               ephys_sfreq=sfreq, tr=tr, subject=subject, task="rest")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tr=st.sampled_from([1.0, 2.0]), sfreq=st.sampled_from([4.0, 8.0]),
       volumes=st.lists(st.integers(60, 240), min_size=1, max_size=3),
       window_s=st.sampled_from([10.0, 20.0, 30.0]),
       gap_s=st.sampled_from([0.0, 10.0, 30.0]), val=st.sampled_from([0.0, 0.15, 0.25]),
       test=st.sampled_from([0.15, 0.3]))
def test_time_split_windows_never_overlap_and_keep_the_gap(tr, sfreq, volumes, window_s, gap_s, val, test):
    runs = [_run(n, tr, sfreq, f"{i + 1:02d}") for i, n in enumerate(volumes)]
    try:
        split = split_by_time(runs, window_s=window_s, val_fraction=val, test_fraction=test, gap_s=gap_s)
    except SambaInputError as exc:  # a run too short for the parts and gaps: a clear refusal
        assert "needs at least" in str(exc)
        return
    check_split(split, runs)  # raises if segments overlap, leave their run or break the gap
    win = window_volumes(window_s, tr)
    for part in ("train", "val", "test"):
        segments = split.part(part)
        if not segments:
            continue
        ds = WindowDataset(runs, segments, window_s=window_s)
        table = ds.windows
        for seg in segments:  # every window lies inside its segment
            rows = table[(table["run"] == seg.run) & (table["fmri_start"] >= seg.start)
                         & (table["fmri_start"] < seg.stop)]
            assert (rows["fmri_stop"] <= seg.stop).all()
        assert (table["fmri_stop"] - table["fmri_start"] == win).all()
        for run_index, rows in table.groupby("run"):
            starts = np.sort(rows["fmri_start"].to_numpy())
            assert (np.diff(starts) >= win).all()  # non-overlapping
            assert (rows["ephys_stop"] <= runs[run_index].ephys.shape[1]).all()
        item = ds[0]
        assert item["source"].shape[-1] == ds.n_samp and item["target"].shape[-1] == win


# ---------------------------------------------------------------------------------------------
# Wavelet round trip against PyWavelets
# ---------------------------------------------------------------------------------------------
@FAST
@given(wavelet=st.sampled_from(["haar", "db2", "db4", "sym4", "coif1"]), n=st.integers(8, 300),
       level=st.integers(1, 5), batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_wavelet_matches_pywavelets_and_inverts(wavelet, n, level, batch, seed):
    filt = pywt.Wavelet(wavelet).dec_len
    assume(level <= pywt.dwt_max_level(n, filt) and level >= 1)
    x = np.random.default_rng(seed).standard_normal((batch, n))
    coeffs = dwt(torch.from_numpy(x), wavelet, level=level)
    ref = pywt.wavedec(x, wavelet, mode="symmetric", level=level, axis=-1)
    assert len(coeffs) == len(ref) == level + 1
    for mine, theirs in zip(coeffs, ref):
        np.testing.assert_allclose(mine.numpy(), theirs, atol=1e-9)
    back = idwt(coeffs, wavelet)[..., :n].numpy()
    np.testing.assert_allclose(back, x, atol=1e-9)
    np.testing.assert_allclose(back, pywt.waverec(ref, wavelet, mode="symmetric")[..., :n], atol=1e-9)
