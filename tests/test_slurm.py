"""Cluster execution through Nipype's own plugins (``--plugin``, ``--plugin-args``, ``--use-plugin``).

The last test starts a real single-node SLURM cluster on localhost (munged, slurmctld and
slurmd from Debian's ``slurm-wlm`` and ``munge``; ``make slurm-deps`` installs them), runs the
demo participant level through Nipype's SLURM plugin and tears the cluster down. It is skipped,
with the reason, where those programs are missing or the cluster cannot start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pytest

from samba_pipeline.cli.parser import parse_args, settings_to_cli_toml
from samba_pipeline.cli.run import main
from samba_pipeline.config import CLUSTER_PLUGINS, NIPYPE_PLUGINS, Settings


@pytest.fixture
def tiny_bids(tmp_path):
    root = tmp_path / "bids"
    (root / "sub-01" / "eeg").mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.10.0"}))
    return root


def _parse(tiny_bids, tmp_path, *extra):
    return parse_args([str(tiny_bids), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"),
                       *map(str, extra)])


# ---- the options ---------------------------------------------------------------------------------

def test_plugin_choices_cover_the_cluster_plugins():
    import nipype.pipeline.plugins as plugins

    assert {"Linear", "MultiProc", "SLURM", "SLURMGraph", "SGE", "PBS"} <= set(NIPYPE_PLUGINS)
    for name in NIPYPE_PLUGINS:  # every choice is a plugin Nipype has
        assert hasattr(plugins, f"{name}Plugin"), name


def test_plugin_and_json_plugin_args(tiny_bids, tmp_path):
    s = _parse(tiny_bids, tmp_path, "--plugin", "SLURM", "--plugin-args",
               '{"sbatch_args": "-p short --mem=8G", "max_jobs": 20}')
    assert s.nipype.plugin == "SLURM" and s.nipype.is_cluster()
    assert s.nipype.get_plugin() == {"plugin": "SLURM",
                                     "plugin_args": {"sbatch_args": "-p short --mem=8G", "max_jobs": 20}}


def test_key_value_plugin_args(tiny_bids, tmp_path):
    s = _parse(tiny_bids, tmp_path, "--plugin", "SGE", "--plugin-args", "qsub_args=-q all.q -l h_vmem=8G",
               "max_jobs=4")
    assert s.nipype.get_plugin() == {"plugin": "SGE",
                                     "plugin_args": {"qsub_args": "-q all.q -l h_vmem=8G", "max_jobs": 4}}


def test_local_plugins_keep_their_defaults(tiny_bids, tmp_path):
    s = _parse(tiny_bids, tmp_path, "--nprocs", "1")
    assert s.nipype.get_plugin() == {"plugin": "Linear", "plugin_args": {}}
    s = _parse(tiny_bids, tmp_path, "--plugin", "MultiProc", "--nprocs", "2", "--plugin-args", "n_procs=3")
    args = s.nipype.get_plugin()["plugin_args"]
    assert args["n_procs"] == 3 and args["maxtasksperchild"] == 1 and not s.nipype.is_cluster()


def test_plugin_file_and_command_line_precedence(tiny_bids, tmp_path):
    yml = tmp_path / "plugin.yml"
    yml.write_text("plugin: SLURM\nplugin_args:\n  sbatch_args: '-p long'\n  max_jobs: 10\n")
    s = _parse(tiny_bids, tmp_path, "--use-plugin", yml)
    assert s.nipype.use_plugin == str(yml)
    assert s.nipype.get_plugin() == {"plugin": "SLURM",
                                     "plugin_args": {"sbatch_args": "-p long", "max_jobs": 10}}
    # the command line wins, key by key, for the same plugin
    s = _parse(tiny_bids, tmp_path, "--use-plugin", yml, "--plugin-args", "max_jobs=2")
    assert s.nipype.plugin_args == {"sbatch_args": "-p long", "max_jobs": 2}
    # another plugin on the command line drops the file's arguments (they were for SLURM)
    s = _parse(tiny_bids, tmp_path, "--use-plugin", yml, "--plugin", "PBS")
    assert (s.nipype.plugin, s.nipype.plugin_args) == ("PBS", {})


@pytest.mark.parametrize("extra, code, fragment", [
    (["--plugin-args", "{not json"], 64, "not valid JSON"),
    (["--plugin-args", "[1, 2]"], 64, "KEY=VALUE"),
    (["--plugin-args", "max_jobs"], 64, "KEY=VALUE"),
])
def test_bad_plugin_arguments(tiny_bids, tmp_path, capsys, extra, code, fragment):
    rc = main([str(tiny_bids), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == code and fragment in err and len(err.splitlines()) == 1


def test_unknown_plugin_is_refused(tiny_bids, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(tiny_bids, tmp_path, "--plugin", "Dask")
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
    yml = tmp_path / "plugin.yml"
    yml.write_text("plugin: Dask\n")
    rc = main([str(tiny_bids), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"),
               "--use-plugin", str(yml)])
    assert rc == 64 and "unknown Nipype plugin 'Dask'" in capsys.readouterr().err


def test_execution_settings_stay_out_of_the_configuration_hash(tiny_bids, tmp_path):
    base = _parse(tiny_bids, tmp_path)
    slurm = _parse(tiny_bids, tmp_path, "--plugin", "SLURM", "--plugin-args", "sbatch_args=-p x")
    assert base.configuration_hash() == slurm.configuration_hash()


def test_plugin_settings_round_trip(tiny_bids, tmp_path):
    import tomli_w

    s = _parse(tiny_bids, tmp_path, "--plugin", "SLURMGraph", "--plugin-args",
               '{"sbatch_args": "-p x", "dont_resubmit_completed_jobs": true, "template": null}')
    s.to_toml(tmp_path / "s.toml")
    assert Settings.from_toml(tmp_path / "s.toml") == s  # the null goes through 'nulls'
    cfg = tmp_path / "saved.toml"
    cfg.write_text(tomli_w.dumps(settings_to_cli_toml(s)))
    again = parse_args([str(tiny_bids), str(tmp_path / "out"), "participant", "--config-file", str(cfg),
                        "-w", str(tmp_path / "w")])
    assert again.nipype.plugin == "SLURMGraph"
    assert again.nipype.plugin_args == {"sbatch_args": "-p x", "dont_resubmit_completed_jobs": True}
    # the default plugin is not written, so a --use-plugin file can still choose one
    assert "plugin" not in settings_to_cli_toml(_parse(tiny_bids, tmp_path))


def test_cluster_plugins_get_a_job_owner_name(tiny_bids, tmp_path, monkeypatch):
    """Nipype's batch plugins name jobs after $LOGNAME, which many containers leave unset."""
    monkeypatch.delenv("LOGNAME", raising=False)
    for var in ("TEMPLATEFLOW_AUTOUPDATE", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(var, os.environ.get(var, "1"))  # restored afterwards
    _parse(tiny_bids, tmp_path).apply_environment()
    assert "LOGNAME" not in os.environ
    _parse(tiny_bids, tmp_path, "--plugin", "SLURM").apply_environment()
    assert os.environ["LOGNAME"]
    assert set(CLUSTER_PLUGINS) <= set(NIPYPE_PLUGINS)


# ---- a real SLURM cluster on localhost ---------------------------------------------------------

SLURM_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "scancel")
APT_HINT = "apt-get install -y --no-install-recommends slurm-wlm munge (or: make slurm-deps)"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _mem_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 1024


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stop(pid: int | None, timeout: float = 15.0) -> None:
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"({path.name} not written)"


