"""Tests of samba_pipeline.ephys (reading through MNE-BIDS, bad channels, preprocessing).

All inputs are simulated here: random sources mixed into 32 scalp channels of the standard
10-20 montage by a smooth (Gaussian, on the unit sphere) mixing matrix, plus mild sensor noise.
"""

from __future__ import annotations

import datetime
import json
import logging

import mne
import mne_bids
import numpy as np
import pytest
from scipy import signal

from samba_pipeline.ephys import (
    EphysSettings,
    detect_bad_channels,
    ephys_timeseries,
    estimate_ephys_mem_gb,
    events_from_raw,
    find_ephys_files,
    preprocess_raw,
    read_ephys,
)
from samba_pipeline.errors import (
    SambaInputError,
    SambaMissingInputError,
    SambaUsageError,
)

mne.set_log_level("ERROR")

# A common 32-channel cap layout (10-20 names present in MNE's standard_1020 montage).
CHANNELS_32 = [
    "Fp1", "Fp2", "F7", "F3", "Fz", "F4", "F8", "FC5", "FC1", "FC2", "FC6", "T7", "C3", "Cz",
    "C4", "T8", "TP9", "CP5", "CP1", "CP2", "CP6", "TP10", "P7", "P3", "Pz", "P4", "P8",
    "PO9", "O1", "Oz", "O2", "PO10",
]  # fmt: skip


def simulate_raw(
    sfreq: float = 250.0,
    duration: float = 60.0,
    seed: int = 0,
    n_sources: int = 40,
    width: float = 0.8,
    noise: float = 0.05,
) -> tuple[mne.io.RawArray, np.ndarray]:
    """Clean, realistic-looking EEG: smooth mixing of 1/f-like random sources.

    Returns the raw (standard_1020 montage, about 10 uV per channel) and the noise-free scalp
    signal (n_channels, n_times) in volts.
    """
    rng = np.random.default_rng(seed)
    montage = mne.channels.make_standard_montage("standard_1020")
    pos = montage.get_positions()["ch_pos"]
    sensors = np.array([pos[name] for name in CHANNELS_32])
    sensors /= np.linalg.norm(sensors, axis=1, keepdims=True)
    sources = rng.standard_normal((n_sources, 3))
    sources /= np.linalg.norm(sources, axis=1, keepdims=True)
    dist = np.linalg.norm(sensors[:, None] - sources[None], axis=-1)
    mixing = np.exp(-((dist / width) ** 2))
    n_times = round(duration * sfreq)
    activity = signal.lfilter([1.0], [1.0, -0.95], rng.standard_normal((n_sources, n_times)))
    activity /= activity.std(axis=1, keepdims=True)
    scalp = mixing @ activity
    scale = 1e-5 / scalp.std()
    scalp *= scale
    data = scalp + noise * 1e-5 * rng.standard_normal(scalp.shape)
    info = mne.create_info(CHANNELS_32, sfreq, "eeg")
    info["line_freq"] = 50.0
    raw = mne.io.RawArray(data, info, verbose=False)
    raw.set_montage(montage)
    return raw, scalp


NO_DETECTION = {"find_flat_channels": False, "find_noisy_channels": False}


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------

EVENT_SAMPLES = np.array([100, 1234, 5001, 7777])
EVENT_NAMES = ["R128", "R128", "stim", "R128"]


def _write_bids(root, sfreq=500.0, duration=20.0, subject="01", task="rest", bads=("F4",)):
    raw, _ = simulate_raw(sfreq=sfreq, duration=duration, seed=1)
    raw.set_annotations(
        mne.Annotations(EVENT_SAMPLES / sfreq, np.zeros(len(EVENT_SAMPLES)), EVENT_NAMES)
    )
    raw.info["bads"] = list(bads)
    bids_path = mne_bids.BIDSPath(subject=subject, task=task, datatype="eeg", root=root)
    mne_bids.write_raw_bids(
        raw, bids_path, format="BrainVision", allow_preload=True, overwrite=True, verbose=False
    )
    return raw, bids_path


