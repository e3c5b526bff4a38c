"""Every writer of the derivatives leaves the old file intact and no temporary file when a write
fails midway (disk full, interrupted): temp file in the same folder, then os.replace."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from samba_pipeline.bids import derivatives as d
from samba_pipeline.errors import EXIT_CANTCREAT, SambaOutputError


def _failing_write_bytes(fail_with):
    original = Path.write_bytes

    def write_bytes(self, data):
        original(self, data[: max(1, len(data) // 2)])  # half the bytes reach the disk, then it fails
        raise fail_with

    return write_bytes


def _failing_copyfile(fail_with):
    def copyfile(src, dst, **kwargs):
        Path(dst).write_bytes(Path(src).read_bytes()[:3])
        raise fail_with

    return copyfile


WRITERS = {
    "write_bytes": lambda p, src: d.write_bytes(p, b"new content " * 100),
    "write_text": lambda p, src: d.write_text(p, "new text " * 100),
    "write_json": lambda p, src: d.write_json(p, {"new": list(range(100))}),
    "write_tsv": lambda p, src: d.write_tsv(p, pd.DataFrame({"a": range(100)})),
    "write_tsv_gz": lambda p, src: d.write_tsv(p, pd.DataFrame({"a": range(100)})),
    "copy_file": lambda p, src: d.copy_file(src, p),
}


def _setup(tmp_path, name):
    folder = tmp_path / "out"
    folder.mkdir()
    target = folder / ("old.tsv.gz" if name == "write_tsv_gz" else "old.txt")
    target.write_bytes(b"the old, complete file")
    src = tmp_path / "src.bin"
    src.write_bytes(b"new source bytes " * 100)
    return folder, target, src


@pytest.mark.parametrize("name", sorted(WRITERS))
@pytest.mark.parametrize("failure", ["disk_full", "interrupted"])
def test_failed_write_keeps_the_old_file_and_leaves_no_temp_file(name, failure, tmp_path, monkeypatch):
    folder, target, src = _setup(tmp_path, name)
    exc = OSError(errno.ENOSPC, "No space left on device") if failure == "disk_full" else KeyboardInterrupt()
    monkeypatch.setattr(Path, "write_bytes", _failing_write_bytes(exc))
    monkeypatch.setattr(shutil, "copyfile", _failing_copyfile(exc))
    if failure == "disk_full":
        with pytest.raises(SambaOutputError) as info:
            WRITERS[name](target, src)
        assert info.value.exit_code == EXIT_CANTCREAT
        assert "No space left on device" in str(info.value) and target.name in str(info.value)
    else:
        with pytest.raises(KeyboardInterrupt):
            WRITERS[name](target, src)
    assert target.read_bytes() == b"the old, complete file"
    assert sorted(p.name for p in folder.iterdir()) == [target.name]


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_successful_write_replaces_the_file_whole(name, tmp_path):
    folder, target, src = _setup(tmp_path, name)
    WRITERS[name](target, src)
    assert target.read_bytes() != b"the old, complete file"
    assert sorted(p.name for p in folder.iterdir()) == [target.name]
    if name == "write_json":
        assert json.loads(target.read_text()) == {"new": list(range(100))}
    if name.startswith("write_tsv"):
        assert d.read_tsv(target)["a"].tolist() == list(range(100))


def test_model_files_are_written_atomically(tmp_path, monkeypatch):
    """save_model: weights and card through the same atomic writer."""
    import torch

    from samba_pipeline.training.modelfiles import save_model

    class Tiny(torch.nn.Module):
        plugin_name = "tiny"

        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

    prefix = tmp_path / "m"
    (tmp_path / "m.safetensors").write_bytes(b"old weights")

    def fail(*args, **kwargs):
        Path(args[1]).write_bytes(b"partial")  # safetensors writes the temp file, then fails
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("samba_pipeline.training.modelfiles._st_save_model", fail)
    with pytest.raises(SambaOutputError, match="No space left"):
        save_model(prefix, Tiny())
    assert (tmp_path / "m.safetensors").read_bytes() == b"old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