class LocalSlurm:
    """munged + slurmctld + slurmd for one node, 'localhost', all state in a scratch folder."""

    def __init__(self, root: Path, programs: dict[str, str]):
        self.root = root
        self.programs = programs
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.pids: dict[str, Path] = {}

    def write_config(self) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        r = self.root
        cpus = os.cpu_count() or 1
        self.conf.write_text("\n".join([
            "ClusterName=sambatest",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            # no cgroups: plain /proc process tracking, no task containment, no accounting
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SchedulerType=sched/builtin",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "ReturnToService=2",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "InactiveLimit=0",
            "KillWait=5",
            "MinJobAge=600",  # finished jobs stay visible to scontrol for the checks
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={max(_mem_mb() // 2, 100)} "
            "State=UNKNOWN",
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")

    def start(self) -> None:
        r, munge, exe = self.root, self.root / "munge", self.programs
        self._run([exe["munged"], "--force", f"--key-file={munge / 'munge.key'}",
                   f"--socket={self.munge_socket}", f"--pid-file={munge / 'munged.pid'}",
                   f"--log-file={munge / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}"],
                  "munged", munge / "munged.log")
        self.pids["munged"] = munge / "munged.pid"
        self._run([exe["slurmctld"], "-f", str(self.conf)], "slurmctld", r / "log" / "slurmctld.log")
        self.pids["slurmctld"] = r / "slurmctld.pid"
        self._run([exe["slurmd"], "-f", str(self.conf), "-N", "localhost"], "slurmd",
                  r / "log" / "slurmd.log")
        self.pids["slurmd"] = r / "slurmd.pid"
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True,
                                  text=True, timeout=30)
            state = (proc.stdout + proc.stderr).strip()
            if proc.returncode == 0 and state == "idle":
                return
            time.sleep(1)
        raise RuntimeError(f"the node did not become idle within 60 s (sinfo: {state!r})\n"
                           + self.logs())

    def _run(self, cmd: list[str], name: str, log: Path) -> None:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} exited with {proc.returncode}: {proc.stderr.strip()}\n"
                               + _tail(log))

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{_tail(p)}" for p in
                         (self.root / "munge" / "munged.log", self.root / "log" / "slurmctld.log",
                          self.root / "log" / "slurmd.log"))

    def stop(self) -> None:
        if "slurmctld" in self.pids:
            proc = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True,
                                  text=True, timeout=30)
            jobs = proc.stdout.split()
            if jobs:
                subprocess.run(["scancel", *jobs], env=self.env, capture_output=True, timeout=30)
                time.sleep(2)
        for name in ("slurmd", "slurmctld", "munged"):
            if name in self.pids:
                _stop(_pid(self.pids[name]))


