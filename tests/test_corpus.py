"""A corpus of broken datasets: each gets one clear error, a documented exit code, nothing lost.

The corpus is generated from the demo generator (one subject, two minutes). Each case copies it,
breaks one thing and runs ``samba-bids`` as a user would (a subprocess at default verbosity).
For every failing case the test checks:

- the exit code (the table in README.md, 'Exit codes and error messages');
- one error line, the last line of stderr, that names the file and the problem, and no traceback;
- the input dataset is byte-identical before and after the run (SHA-256 of every file, symlinks
  followed);
- nothing half-written in the output folder: no temporary file (``*.tmp``), every JSON/TSV/NIfTI
  there is whole (parses / decompresses), no output at all of the subject when a pre-check stopped
  the run before any node ran, and no fMRI result (``sub-01/func``) when the BOLD side failed.

One more case gathers the defects a run should survive with a warning (symlinked files,
participants.tsv disagreeing with the folders, zero-variance parcels, an EEG recording shorter than
the fMRI run with triggers missing, an EEG sidecar missing) and checks that it finishes.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nibabel as nb
import numpy as np
import pandas as pd
import pytest
import torch

from samba_pipeline.bids.derivatives import read_tsv

pytestmark = pytest.mark.slow

FMRIPREP = "derivatives/fmriprep/sub-01/func"
PREPROC = f"{FMRIPREP}/sub-01_task-rest_space-MNI152NLin2009cAsym_desc-preproc_bold"
CONFOUNDS = f"{FMRIPREP}/sub-01_task-rest_desc-confounds_timeseries.tsv"
EEG = "sub-01/eeg/sub-01_task-rest"
ATLASES = "derivatives/atlases/tpl-MNI152NLin2009cAsym"
PRECHECK, FUNC, EEG_SIDE = "precheck", "func", "eeg"


@pytest.fixture(scope="module")
def corpus_demo(tmp_path_factory):
    from samba_pipeline.simulate import generate_demo_dataset

    root = tmp_path_factory.mktemp("corpus")
    bids, _ = generate_demo_dataset(root / "bids", subjects=1, minutes=2.0, truth_dir=root / "truth")
    return bids


def digest(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (symlinks followed) and the targets of the symlinks."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel + " ->"] = os.readlink(path)
        if path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _atlas_images(bids: Path) -> list[Path]:
    return sorted((bids / ATLASES).glob("*_dseg.nii.gz"),
                  key=lambda p: int(p.name.split("scale-")[1].split("_")[0]))


def run_samba(bids: Path, out: Path, work: Path, *extra, wrapper: list[str] | None = None):
    images = _atlas_images(bids)
    args = [str(bids), str(out), "participant", "--participant-label", "01", "--skip-bids-validation",
            "-w", str(work), "--nprocs", "1", "--ephys-atlas", str(images[0]),
            "--fmri-atlas", str(images[-1]),
            *map(str, extra)]
    cmd = [sys.executable, *(wrapper or ["-m", "samba_pipeline.cli"]), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


# ---------------------------------------------------------------------------------------------
# The breakers: each changes the copy in ``bids`` and returns the file name the error must name
# ---------------------------------------------------------------------------------------------
def _rewrite_tsv(path: Path, fn) -> None:
    table = pd.read_csv(path, sep="\t", keep_default_na=False)
    fn(table).to_csv(path, sep="\t", index=False)


def _edit_json(path: Path, **changes) -> None:
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))


def no_description(bids, tmp):
    (bids / "dataset_description.json").unlink()
    return "dataset_description.json"


def invalid_description(bids, tmp):
    (bids / "dataset_description.json").write_text('{"Name": "demo", "BIDSVersion": ')
    return "dataset_description.json"


def description_without_bidsversion(bids, tmp):
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "demo"}))
    return "dataset_description.json"


def no_repetition_time(bids, tmp):
    for sidecar in (bids / f"{PREPROC}.json", bids / "sub-01/func/sub-01_task-rest_bold.json"):
        _edit_json(sidecar, RepetitionTime=None)
    return "sub-01_task-rest_space-MNI152NLin2009cAsym_desc-preproc_bold.json"


def no_bold_sidecars(bids, tmp):
    (bids / f"{PREPROC}.json").unlink()
    (bids / "sub-01/func/sub-01_task-rest_bold.json").unlink()
    return "sub-01_task-rest_space-MNI152NLin2009cAsym_desc-preproc_bold"


def no_events_tsv(bids, tmp):
    (bids / f"{EEG}_events.tsv").unlink()
    (bids / f"{EEG}_events.json").unlink()
    return "sub-01_task-rest_events.tsv"


def corrupt_nifti(bids, tmp):
    path = bids / f"{PREPROC}.nii.gz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return path.name


def truncated_nifti(bids, tmp):
    path = bids / f"{PREPROC}.nii.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))  # a valid gzip stream, half the volumes
    return path.name


def _set_bold(bids, fn) -> str:
    path = bids / f"{PREPROC}.nii.gz"
    img = nb.load(path)
    data = np.asanyarray(img.dataobj).astype(np.float32)
    fn(data)
    nb.Nifti1Image(data, img.affine, img.header).to_filename(path)
    return path.name


def nan_in_bold(bids, tmp):
    return _set_bold(bids, lambda d: d.__setitem__((slice(10, 12), slice(10, 12), slice(10, 12), 5), np.nan))


def inf_in_bold(bids, tmp):
    return _set_bold(bids, lambda d: d.__setitem__((15, 15, 15, 7), np.inf))


def constant_bold(bids, tmp):
    return _set_bold(bids, lambda d: d.__setitem__(Ellipsis, d.mean(axis=3, keepdims=True)))


def _events(bids) -> Path:
    return bids / f"{EEG}_events.tsv"


def no_triggers(bids, tmp):
    _rewrite_tsv(_events(bids), lambda t: t[t["trial_type"] != "R128"])
    return "sub-01_task-rest_events.tsv"


def no_overlap(bids, tmp):
    _rewrite_tsv(_events(bids), lambda t: t.assign(onset=t["onset"] + 3600.0))
    return "sub-01_task-rest_eeg.vhdr"


def trigger_spacing_not_tr(bids, tmp):
    def halve(t):
        trig = t["trial_type"] == "R128"
        first = t.loc[trig, "onset"].iloc[0]
        t.loc[trig, "onset"] = first + 0.5 * (t.loc[trig, "onset"] - first)  # triggers every TR / 2
        return t
    _rewrite_tsv(_events(bids), halve)
    return "sub-01_task-rest_eeg.vhdr"


def sampling_rate_mismatch(bids, tmp):
    _edit_json(bids / f"{EEG}_eeg.json", SamplingFrequency=250)
    return "sub-01_task-rest_eeg.json"


def non_utf8_events(bids, tmp):
    path = _events(bids)
    text = path.read_text().replace("stim", "stimulus-\u00e9t\u00e9", 1)
    if "\u00e9" not in text:  # no stimulus rows: add a column with a Latin-1 value
        lines = text.splitlines()
        text = "\n".join([lines[0] + "\tnote"] + [line + "\tr\u00e9ponse" for line in lines[1:]]) + "\n"
    path.write_bytes(text.encode("latin-1"))
    return "sub-01_task-rest_events.tsv"


def confounds_missing_columns(bids, tmp):
    path = bids / CONFOUNDS
    motion = ("trans_", "rot_", "a_comp_cor")
    _rewrite_tsv(path, lambda t: t[[c for c in t.columns if not c.startswith(motion)]])
    return path.name


def confounds_fewer_rows(bids, tmp):
    path = bids / CONFOUNDS
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-5]) + "\n")
    return path.name


def atlas_outside_fov(bids, tmp):
    fine = _atlas_images(bids)[-1]
    img = nb.load(fine)
    affine = img.affine.copy()
    affine[:3, 3] += 400.0  # 40 cm away from the brain
    nb.Nifti1Image(np.asanyarray(img.dataobj), affine, img.header).to_filename(fine)
    return fine.name


def atlas_other_space(bids, tmp):
    for image in _atlas_images(bids):
        for src in (image, image.with_name(image.name.replace(".nii.gz", ".tsv"))):
            src.rename(src.with_name(src.name.replace("MNI152NLin2009cAsym", "MNI152NLin6Asym")))
    return "tpl-MNI152NLin6Asym_res-04_atlas-DemoNested_scale-20_dseg.nii.gz"


def bold_other_space(bids, tmp):
    for path in (bids / FMRIPREP).glob("*space-MNI152NLin2009cAsym*"):
        path.rename(path.with_name(path.name.replace("space-MNI152NLin2009cAsym", "space-T1w")))
    return "sub-01"


def duplicate_bold(bids, tmp):
    for ext in (".nii.gz", ".json"):
        src = bids / f"{PREPROC}{ext}"
        shutil.copyfile(src, src.with_name(src.name.replace("_desc-preproc", "_res-2_desc-preproc")))
    return "sub-01_task-rest_space-MNI152NLin2009cAsym_res-2_desc-preproc_bold.nii.gz"


def duplicate_eeg(bids, tmp):
    folder = (bids / EEG).parent
    for src in sorted(folder.glob("sub-01_task-rest_eeg.*")) + [folder / "sub-01_task-rest_channels.tsv"]:
        dest = folder / src.name.replace("task-rest_", "task-rest_acq-copy_")
        if src.suffix in (".vhdr", ".vmrk"):
            text = src.read_text(encoding="latin-1").replace("sub-01_task-rest_eeg.",
                                                              "sub-01_task-rest_acq-copy_eeg.")
            dest.write_text(text, encoding="latin-1")
        else:
            shutil.copyfile(src, dest)
    return "sub-01_task-rest_acq-copy_eeg.vhdr"


def participant_without_folder(bids, tmp):
    """participants.tsv lists sub-02 but there is no folder: asking for it is an error (18)."""
    _rewrite_tsv(bids / "participants.tsv",
                 lambda t: pd.concat([t, t.iloc[:1].assign(participant_id="sub-02")], ignore_index=True))
    return str(bids)


def eeg_data_file_missing(bids, tmp):
    (bids / f"{EEG}_eeg.eeg").unlink()
    return "sub-01_task-rest_eeg.eeg"


CARD = {"ModelFileFormat": 1, "Plugin": "samba", "PluginVersion": "1", "Config": {},
        "Dims": {"direction": "ephys2fmri", "n_source": 20, "n_target": 50, "source_sfreq": 50.0,
                 "target_sfreq": 0.5, "window_s": 30.0}, "Weights": "model.safetensors"}


def _model(tmp: Path, card: dict, weights: Callable[[Path], None]) -> Path:
    folder = tmp / "model"
    folder.mkdir()
    (folder / "model.json").write_text(json.dumps(card))
    weights(folder / "model.safetensors")
    return folder / "model.json"


def _safetensors(path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(path))


def pickled_weights(bids, tmp):
    """A pickle disguised as safetensors weights (what a malicious model file would be)."""
    _model(tmp, CARD, lambda p: torch.save({"w": torch.zeros(3)}, p))
    return "model.safetensors"


def huge_model_card(bids, tmp):
    _model(tmp, dict(CARD, Dims=dict(CARD["Dims"], n_source=10**9, n_target=10**9)), _safetensors)
    return "model.json"


def foreign_model_card(bids, tmp):
    _model(tmp, dict(CARD, Loader="pickle", Code="import os"), _safetensors)
    return "model.json"


@dataclass
class Case:
    breaker: Callable[[Path, Path], str]
    code: int
    problem: str  # a regular expression the error line must match
    stage: str = PRECHECK  # or the modality whose node failed (FUNC, EEG_SIDE)
    extra: list = field(default_factory=list)


CASES = {
    "dataset_description_missing": Case(no_description, 16, "is missing"),
    "dataset_description_invalid_json": Case(invalid_description, 16, "not valid JSON"),
    "dataset_description_without_bidsversion": Case(description_without_bidsversion, 16, "BIDSVersion"),
    "bold_without_repetition_time": Case(no_repetition_time, 65, "RepetitionTime"),
    "bold_sidecars_missing": Case(no_bold_sidecars, 66, "sidecar.*not found"),
    "events_tsv_missing": Case(no_events_tsv, 66, "no events.tsv"),
    "corrupt_nifti": Case(corrupt_nifti, 65, "cannot read the BOLD series"),
    "truncated_nifti": Case(truncated_nifti, 65, "truncated", FUNC),
    "nan_in_bold": Case(nan_in_bold, 65, "NaN", FUNC),
    "inf_in_bold": Case(inf_in_bold, 65, "Inf", FUNC),
    "zero_variance_bold": Case(constant_bold, 65, "constant over time", FUNC),
    "eeg_without_volume_triggers": Case(no_triggers, 65, "no scanner volume triggers"),
    "eeg_and_fmri_do_not_overlap": Case(no_overlap, 65, "do not overlap in time", EEG_SIDE),
    "trigger_spacing_is_not_the_tr": Case(trigger_spacing_not_tr, 65, "inconsistent with the repetition time",
                                          EEG_SIDE),
    "sampling_rate_metadata_mismatch": Case(sampling_rate_mismatch, 65, "SamplingFrequency 250 Hz", EEG_SIDE),
    "eeg_data_file_missing": Case(eeg_data_file_missing, 66, "DataFile .* is missing"),
    "non_utf8_events_tsv": Case(non_utf8_events, 65, "not UTF-8"),
    "confounds_missing_columns": Case(confounds_missing_columns, 65, "lacks.*trans_x", FUNC),
    "confounds_fewer_rows": Case(confounds_fewer_rows, 65, "rows"),
    "atlas_outside_bold_field_of_view": Case(atlas_outside_fov, 65, "bounding boxes overlap by only", FUNC),
    "atlas_in_another_template_space": Case(atlas_other_space, 65, "template space MNI152NLin6Asym"),
    "bold_in_another_space": Case(bold_other_space, 18, "space\\(s\\) T1w"),
    "duplicate_bold_runs": Case(duplicate_bold, 65, "several BOLD series"),
    "duplicate_eeg_runs": Case(duplicate_eeg, 65, "several EEG/MEG recordings"),
    "participants_tsv_lists_missing_folder": Case(participant_without_folder, 18, "label\\(s\\) 02 not found",
                                                  extra=["--participant-label", "01", "02"]),
    "model_file_is_a_pickle": Case(pickled_weights, 65, "not a safetensors file.*never unpickles",
                                   extra=["--model-file", "{tmp}/model/model.json"]),
    "model_card_with_huge_shapes": Case(huge_model_card, 65, "n_source=1000000000",
                                        extra=["--model-file", "{tmp}/model/model.json"]),
    "model_card_with_unexpected_keys": Case(foreign_model_card, 65, "unexpected key\\(s\\) Code, Loader",
                                            extra=["--model-file", "{tmp}/model/model.json"]),
}


def check_outputs(out: Path, stage: str) -> None:
    """Nothing half-written: no temporary files, every file whole, no results of the failed step."""
    if not out.exists():
        return
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.endswith(".tmp") or ".tmp" in p.suffixes], files
    for path in files:
        if path.name.endswith(".json"):
            json.loads(path.read_text())
        elif path.name.endswith(".tsv"):
            read_tsv(path)
        elif path.name.endswith(".nii.gz"):
            np.asanyarray(nb.load(path).dataobj)
    subject = [p.relative_to(out) for p in files if p.relative_to(out).parts[0] == "sub-01"]
    if stage == PRECHECK:
        assert not subject, subject  # stopped before any node ran: no subject outputs, not even logs
    elif stage == FUNC:  # the BOLD parcellation failed: no fMRI result at all
        assert not [p for p in subject if p.parts[1] == "func"], subject
    elif stage == EEG_SIDE:
        # Reading or aligning the EEG failed: the finished nodes' whole files (fMRI parcels,
        # EEG bad-channel table) may stay; no EEG time series and no alignment or windows.
        assert not [p for p in subject if p.parts[1] == "eeg" and p.name.endswith("_timeseries.tsv")], subject
        assert not [p for p in subject if p.name.endswith(("_alignment.json", "_windows.tsv"))], subject


def check_error(proc, code: int, problem: str, name: str) -> str:
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert re.search(problem, last), last
    assert name in last, last
    errors = [line for line in proc.stderr.splitlines()
              if "| CRITICAL" in line or line.startswith("samba-bids: error")]
    assert errors == [last], errors  # one error line
    return last


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_one_clear_error(case, corpus_demo, tmp_path):
    spec = CASES[case]
    bids = tmp_path / "bids"
    shutil.copytree(corpus_demo, bids)
    name = spec.breaker(bids, tmp_path)
    before = digest(bids)
    out = tmp_path / "out"
    extra = [str(a).format(tmp=tmp_path) for a in spec.extra]
    proc = run_samba(bids, out, tmp_path / "work", *extra)
    last = check_error(proc, spec.code, spec.problem, name)
    print(f"\n{case}: exit {proc.returncode}: {last.split('| CRITICAL  | ')[-1].split('error: ')[-1]}")
    assert digest(bids) == before  # the input dataset is never modified
    check_outputs(out, spec.stage)


# ---------------------------------------------------------------------------------------------
# Output folder problems: read-only, disk full
# ---------------------------------------------------------------------------------------------
def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return proc.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True)


def test_read_only_output_dir(corpus_demo, tmp_path):
    out = tmp_path / "out"
    mounted = _mount_tmpfs(out, "ro,size=1m")
    if not mounted:
        if os.geteuid() == 0:
            pytest.skip("running as root without permission to mount a read-only tmpfs")
        out.mkdir(exist_ok=True)
        out.chmod(0o555)
    before = digest(corpus_demo)
    try:
        proc = run_samba(corpus_demo, out, tmp_path / "work")
        check_error(proc, 73, "not writable", str(out))
        assert not list(out.iterdir())
    finally:
        _umount(out) if mounted else out.chmod(0o755)
    assert digest(corpus_demo) == before


# A stand-in for a full disk where no small tmpfs can be mounted (not root): every write into
# the output folder fails with ENOSPC, as it would on a full file system.
_DISK_FULL = """
import errno, os, pathlib, shutil, sys
out = os.path.abspath(sys.argv[1])
def _full(path):
    if os.path.abspath(str(path)).startswith(out + os.sep) and not str(path).endswith(".lock"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
_write_bytes, _copyfile = pathlib.Path.write_bytes, shutil.copyfile
def write_bytes(self, data):
    _full(self)
    return _write_bytes(self, data)
def copyfile(src, dst, **kw):
    _full(dst)
    return _copyfile(src, dst, **kw)
pathlib.Path.write_bytes, shutil.copyfile = write_bytes, copyfile
from samba_pipeline.cli.run import main
sys.exit(main(sys.argv[2:]))
"""


def test_disk_full_output_dir(corpus_demo, tmp_path):
    out = tmp_path / "out"
    # 32 kB: room for the dataset-level files, not for the atlases copied next.
    mounted = _mount_tmpfs(out, "size=32k")
    wrapper = None if mounted else ["-c", _DISK_FULL, str(out)]
    before = digest(corpus_demo)
    try:
        proc = run_samba(corpus_demo, out, tmp_path / "work", wrapper=wrapper)
        check_error(proc, 73, "No space left on device", str(out))
        check_outputs(out, PRECHECK)
    finally:
        if mounted:
            _umount(out)
    assert digest(corpus_demo) == before


# ---------------------------------------------------------------------------------------------
# Messy but usable: finishes, with a warning for each defect
# ---------------------------------------------------------------------------------------------
def test_messy_dataset_runs_with_warnings(corpus_demo, tmp_path):
    bids = tmp_path / "bids"
    shutil.copytree(corpus_demo, bids)
    # 1. Symlinked files (a datalad/git-annex checkout): followed, and their targets left alone.
    store = tmp_path / "annex"
    store.mkdir()
    for rel in (f"{PREPROC}.nii.gz", f"{EEG}_eeg.vhdr", f"{EEG}_eeg.eeg", f"{EEG}_eeg.vmrk"):
        target = store / Path(rel).name
        shutil.move(bids / rel, target)
        (bids / rel).symlink_to(target)
    # 2. participants.tsv lists a subject without folder and misses sub-01.
    _rewrite_tsv(bids / "participants.tsv", lambda t: t.assign(participant_id="sub-07"))
    # 3. Two fMRI parcels have a constant (zero-variance) signal.
    fine = _atlas_images(bids)[-1]
    atlas = np.asanyarray(nb.load(fine).dataobj)
    table = pd.read_csv(fine.with_name(fine.name.replace(".nii.gz", ".tsv")), sep="\t")
    flat_labels = [int(i) for i in table["index"][:2]]
    bold = nb.load(bids / f"{PREPROC}.nii.gz")
    assert bold.shape[:3] == atlas.shape
    # 4. The EEG stops at 80 % of the fMRI run; 5 triggers are lost in the middle.
    raw_eeg = (store / "sub-01_task-rest_eeg.eeg").read_bytes()
    header = (store / "sub-01_task-rest_eeg.vhdr").read_text(encoding="latin-1")
    n_channels = sum(1 for line in header.splitlines() if re.match(r"Ch\d+=", line))
    frame = n_channels * (4 if "IEEE_FLOAT_32" in header else 2)
    # (the symlink targets in 'annex' are edited before the run)
    data = np.asanyarray(bold.dataobj).astype(np.float32)
    for label in flat_labels:
        data[atlas == label] = 100.0
    nb.Nifti1Image(data, bold.affine, bold.header).to_filename(store / f"{Path(PREPROC).name}.nii.gz")
    (store / "sub-01_task-rest_eeg.eeg").write_bytes(raw_eeg[: int(len(raw_eeg) * 0.8) // frame * frame])

    def drop_triggers(t):
        trig = np.flatnonzero(t["trial_type"].to_numpy() == "R128")
        return t.drop(index=t.index[trig[10:15]])
    _rewrite_tsv(_events(bids), drop_triggers)
    # 5. No EEG sidecar JSON.
    (bids / f"{EEG}_eeg.json").unlink()

    before, store_before = digest(bids), digest(store)
    out = tmp_path / "out"
    proc = run_samba(bids, out, tmp_path / "work")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    warnings = [r"participants\.tsv lists participant\(s\) without a sub-\* folder: sub-07",
                r"participants\.tsv does not list the participant folder\(s\) sub-01",
                r"2 parcel\(s\) have a constant \(zero-variance\) BOLD signal",
                r"volume trigger\(s\) lie outside the ephys recording|after the ephys recording were cropped",
                r"only \d+ volume trigger\(s\) for \d+ volumes",
                r"no JSON sidecar found"]
    for pattern in warnings:
        assert re.search(pattern, proc.stderr), pattern
    assert digest(bids) == before and digest(store) == store_before
    assert all((bids / rel).is_symlink() for rel in (f"{PREPROC}.nii.gz", f"{EEG}_eeg.eeg"))
    series = sorted((out / "sub-01" / "func").glob("*scale-50*_timeseries.tsv"))
    assert series, sorted(p.name for p in (out / "sub-01").rglob("*"))
    ts = read_tsv(series[0])
    names = table.set_index("index").loc[flat_labels, "name"].tolist()
    assert ts[names].isna().all().all() and ts.drop(columns=names).notna().any().any()
    check_outputs(out, "finished")