@pytest.fixture(scope="module")
def bids_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("bids")
    raw, _ = _write_bids(root, subject="01", task="rest")
    _write_bids(root, subject="02", task="rest")
    _write_bids(root, subject="02", task="movie")
    return root, raw


def test_find_ephys_files(bids_dataset):
    root, _ = bids_dataset
    paths = find_ephys_files(root, "01")
    assert len(paths) == 1  # one per recording, not per sidecar / .eeg / .vmrk
    assert paths[0].extension == ".vhdr"
    assert paths[0].fpath.is_file()
    assert [p.task for p in find_ephys_files(root, "sub-02")] == ["movie", "rest"]
    assert [p.task for p in find_ephys_files(root, "02", task="task-rest")] == ["rest"]
    assert find_ephys_files(root, "02", datatypes=("meg",)) == []
    assert find_ephys_files(root, "03") == []
    with pytest.raises(SambaMissingInputError) as err:
        find_ephys_files(root / "nope", "01")
    assert err.value.path.endswith("nope")


def test_read_round_trip(bids_dataset):
    root, raw_in = bids_dataset
    raw = read_ephys(find_ephys_files(root, "01")[0])
    assert raw.preload
    assert raw.ch_names == raw_in.ch_names
    assert raw.info["sfreq"] == raw_in.info["sfreq"]
    assert raw.info["bads"] == ["F4"]  # from channels.tsv
    assert raw.info["line_freq"] == 50.0
    np.testing.assert_allclose(raw.get_data(), raw_in.get_data(), atol=1e-9)  # BV resolution
    onsets, descriptions = events_from_raw(raw)
    sfreq = raw.info["sfreq"]
    np.testing.assert_array_equal(np.round(onsets * sfreq).astype(int), EVENT_SAMPLES)
    np.testing.assert_allclose(onsets * sfreq, EVENT_SAMPLES, atol=1e-6)  # exact to the sample
    assert list(descriptions) == EVENT_NAMES
    assert raw.get_montage() is not None


def test_read_sfreq_mismatch_names_sidecar(tmp_path):
    _, bids_path = _write_bids(tmp_path)
    sidecar = bids_path.copy().update(suffix="eeg", extension=".json").fpath
    meta = json.loads(sidecar.read_text())
    meta["SamplingFrequency"] = 1000
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(SambaInputError) as err:
        read_ephys(find_ephys_files(tmp_path, "01")[0])
    assert err.value.path == str(sidecar)
    assert "1000" in err.value.message and "500" in err.value.message
    assert "\n" not in str(err.value)


def test_read_missing_and_corrupt(tmp_path):
    _write_bids(tmp_path)
    found = find_ephys_files(tmp_path, "01")[0]
    missing = found.copy().update(task="nothere")
    with pytest.raises(SambaMissingInputError) as err:
        read_ephys(missing)
    assert err.value.path.endswith("sub-01_task-nothere_eeg.vhdr")
    # a corrupt header
    found.fpath.write_text("this is not a BrainVision header\n")
    with pytest.raises(SambaInputError) as err:
        read_ephys(found)
    assert err.value.path == str(found.fpath)


def test_read_no_ephys_channels(tmp_path):
    _, bids_path = _write_bids(tmp_path)
    channels = bids_path.copy().update(suffix="channels", extension=".tsv").fpath
    lines = channels.read_text().splitlines()
    header = lines[0].split("\t")
    col = header.index("type")
    rows = [line.split("\t") for line in lines[1:]]
    for row in rows:
        row[col] = "MISC"
    channels.write_text("\n".join(["\t".join(header)] + ["\t".join(r) for r in rows]) + "\n")
    with pytest.raises(SambaInputError, match="no EEG or MEG channels") as err:
        read_ephys(find_ephys_files(tmp_path, "01")[0])
    assert err.value.path.endswith("_eeg.vhdr")