@pytest.fixture(scope="module")
def slurm_cluster():
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    programs = {name: shutil.which(name, path=search) for name in SLURM_PROGRAMS}
    missing = [name for name, path in programs.items() if path is None]
    if missing:
        pytest.skip(f"SLURM test cluster not available: {', '.join(missing)} not installed "
                    f"(Debian/Ubuntu: {APT_HINT})")
    if os.geteuid() != 0:
        pytest.skip("SLURM test cluster not available: slurmd must run as root to launch jobs "
                    "(run the test suite as root, e.g. in CI containers)")
    root = Path(tempfile.mkdtemp(prefix="samba-slurm-"))  # short: the munge socket path is limited
    cluster = LocalSlurm(root, programs)
    try:
        cluster.write_config()
        cluster.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        cluster.stop()
        pytest.skip(f"SLURM test cluster could not start: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_demo_participant_level_through_slurm(slurm_cluster, tmp_path):
    from samba_pipeline.simulate import generate_demo_dataset

    bids, truth = generate_demo_dataset(tmp_path / "demo", subjects=2, minutes=2.0)
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(slurm_cluster.env)
    env.pop("LOGNAME", None)  # samba-bids supplies it for Nipype's job names
    plugin_args = {"sbatch_args": "-p debug -c 1 -t 30", "max_jobs": 8}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "samba_pipeline.cli", str(bids), str(out), "participant", "-w", str(work),
         "--config-file", str(truth / "samba-bids-demo.toml"), "--skip-bids-validation",
         "--plugin", "SLURM", "--plugin-args", json.dumps(plugin_args)],
        env=env, capture_output=True, text=True, timeout=1100)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-4000:] + "\n" + slurm_cluster.logs()
    print(f"demo participant level through SLURM: {seconds:.0f} s")

    for subject in ("01", "02"):
        sub = out / f"sub-{subject}"
        assert list(sub.glob("func/*_stat-mean_timeseries.tsv")), sub
        assert list(sub.glob("func/*_stat-cosine_relmat.tsv")), sub
        assert list(sub.glob("eeg/*_desc-preproc_timeseries.tsv.gz")), sub
        assert list(sub.glob("*_alignment.json")), sub

    # Every computing node went to SLURM as its own batch job, for both subjects.
    batch = next(work.glob("samba_bids_*_wf/batch"))
    scripts = sorted(batch.glob("batchscript_*.sh"))
    job_logs = sorted(batch.glob("slurm-*.out"))
    per_run = ("preprocess_ephys", "parcellate_bold", "align", "crop_graph")
    # The computing nodes of each subject (the report nodes run as jobs too); sinks and sidecar
    # nodes run in the submitting process.
    submitted = {re.search(r"_wf_(\w+)\.sh$", p.name).group(1) for p in scripts}
    assert set(per_run) <= submitted <= set(per_run) | {"reportlets", "report"}, submitted
    assert len(scripts) == len(job_logs) and len(scripts) % 2 == 0, [p.name for p in scripts]
    assert sys.executable in scripts[0].read_text()
    job_names, spans = [], []
    for log in job_logs:
        job_id = re.fullmatch(r"slurm-(\d+)\.out", log.name).group(1)
        info = subprocess.run(["scontrol", "show", "job", job_id], env=slurm_cluster.env,
                              capture_output=True, text=True, timeout=30).stdout
        assert "JobState=COMPLETED" in info and "BatchHost=localhost" in info, info
        job_names.append(re.search(r"JobName=(\S+)", info).group(1))
        spans.append(tuple(datetime.fromisoformat(re.search(rf"{key}=(\S+)", info).group(1))
                           for key in ("StartTime", "EndTime")))
    for subject in ("01", "02"):
        for node in per_run:
            assert any(name.startswith(f"{node}.") and f".sub_{subject}_wf." in name
                       for name in job_names), (node, subject, job_names)
    # The subjects fan out: jobs of different subjects ran at the same time on the node's CPUs.
    subject_of = [re.search(r"\.sub_(\w+?)_wf\.", name).group(1) for name in job_names]
    assert any(subject_of[i] != subject_of[j] and spans[i][0] < spans[j][1] and spans[j][0] < spans[i][1]
               for i in range(len(spans)) for j in range(i + 1, len(spans))), list(zip(job_names, spans))
