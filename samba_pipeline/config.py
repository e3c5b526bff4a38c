"""The one settings object of samba-bids.

Built from the command line (``samba_pipeline.cli.parser``) and an optional TOML file
(``--config-file``; values given on the command line win). Every other module receives a
:class:`Settings` (or one of its sections) as an argument: no module reads ``os.environ`` or
``sys.argv`` on its own. The only environment this module *writes* is what third-party
libraries read (TemplateFlow's home and auto-update switch, thread counts), set once by
:func:`Settings.apply_environment` before those libraries are imported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tomllib
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import tomli_w

from samba_pipeline.__about__ import __version__
from samba_pipeline.errors import SambaUsageError

ANALYSIS_LEVELS = ("participant", "group")
NUISANCE_STRATEGIES = ("24P", "36P", "acompcor", "acompcor_gsr", "gsr_only", "none")
SCHAEFER_PARCELS = tuple(range(100, 1001, 100))
SCHAEFER_NETWORKS = (7, 17)


@dataclass
class AtlasSpec:
    """Which atlas to use for one modality.

    Either a TemplateFlow atlas (``name`` such as ``Schaefer2018`` with ``parcels`` and
    ``networks``, in ``template`` at ``resolution``) or a ``path`` to a dseg NIfTI whose label
    table ``<same stem>.tsv`` lies beside it.
    """

    name: str | None = "Schaefer2018"
    path: str | None = None
    parcels: int = 400
    networks: int = 7
    template: str = "MNI152NLin2009cAsym"
    resolution: int = 2

    @classmethod
    def parse(cls, value: str, *, parcels: int, networks: int, template: str) -> "AtlasSpec":
        """Interpret a ``--*-atlas`` value: a path when it names a file, else a TemplateFlow atlas."""
        looks_like_path = os.sep in value or value.endswith((".nii", ".nii.gz")) or Path(value).exists()
        if looks_like_path:
            path = Path(os.path.normpath(Path(value).expanduser().absolute()))
            return cls(name=None, path=str(path), parcels=parcels, networks=networks, template=template)
        if not re.fullmatch(r"[A-Za-z0-9]+", value):
            raise SambaUsageError(
                f"atlas {value!r} is neither an existing dseg NIfTI path nor a TemplateFlow atlas name"
            )
        if value == "Schaefer2018":
            if parcels not in SCHAEFER_PARCELS:
                raise SambaUsageError(
                    f"Schaefer2018 has {', '.join(map(str, SCHAEFER_PARCELS))} parcels, not {parcels}"
                )
            if networks not in SCHAEFER_NETWORKS:
                raise SambaUsageError(f"Schaefer2018 has 7 or 17 networks, not {networks}")
        return cls(name=value, path=None, parcels=parcels, networks=networks, template=template)

    @property
    def is_templateflow(self) -> bool:
        return self.path is None

    def entities(self) -> dict[str, str]:
        """BIDS entities naming this atlas in derivatives (``atlas``, ``seg``, ``scale``)."""
        if self.is_templateflow:
            ents = {"atlas": self.name}
            if self.name == "Schaefer2018":
                ents.update(seg=f"{self.networks}n", scale=str(self.parcels))
            else:
                ents["scale"] = str(self.parcels)
            return ents
        fname = Path(self.path).name
        ents = dict(re.findall(r"(atlas|seg|scale)-([a-zA-Z0-9]+)", fname))
        if "atlas" not in ents:
            stem = re.sub(r"(\.nii(\.gz)?)$", "", fname)
            stem = re.sub(r"_dseg$", "", stem)
            ents["atlas"] = re.sub(r"[^a-zA-Z0-9]", "", stem) or "custom"
        return {k: ents[k] for k in ("atlas", "seg", "scale") if k in ents}

    def label(self) -> str:
        """Short human-readable identity, e.g. ``Schaefer2018 (400 parcels, 7 networks)``."""
        if self.is_templateflow:
            return f"{self.name} ({self.parcels} parcels, {self.networks} networks, {self.template})"
        return f"{Path(self.path).name} (file)"


@dataclass
class ExecutionSettings:
    bids_dir: str = ""
    output_dir: str = ""
    work_dir: str = ""
    analysis_level: str = "participant"
    participant_label: list[str] = field(default_factory=list)
    session_label: list[str] = field(default_factory=list)
    task_id: list[str] = field(default_factory=list)
    bids_filter_file: str | None = None
    bids_filters: dict = field(default_factory=dict)
    derivatives: dict[str, str] = field(default_factory=dict)
    bids_database_dir: str | None = None
    skip_bids_validation: bool = False
    stop_on_first_crash: bool = False
    templateflow_home: str | None = None
    write_graph: bool = True
    verbosity: int = 0
    run_uuid: str = ""
    config_file: str | None = None


#: Nipype execution plugins samba-bids accepts (``--plugin``): local ones, then cluster ones.
LOCAL_PLUGINS = ("Linear", "MultiProc")
CLUSTER_PLUGINS = ("SLURM", "SLURMGraph", "SGE", "SGEGraph", "PBS", "PBSGraph", "LSF", "Condor",
                   "CondorDAGMan", "OAR")
NIPYPE_PLUGINS = LOCAL_PLUGINS + CLUSTER_PLUGINS


@dataclass
class NipypeSettings:
    """How Nipype executes the workflow (never part of :meth:`Settings.configuration_hash`).

    ``plugin``/``plugin_args`` come from ``--plugin``/``--plugin-args`` or from the fMRIPrep-style
    plugin YAML ``use_plugin`` (``plugin:`` + ``plugin_args:``); the command line wins. With a
    cluster plugin every node that is not ``run_without_submitting`` becomes a batch job
    (Nipype writes a pickled node and a batch script under the work directory and submits
    ``sys.executable <script>``), so the work directory must lie on a shared filesystem and the
    same Python environment must be reachable from the compute nodes.
    """

    plugin: str = "MultiProc"
    plugin_args: dict = field(default_factory=dict)
    use_plugin: str | None = None
    nprocs: int = 0
    omp_nthreads: int = 0
    mem_mb: int = 0

    def resolved_nprocs(self) -> int:
        return self.nprocs if self.nprocs > 0 else max(1, os.cpu_count() or 1)

    def is_cluster(self) -> bool:
        """True when nodes are submitted to a batch system (SLURM, SGE, PBS, ...)."""
        return self.plugin in CLUSTER_PLUGINS

    def resolved_omp_nthreads(self) -> int:
        if self.omp_nthreads > 0:
            return self.omp_nthreads
        return max(1, min(self.resolved_nprocs() - 1, 8))

    def get_plugin(self) -> dict[str, Any]:
        """Arguments for ``Workflow.run`` (plugin name and plugin_args)."""
        if self.plugin == "MultiProc" and self.resolved_nprocs() == 1 and not self.plugin_args:
            return {"plugin": "Linear", "plugin_args": {}}
        args: dict[str, Any] = dict(self.plugin_args)
        if self.plugin == "MultiProc":
            args.setdefault("n_procs", self.resolved_nprocs())
            args.setdefault("raise_insufficient", False)
            args.setdefault("maxtasksperchild", 1)
            if self.mem_mb:
                args.setdefault("memory_gb", self.mem_mb / 1024)
        return {"plugin": self.plugin, "plugin_args": args}


@dataclass
class WorkflowSettings:
    ephys_atlas: AtlasSpec = field(default_factory=lambda: AtlasSpec(parcels=200))
    fmri_atlas: AtlasSpec = field(default_factory=lambda: AtlasSpec(parcels=500))
    fmri_space: str = "MNI152NLin2009cAsym"
    use_raw_bold: bool = False
    nuisance_regressors: str = "acompcor"
    fd_threshold: float = 0.5
    high_pass: float | None = 0.01
    low_pass: float | None = None
    min_coverage: float = 0.5
    window_lengths: list[float] = field(default_factory=lambda: [60.0, 15.0])
    volume_trigger: list[str] = field(
        default_factory=lambda: ["R128", "R 128", "Response/R128", "Stimulus/R128", "volume", "TR"]
    )
    ephys: dict[str, Any] = field(default_factory=dict)
    #: How EEG/MEG recordings find their fMRI run: "simultaneous" (same session, task and run;
    #: aligned by scanner triggers), "same-subject" (same subject and task, another session) or
    #: "same-stimulus" (same task, preferably the same subject, else another subject); the last
    #: two are aligned by the stimulus-segment events (``stimulus_event``) of both sessions.
    pairing: str = "simultaneous"
    stimulus_event: list[str] = field(default_factory=lambda: ["movie_segment"])
    stimulus_tolerance: float = 0.1


PAIRING_RULES = ("simultaneous", "same-subject", "same-stimulus")
MODEL_DIRECTIONS = ("ephys2fmri", "fmri2ephys", "both")
SPLITS = ("windows", "subjects", "both")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class ModelSettings:
    """Training (group level) and inference (``--model-file``, participant level) settings.

    They change the model files and predictions, never the participant-level preprocessing, so
    they stay out of :meth:`Settings.configuration_hash`; every model card records them.
    """

    models: list[str] = field(default_factory=lambda: ["samba"])
    direction: str = "ephys2fmri"
    #: "windows": withheld time windows in every run; "subjects": withheld subjects;
    #: "both": one model, tested on withheld windows of the training subjects and on withheld subjects.
    split: str = "both"
    test_subjects: list[str] = field(default_factory=list)
    train_window: float = 60.0
    epochs: int = 100
    batch_size: int = 8
    lr: float = 1e-3
    patience: int = 15
    device: str = "auto"
    n_gpu_procs: int = 0
    train_nproc: int = 1
    #: Command that starts the distributed-training workers (default: torchrun --standalone on
    #: this node); e.g. "srun torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d ...".
    train_launcher: str | None = None
    mc_dropout: int = 0
    model_file: str | None = None
    model_config: dict[str, Any] = field(default_factory=dict)
    #: Benchmark entries (``--benchmark``; "default" = every model, ablation and null): trained on
    #: one split beside the models above (samba_pipeline.training.benchmark); empty = no benchmark.
    benchmark: list[str] = field(default_factory=list)
    #: Epoch cap of every benchmark entry (0: ``epochs``).
    benchmark_epochs: int = 20

    def trained_models(self) -> list[str]:
        """The model plugins to train (``--model none``: none, the group level only summarises)."""
        return [m for m in self.models if m.lower() != "none"]

    def directions(self) -> list[str]:
        return ["ephys2fmri", "fmri2ephys"] if self.direction == "both" else [self.direction]


@dataclass
class SeedSettings:
    master: int = 0

    @property
    def numpy(self) -> int:
        return self.master

    @property
    def torch(self) -> int:
        return self.master + 1


@dataclass
class Settings:
    """All settings of one samba-bids run, in the sections fMRIPrep users know."""

    execution: ExecutionSettings = field(default_factory=ExecutionSettings)
    nipype: NipypeSettings = field(default_factory=NipypeSettings)
    workflow: WorkflowSettings = field(default_factory=WorkflowSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    seeds: SeedSettings = field(default_factory=SeedSettings)
    version: str = __version__

    # ---- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A TOML-ready dict; ``None`` values are listed under ``nulls`` (TOML has no null)."""
        nulls: list[str] = []
        data = _drop_none(dataclasses.asdict(self), nulls)
        if nulls:
            data["nulls"] = nulls
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Settings":
        data = json.loads(json.dumps(data))  # deep copy
        for dotted in data.pop("nulls", []):
            *parents, leaf = dotted.split(".")
            node = data
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = None
        wf = dict(data.get("workflow", {}))
        for key in ("ephys_atlas", "fmri_atlas"):
            if isinstance(wf.get(key), dict):
                wf[key] = AtlasSpec(**wf[key])
        return cls(
            execution=_build(ExecutionSettings, data.get("execution", {})),
            nipype=_build(NipypeSettings, data.get("nipype", {})),
            workflow=_build(WorkflowSettings, wf),
            model=_build(ModelSettings, data.get("model", {})),
            seeds=_build(SeedSettings, data.get("seeds", {})),
            version=data.get("version", __version__),
        )

    def to_toml(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(tomli_w.dumps(self.to_dict()))
        os.replace(tmp, path)
        return path

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> "Settings":
        with open(path, "rb") as fobj:
            return cls.from_dict(tomllib.load(fobj))

    # ---- identity ------------------------------------------------------------------------
    def configuration_hash(self) -> str:
        """Hash of the settings that change results (not paths, filters or performance flags).

        Written to ``GeneratedBy[0].ConfigurationHash`` so that outputs of different
        configurations are never mixed in one output folder (as XCP-D does).
        """
        workflow = dataclasses.asdict(self.workflow)
        for key in ("ephys_atlas", "fmri_atlas"):
            spec = getattr(self.workflow, key)
            if spec.path:  # identify a file atlas by its content, not by where it lies
                workflow[key]["path"] = _file_digest(spec.path)
        payload = {"workflow": workflow, "seed": self.seeds.master}
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    # ---- paths ---------------------------------------------------------------------------
    @property
    def bids_dir(self) -> Path:
        return Path(self.execution.bids_dir)

    @property
    def output_dir(self) -> Path:
        return Path(self.execution.output_dir)

    @property
    def work_dir(self) -> Path:
        return Path(self.execution.work_dir)

    def fmriprep_dir(self) -> Path | None:
        value = self.execution.derivatives.get("fmriprep")
        return Path(value) if value else None

    def log_dir(self, subject: str | None = None) -> Path:
        base = self.output_dir / f"sub-{subject}" if subject else self.output_dir
        return base / "log" / self.execution.run_uuid

    def apply_environment(self) -> None:
        """Set the environment third-party libraries read, before they are imported."""
        if self.execution.templateflow_home:
            os.environ["TEMPLATEFLOW_HOME"] = str(self.execution.templateflow_home)
        # Never let TemplateFlow reach for the network on its own (no network at run time).
        os.environ["TEMPLATEFLOW_AUTOUPDATE"] = "0"
        # Nipype nodes get their threads explicitly; libraries must not oversubscribe.
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ.setdefault(var, str(self.nipype.resolved_omp_nthreads()))
        if self.nipype.is_cluster():
            # Nipype's batch plugins name every job after $LOGNAME, unset in many containers.
            import getpass

            os.environ.setdefault("LOGNAME", getpass.getuser())


def _file_digest(path: str) -> str:
    try:
        return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return str(path)


def new_run_uuid() -> str:
    """A run identifier in fMRIPrep's style: ``YYYYmmdd-HHMMSS_<uuid4>``."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}_{uuid.uuid4()}"


def _build(klass, values: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(klass)}
    unknown = set(values) - names
    if unknown:
        raise SambaUsageError(
            f"unknown setting(s) in section '{klass.__name__.replace('Settings', '').lower()}': "
            + ", ".join(sorted(unknown))
        )
    return klass(**values)


def _drop_none(obj, nulls: list[str], prefix: str = ""):
    """TOML has no null: drop None values of dicts, recording their dotted keys in ``nulls``."""
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            dotted = f"{prefix}{key}"
            if value is None:
                nulls.append(dotted)
            else:
                out[key] = _drop_none(value, nulls, dotted + ".")
        return out
    if isinstance(obj, list):
        return [_drop_none(v, nulls, prefix) for v in obj]
    return obj