@pytest.mark.parametrize("meas_date", [None, datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)])
def test_events_from_raw_first_samp(meas_date):
    info = mne.create_info(["Cz", "Pz"], 100.0, "eeg")
    raw = mne.io.RawArray(np.zeros((2, 1000)), info, first_samp=37, verbose=False)
    raw.set_meas_date(meas_date)
    # orig_time=None: onsets relative to the first sample held by raw
    raw.set_annotations(mne.Annotations([0.1, 2.5], [0.0, 1.0], ["a", "b"], orig_time=None))
    onsets, desc = events_from_raw(raw)
    np.testing.assert_allclose(onsets, [0.1, 2.5])
    assert list(desc) == ["a", "b"]
    # agrees with MNE's own sample numbers (which include first_samp)
    events, _ = mne.events_from_annotations(raw, verbose=False)
    np.testing.assert_array_equal(events[:, 0] - raw.first_samp, [10, 250])
    empty = mne.io.RawArray(np.zeros((2, 10)), info, verbose=False)
    assert events_from_raw(empty)[0].size == 0


# --------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------


def test_settings_round_trip_and_validation():
    default = EphysSettings()
    assert default.l_freq == 0.5 and default.h_freq == 80.0
    assert default.raw_resample_sfreq == 200.0 and default.notch_freq == "auto"
    assert default.eeg_reference == "average" and default.ch_types == ("eeg",)
    as_dict = default.to_dict()
    json.dumps(as_dict)
    assert EphysSettings.from_dict(as_dict) == default
    custom = EphysSettings.from_dict({"ch_types": ["mag", "grad"], "notch_freq": [60, 120]})
    assert custom.ch_types == ("mag", "grad")
    with pytest.raises(SambaUsageError, match="unknown EEG/MEG option"):
        EphysSettings.from_dict({"hfreq": 40})
    assert EphysSettings(space="source").space == "source"  # tests/test_source.py
    with pytest.raises(SambaUsageError, match="choose from"):
        EphysSettings(space="surface")
    with pytest.raises(SambaUsageError):
        EphysSettings(l_freq=50, h_freq=40)
    with pytest.raises(SambaUsageError):
        EphysSettings(ch_types=("ecog",))
    with pytest.raises(SambaUsageError):
        EphysSettings(notch_freq="sometimes")
    with pytest.raises(SambaUsageError):
        EphysSettings(correlation_threshold=1.5)


# --------------------------------------------------------------------------------------------
# bad channels
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_detect_no_false_positives(seed):
    raw, _ = simulate_raw(seed=seed)
    result = detect_bad_channels(raw, EphysSettings())
    assert result["flat"] == [] and result["noisy"] == [] and result["low_correlation"] == []
    scores = result["scores"]
    assert list(scores.index) == CHANNELS_32
    # well clear of the thresholds, not just under them
    assert scores["log_std_z"].max() < 0.7 * EphysSettings().noisy_z_threshold
    assert scores["max_abs_corr"].min() > 0.5


@pytest.mark.parametrize("seed", range(3))
def test_detect_flat_noisy_uncorrelated(seed):
    raw, _ = simulate_raw(seed=seed)
    rng = np.random.default_rng(100 + seed)
    data = raw._data
    flat, noisy, indep, louder = "Fz", "P8", "C3", "O1"
    names = raw.ch_names
    data[names.index(flat)] = 3e-6  # DC offset only
    i = names.index(noisy)
    data[i] += 10 * data[i].std() * rng.standard_normal(raw.n_times)  # very noisy
    i = names.index(indep)
    data[i] = data[i].std() * rng.standard_normal(raw.n_times)  # unrelated, same amplitude
    data[names.index(louder)] *= 1.5  # a louder but good channel
    result = detect_bad_channels(raw, EphysSettings())
    assert result["flat"] == [flat]
    assert result["noisy"] == [noisy]
    assert indep in result["low_correlation"]
    assert set(result["low_correlation"]) <= {indep, noisy}
    assert louder not in result["noisy"] + result["low_correlation"]
    # switched off
    off = detect_bad_channels(raw, EphysSettings(**NO_DETECTION))
    assert off["flat"] == off["noisy"] == off["low_correlation"] == []


