"""The samba-bids command line: parsing into the settings object, and clear refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from samba_pipeline.cli.parser import parse_args, settings_to_cli_toml
from samba_pipeline.cli.run import main
from samba_pipeline.config import Settings
from samba_pipeline.errors import SambaUsageError


def _tree(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*")}


@pytest.fixture
def tiny_bids(tmp_path):
    """A minimal BIDS-looking tree (enough for argument checks and pybids queries)."""
    root = tmp_path / "bids"
    (root / "sub-01" / "eeg").mkdir(parents=True)
    (root / "sub-01" / "func").mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.10.0"}))
    (root / "sub-01" / "eeg" / "sub-01_task-rest_eeg.vhdr").write_text("")
    (root / "sub-01" / "func" / "sub-01_task-rest_bold.nii.gz").write_bytes(b"")
    (root / "derivatives" / "fmriprep").mkdir(parents=True)
    (root / "derivatives" / "fmriprep" / "dataset_description.json").write_text(
        json.dumps({"Name": "fMRIPrep", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
                    "GeneratedBy": [{"Name": "fMRIPrep", "Version": "25.2.0"}]}))
    return root


def test_defaults_and_label_normalisation(tiny_bids, tmp_path):
    s = parse_args([str(tiny_bids), str(tmp_path / "out"), "participant",
                    "--participant-label", "sub-01", "02", "-t", "task-rest", "--session_label", "ses-A",
                    "-w", str(tmp_path / "work")])
    assert s.execution.participant_label == ["01", "02"]
    assert s.execution.task_id == ["rest"]
    assert s.execution.session_label == ["A"]
    # fMRIPrep found in its default place
    assert s.execution.derivatives["fmriprep"] == str(tiny_bids / "derivatives" / "fmriprep")
    assert s.workflow.ephys_atlas.name == "Schaefer2018" and s.workflow.ephys_atlas.parcels == 200
    assert s.workflow.fmri_atlas.parcels == 500
    assert s.workflow.fmri_atlas.entities() == {"atlas": "Schaefer2018", "seg": "7n", "scale": "500"}
    assert s.workflow.nuisance_regressors == "acompcor"
    assert s.workflow.window_lengths == [60.0, 15.0]
    assert s.execution.run_uuid


def test_derivatives_alias_and_performance_flags(tiny_bids, tmp_path):
    other = tmp_path / "fmriprep2"
    other.mkdir()
    s = parse_args([str(tiny_bids), str(tmp_path / "out"), "participant", "--fmriprep-dir", str(other),
                    "-d", f"mne={tmp_path}", "--nprocs", "3", "--omp-nthreads", "2", "--mem", "6G",
                    "--random-seed", "7", "-w", str(tmp_path / "w")])
    assert s.execution.derivatives == {"mne": str(tmp_path), "fmriprep": str(other)}
    assert (s.nipype.nprocs, s.nipype.omp_nthreads, s.nipype.mem_mb) == (3, 2, 6144)
    plugin = s.nipype.get_plugin()
    assert plugin["plugin"] == "MultiProc"
    assert plugin["plugin_args"]["n_procs"] == 3 and plugin["plugin_args"]["memory_gb"] == 6.0
    assert s.seeds.master == 7


def test_config_file_values_and_cli_wins(tiny_bids, tmp_path):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text('nuisance_regressors = "36P"\nfd_threshold = 0.3\n'
                   "[performance]\nnprocs = 4\n[ephys]\nl_freq = 1.0\nh_freq = 40.0\n")
    s = parse_args([str(tiny_bids), str(tmp_path / "out"), "participant", "--config-file", str(cfg),
                    "--nprocs", "1", "-w", str(tmp_path / "w")])
    assert s.workflow.nuisance_regressors == "36P"
    assert s.workflow.fd_threshold == 0.3
    assert s.nipype.nprocs == 1  # the command line wins
    assert s.workflow.ephys == {"l_freq": 1.0, "h_freq": 40.0}


def test_saved_config_reproduces_the_settings(tiny_bids, tmp_path):
    import tomli_w

    s = parse_args([str(tiny_bids), str(tmp_path / "out"), "participant", "-p", "24P",
                    "--window-lengths", "30", "10", "--ephys-setting", "raw_resample_sfreq=250",
                    "--fmri-atlas-parcels", "400", "-w", str(tmp_path / "w")])
    cfg = tmp_path / "saved.toml"
    cfg.write_text(tomli_w.dumps(settings_to_cli_toml(s)))
    s2 = parse_args([str(tiny_bids), str(tmp_path / "out"), "participant", "--config-file", str(cfg),
                     "-w", str(tmp_path / "w")])
    assert s2.workflow == s.workflow
    assert s2.configuration_hash() == s.configuration_hash()


def test_settings_toml_round_trip(tiny_bids, tmp_path):
    s = parse_args([str(tiny_bids), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"),
                    "--low-pass", "0.1"])
    s.to_toml(tmp_path / "s.toml")
    assert Settings.from_toml(tmp_path / "s.toml") == s


@pytest.mark.parametrize(
    "extra, code, fragment",
    [
        (["--fmri-atlas-parcels", "150"], 64, "Schaefer2018 has"),
        (["-d", "fmriprep"], 64, "NAME=PATH"),
        (["-d", "fmriprep=/does/not/exist"], 66, "does not exist"),
        (["--ephys-setting", "not_an_option=3"], 64, "unknown EEG/MEG option"),
        (["--min-coverage", "1.5"], 64, "--min-coverage"),
    ],
)
def test_bad_options_exit_with_one_clear_line(tiny_bids, tmp_path, capsys, extra, code, fragment):
    rc = main([str(tiny_bids), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == code
    assert fragment in err
    assert len(err.splitlines()) == 1


def test_unknown_analysis_level_is_17(tiny_bids, tmp_path, capsys):
    assert main([str(tiny_bids), str(tmp_path / "out"), "participant2"]) == 17
    assert "unknown analysis level 'participant2'" in capsys.readouterr().err


def test_missing_input_is_66_and_not_bids_is_16(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path / "out"), "participant"]) == 66
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("not BIDS")
    before = _tree(plain)
    assert main([str(plain), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w")]) == 16
    err = capsys.readouterr().err
    assert "dataset_description.json is missing" in err
    assert _tree(plain) == before  # nothing written into the input
    assert not (tmp_path / "out").exists()


def test_output_or_work_inside_input_is_refused(tiny_bids, tmp_path, capsys):
    before = _tree(tiny_bids)
    assert main([str(tiny_bids), str(tiny_bids / "derivatives" / "samba"), "participant"]) == 64
    assert "inside the input dataset" in capsys.readouterr().err
    assert main([str(tiny_bids), str(tmp_path / "out"), "participant", "-w", str(tiny_bids / "work")]) == 64
    assert _tree(tiny_bids) == before


def test_unknown_participant_is_18(tiny_bids, tmp_path, capsys):
    before = _tree(tiny_bids)
    rc = main([str(tiny_bids), str(tmp_path / "out"), "participant", "--participant-label", "99",
               "--skip-bids-validation", "-w", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert rc == 18
    assert "participant label(s) 99 not found" in err
    assert _tree(tiny_bids) == before


def test_config_file_unknown_key(tiny_bids, tmp_path, capsys):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text("no_such_option = 1\n")
    rc = main([str(tiny_bids), str(tmp_path / "out"), "participant", "--config-file", str(cfg)])
    assert rc == 64
    assert "unknown option 'no_such_option'" in capsys.readouterr().err


def test_argparse_errors_and_version():
    proc = subprocess.run([sys.executable, "-m", "samba_pipeline.cli", "--version"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("samba-bids ")
    proc = subprocess.run([sys.executable, "-m", "samba_pipeline.cli", "a", "b", "participant",
                           "--no-such-flag"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in proc.stderr


def test_atlas_spec_from_path(tmp_path):
    from samba_pipeline.config import AtlasSpec

    spec = AtlasSpec.parse(str(tmp_path / "tpl-X_res-04_atlas-DemoNested_scale-48_dseg.nii.gz"),
                           parcels=200, networks=7, template="MNI152NLin2009cAsym")
    assert spec.entities() == {"atlas": "DemoNested", "scale": "48"}
    spec = AtlasSpec.parse(str(tmp_path / "my atlas.nii.gz"), parcels=200, networks=7, template="T")
    assert spec.entities() == {"atlas": "myatlas"}
    with pytest.raises(SambaUsageError):
        AtlasSpec.parse("Not-A-Name!", parcels=200, networks=7, template="T")