def test_detect_absolute_flat_and_known_bads():
    raw, _ = simulate_raw(seed=7)
    raw._data[:] = 0.0  # everything numerically flat: the relative rule cannot decide
    raw._data[:, ::2] = 1e-14
    result = detect_bad_channels(raw, EphysSettings())
    assert result["flat"] == CHANNELS_32


# --------------------------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------------------------


def _amplitude_at(x: np.ndarray, times: np.ndarray, freq: float) -> np.ndarray:
    """Amplitude of the ``freq`` sinusoid in each row (Fourier projection)."""
    return 2 * np.abs((x * np.exp(-2j * np.pi * freq * times)).mean(axis=-1))


def test_preprocess_line_noise_and_alpha():
    sfreq = 1000.0
    raw, _ = simulate_raw(sfreq=sfreq, duration=40.0, seed=3)
    t = raw.times
    rng = np.random.default_rng(0)
    gains = rng.uniform(0.5, 1.5, (len(CHANNELS_32), 1))
    raw._data += gains * (3e-5 * np.sin(2 * np.pi * 50 * t) + 5e-6 * np.sin(2 * np.pi * 150 * t))
    alpha = 5e-6
    raw._data += alpha * np.sin(2 * np.pi * 10 * t)
    settings = EphysSettings(eeg_reference=None, **NO_DETECTION)  # keep the common alpha
    out, report = preprocess_raw(raw, settings)
    assert out.info["sfreq"] == 200.0 and report["sfreq"] == 200.0
    assert report["sfreq_original"] == sfreq and report["line_freq"] == 50.0
    assert report["filter"]["notch_freqs"] == [50.0 * k for k in range(1, 10)]
    f0, p0 = signal.welch(raw.get_data(), fs=sfreq, nperseg=int(4 * sfreq))
    f1, p1 = signal.welch(out.get_data(), fs=200.0, nperseg=800)
    at = lambda f, p, freq: p[:, np.argmin(np.abs(f - freq))]
    # line noise: power at 50 Hz down by at least 30 dB on every channel (measured: ~53 dB)
    assert np.all(at(f1, p1, 50) < 1e-3 * at(f0, p0, 50))
    # alpha at 10 Hz untouched: power ratio and amplitude within 1 %
    np.testing.assert_allclose(at(f1, p1, 10) / at(f0, p0, 10), 1.0, atol=0.02)
    keep0 = (raw.times > 5) & (raw.times < 35)
    keep1 = (out.times > 5) & (out.times < 35)
    ratio = _amplitude_at(out.get_data()[:, keep1], out.times[keep1], 10.0) / _amplitude_at(
        raw.get_data()[:, keep0], raw.times[keep0], 10.0
    )
    np.testing.assert_allclose(ratio, 1.0, atol=0.01)


def test_filter_response_matches_scipy_firwin():
    """Impulse response of the band-pass vs. scipy.signal.firwin with the same -6 dB edges."""
    sfreq, n = 200.0, 12000
    info = mne.create_info(["Cz", "Pz", "Fz"], sfreq, "eeg")
    x = np.zeros((3, n))
    x[0, n // 2] = 1.0
    raw = mne.io.RawArray(x, info, verbose=False)
    settings = EphysSettings(eeg_reference=None, notch_freq=None, **NO_DETECTION)
    out, report = preprocess_raw(raw, settings)
    assert report["sfreq"] == sfreq and report["filter"]["notch_freqs"] is None
    kernel = out.get_data()[0]
    freqs, gain = signal.freqz(kernel, worN=8192, fs=sfreq)
    gain = np.abs(gain)
    # MNE's automatic transition bands: l_trans = 0.5 Hz (-6 dB at 0.25 Hz), filter length
    # 3.3 / 0.5 Hz * 200 Hz + 1 = 1321 taps; h_trans = 20 Hz (-6 dB at 90 Hz)
    ref = signal.firwin(1321, [0.25, 90.0], pass_zero=False, window="hamming", fs=sfreq)
    _, ref_gain = signal.freqz(ref, worN=8192, fs=sfreq)
    ref_gain = np.abs(ref_gain)
    passband = (freqs >= 1.0) & (freqs <= 75.0)
    assert np.abs(gain[passband] - 1).max() < 0.01
    assert np.abs(gain[passband] - ref_gain[passband]).max() < 0.01
    low_edge = freqs <= 2.0  # same length, same window: the high-pass edges coincide
    assert np.abs(gain[low_edge] - ref_gain[low_edge]).max() < 0.01
    assert gain[0] < 0.01
    assert abs(gain[np.argmin(np.abs(freqs - 90.0))] - 0.5) < 0.05

    notch_only = EphysSettings(eeg_reference=None, l_freq=None, h_freq=None, **NO_DETECTION)
    raw.info["line_freq"] = 50.0
    out, report = preprocess_raw(raw, notch_only)
    freqs, gain = signal.freqz(out.get_data()[0], worN=8192, fs=sfreq)
    gain = np.abs(gain)
    g = lambda f: gain[np.argmin(np.abs(freqs - f))]
    assert g(50.0) < 0.01 and g(45.0) > 0.99 and g(55.0) > 0.99 and g(10.0) > 0.999


def test_preprocess_interpolation_reference_annotations():
    raw, _ = simulate_raw(sfreq=500.0, duration=40.0, seed=2)
    onsets_in = np.array([1.0, 2.002, 17.5])
    raw.set_annotations(mne.Annotations(onsets_in, [0, 0, 0], ["R128", "R128", "x"]))
    clean, clean_report = preprocess_raw(raw, EphysSettings())
    assert clean_report["bad_channels"] == []

    broken = raw.copy()
    rng = np.random.default_rng(5)
    target = "CP1"
    i = broken.ch_names.index(target)
    broken._data[i] = broken._data[i].std() * rng.standard_normal(broken.n_times)
    broken.info["bads"] = ["Oz"]  # as if from channels.tsv
    out, report = preprocess_raw(broken, EphysSettings())
    assert report["bads"]["channels_tsv"] == ["Oz"]
    assert report["bads"]["low_correlation"] == [target]
    assert sorted(report["interpolated"]) == sorted(["Oz", target])
    assert out.info["bads"] == [] and out.ch_names == raw.ch_names
    assert report["reference"] == "average" and report["n_channels"] == 32
    json.dumps(report)  # the report is plain JSON
    # the interpolated channel looks like what it should have been: spherical splines on a
    # smooth field sampled by 32 electrodes recover it at r ~ 0.99 (seeds 0-3); 0.95 leaves
    # margin while a failed interpolation (noise, or a flat channel) gives r ~ 0
    for name in (target, "Oz"):
        r = np.corrcoef(out.get_data(picks=[name])[0], clean.get_data(picks=[name])[0])[0, 1]
        assert r > 0.95, (name, r)
    # average reference: channel mean ~0 at every sample
    data = out.get_data()
    assert np.abs(data.mean(axis=0)).max() < 1e-6 * data.std()
    # annotations survive resampling, onsets unchanged in seconds
    onsets, desc = events_from_raw(out)
    np.testing.assert_allclose(onsets, onsets_in)
    assert list(desc) == ["R128", "R128", "x"]
    assert out.info["sfreq"] == 200.0


def test_preprocess_without_positions_drops_bads(caplog):
    raw, _ = simulate_raw(seed=4)
    bare = mne.io.RawArray(raw.get_data(), mne.create_info(raw.ch_names, 250.0, "eeg"),
                           verbose=False)
    bare.info["bads"] = ["Cz"]
    with caplog.at_level(logging.WARNING, logger="samba_pipeline.ephys.preprocess"):
        out, report = preprocess_raw(bare, EphysSettings(**NO_DETECTION))
    assert "Cz" not in out.ch_names and report["dropped"] == ["Cz"]
    assert report["interpolated"] == []
    assert any("no electrode positions" in r.getMessage() for r in caplog.records)
    # a template montage restores interpolation
    bare.info["bads"] = ["Cz"]
    out, report = preprocess_raw(
        bare, EphysSettings(eeg_template_montage="standard_1020", **NO_DETECTION)
    )
    assert report["interpolated"] == ["Cz"] and "Cz" in out.ch_names


def test_preprocess_options_and_errors(caplog):
    raw, _ = simulate_raw(sfreq=250.0, duration=20.0, seed=6)
    raw.info["line_freq"] = None
    stim = mne.io.RawArray(np.zeros((1, raw.n_times)),
                           mne.create_info(["STI"], 250.0, "stim"), verbose=False)
    misc = mne.io.RawArray(np.zeros((1, raw.n_times)),
                           mne.create_info(["RESP"], 250.0, "misc"), verbose=False)
    raw.add_channels([stim, misc], force_update_info=True)
    with caplog.at_level(logging.INFO, logger="samba_pipeline.ephys.preprocess"):
        out, report = preprocess_raw(raw, EphysSettings(raw_resample_sfreq=100.0))
    assert report["filter"]["notch_freqs"] is None  # no line frequency known
    assert report["filter"]["h_freq"] == pytest.approx(45.0)  # capped at 0.45 x 100 Hz
    assert any("capped" in r.getMessage() for r in caplog.records)
    assert "STI" in out.ch_names and "RESP" not in out.ch_names
    series, names, sfreq = ephys_timeseries(out)
    assert series.dtype == np.float32 and series.flags["C_CONTIGUOUS"]
    assert series.shape == (out.n_times, 32) and names == CHANNELS_32 and sfreq == 100.0
    part, _, _ = ephys_timeseries(out, 10, 30)
    np.testing.assert_array_equal(part, series[10:30])
    with pytest.raises(ValueError):
        ephys_timeseries(out, 30, 10)
    # a remaining bad channel is left out of the time series
    kept = EphysSettings(interpolate_bads=False, **NO_DETECTION)
    raw.info["bads"] = ["Pz"]
    out, report = preprocess_raw(raw, kept)
    assert out.info["bads"] == ["Pz"]
    assert "Pz" not in ephys_timeseries(out)[1]
    # explicit notch list and a single reference channel
    raw.info["line_freq"] = 60.0
    out, report = preprocess_raw(
        raw, EphysSettings(notch_freq=[60.0], eeg_reference="Cz", **NO_DETECTION)
    )
    assert report["filter"]["notch_freqs"] == [60.0] and report["reference"] == ["Cz"]
    assert np.abs(out.get_data(picks=["Cz"])).max() == 0.0
    with pytest.raises(SambaInputError, match="no channels of type"):
        preprocess_raw(raw, EphysSettings(ch_types=("meg",)))
    with pytest.raises(SambaInputError, match="eeg_reference"):
        preprocess_raw(raw, EphysSettings(eeg_reference=["XYZ"], **NO_DETECTION))


def test_estimate_mem():
    small = estimate_ephys_mem_gb(64, 1000)
    big = estimate_ephys_mem_gb(64, 600 * 1000)
    assert 0.4 < small < big
    # 64 channels x 10 min at 1 kHz: measured peak 0.85 GB; the estimate must cover it
    assert 0.85 < big < 3.0


def test_detect_per_channel_type():
    """Magnetometers and EEG are judged against their own type (units differ by 1e8)."""
    raw, _ = simulate_raw(seed=8)
    mags = raw.get_data()[:12] * 1e-8  # tesla-sized copies of 12 EEG channels
    mags[3] = 0.0
    info = mne.create_info([f"MEG{i:03d}" for i in range(12)], raw.info["sfreq"], "mag")
    raw.add_channels([mne.io.RawArray(mags, info, verbose=False)], force_update_info=True)
    only_eeg = detect_bad_channels(raw, EphysSettings())
    assert list(only_eeg["scores"].index) == CHANNELS_32 and only_eeg["flat"] == []
    both = detect_bad_channels(raw, EphysSettings(ch_types=("eeg", "mag")))
    assert both["flat"] == ["MEG003"]
    assert both["noisy"] == [] and both["low_correlation"] == []
    assert set(both["scores"]["ch_type"]) == {"eeg", "mag"}
