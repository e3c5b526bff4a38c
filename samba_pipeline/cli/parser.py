"""Command-line interface of the ``samba-bids`` BIDS App.

Spelled as fMRIPrep/XCP-D users know it (see README, 'Command-line reference'): three
positional arguments, ``--participant-label`` style filters, ``-d NAME=PATH`` derivatives and
fMRIPrep's performance flags. The arguments are parsed into the single
:class:`samba_pipeline.config.Settings` object by :func:`parse_args`.
"""

from __future__ import annotations

import argparse
import json
import re
import tomllib
from pathlib import Path
from typing import Any, Sequence

from samba_pipeline.__about__ import __version__
from samba_pipeline.cli.argtypes import nonneg_int, positive_float, positive_int
from samba_pipeline.config import (
    ANALYSIS_LEVELS,
    DEVICES,
    MODEL_DIRECTIONS,
    NIPYPE_PLUGINS,
    NUISANCE_STRATEGIES,
    PAIRING_RULES,
    SPLITS,
    AtlasSpec,
    ExecutionSettings,
    ModelSettings,
    NipypeSettings,
    SeedSettings,
    Settings,
    WorkflowSettings,
    new_run_uuid,
)
from samba_pipeline.errors import (
    SambaBadLevelError,
    SambaMissingInputError,
    SambaUsageError,
    SambaValidationError,
)


def _strip_prefix(prefix: str):
    def _strip(value: str) -> str:
        value = value.strip()
        if value.startswith(prefix):
            value = value[len(prefix):]
        if not re.fullmatch(r"[a-zA-Z0-9]+", value):
            raise argparse.ArgumentTypeError(
                f"{value!r} is not a valid BIDS label (letters and digits only)"
            )
        return value

    return _strip


def _existing_file(value: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"file {value} does not exist")
    return path.absolute()


def _mem_mb(value: str) -> int:
    """Memory with an optional unit suffix (default MB), as fMRIPrep's --mem accepts."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)[bB]?\s*", value)
    if not match:
        raise argparse.ArgumentTypeError(f"cannot read memory amount {value!r} (e.g. 8000, 8G)")
    number, unit = float(match.group(1)), match.group(2).upper()
    factor = {"": 1, "K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}[unit]
    return int(number * factor)


def _model_names(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names or not all(re.fullmatch(r"[A-Za-z0-9_.-]+", n) for n in names):
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list of model names")
    return names


def _benchmark_entries(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names or not all(re.fullmatch(r"[A-Za-z0-9_.:-]+", n) for n in names):
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list of benchmark entries")
    return names


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The argument parser; with ``suppress_defaults`` only options given explicitly appear."""
    default = argparse.SUPPRESS if suppress_defaults else None

    def d(value):
        return argparse.SUPPRESS if suppress_defaults else value

    parser = argparse.ArgumentParser(
        prog="samba-bids",
        description=(
            "samba-bids: translate brain activity between EEG/MEG and fMRI. Preprocesses "
            "BIDS EEG/MEG and fMRIPrep outputs, parcellates them, aligns them in time and "
            "builds connectivity graphs (participant level), then trains and applies "
            "translation models (group level)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=default,
    )
    parser.add_argument("bids_dir", type=Path, help="root of the raw BIDS dataset (EEG/MEG and BOLD)")
    parser.add_argument("output_dir", type=Path, help="where the derivatives are written")
    parser.add_argument(
        "analysis_level",
        help="processing stage: 'participant' (per subject) or 'group' (across subjects)",
    )
    parser.add_argument("--version", action="version", version=f"samba-bids {__version__}")

    g = parser.add_argument_group("Selecting data")
    g.add_argument(
        "--participant-label", "--participant_label", dest="participant_label", nargs="+",
        type=_strip_prefix("sub-"), default=d(None), metavar="LABEL",
        help="subjects to process (without or with 'sub-'); default: all",
    )
    g.add_argument(
        "--session-label", "--session-id", "--session_label", dest="session_label", nargs="+",
        type=_strip_prefix("ses-"), default=d(None), metavar="LABEL",
        help="sessions to process; default: all",
    )
    g.add_argument(
        "-t", "--task-id", "--task_id", dest="task_id", nargs="+", type=_strip_prefix("task-"),
        default=d(None), metavar="TASK", help="tasks to process; default: all",
    )
    g.add_argument(
        "--bids-filter-file", dest="bids_filter_file", type=_existing_file, default=d(None),
        metavar="FILE",
        help="JSON of PyBIDS filters per query ('ephys', 'bold'): {query: {entity: value}}",
    )
    g.add_argument(
        "--bids-database-dir", dest="bids_database_dir", type=Path, default=d(None), metavar="DIR",
        help="a PyBIDS database folder to reuse (saves re-indexing large datasets)",
    )
    g.add_argument(
        "--skip-bids-validation", "--skip_bids_validation", dest="skip_bids_validation",
        action="store_true", default=d(False), help="do not run the BIDS validator on the input",
    )

    g = parser.add_argument_group("Inputs")
    g.add_argument(
        "-d", "--derivatives", dest="derivatives", nargs="+", default=d(None), metavar="NAME=PATH",
        help="derivative datasets to use, e.g. fmriprep=/data/derivatives/fmriprep",
    )
    g.add_argument(
        "--fmriprep-dir", dest="fmriprep_dir", type=Path, default=d(None), metavar="PATH",
        help="fMRIPrep derivatives (alias of -d fmriprep=PATH); default: BIDS_DIR/derivatives/fmriprep",
    )
    g.add_argument(
        "--use-raw-bold", dest="use_raw_bold", action="store_true", default=d(False),
        help="without fMRIPrep derivatives, use the raw BOLD series, which must already be in "
        "the --fmri-space template space (no confound regression is possible)",
    )
    g.add_argument(
        "--templateflow-home", dest="templateflow_home", type=Path, default=d(None), metavar="DIR",
        help="TemplateFlow cache holding the atlases (default: $TEMPLATEFLOW_HOME); never downloads",
    )

    g = parser.add_argument_group("Atlases and spaces")
    g.add_argument(
        "--ephys-atlas", dest="ephys_atlas", default=d("Schaefer2018"), metavar="ATLAS|PATH",
        help="EEG/MEG atlas: a TemplateFlow atlas name or a dseg NIfTI path (label table "
        "<stem>.tsv beside it)",
    )
    g.add_argument("--ephys-atlas-parcels", dest="ephys_atlas_parcels", type=int, default=d(200),
                   metavar="N", help="parcels of the EEG/MEG atlas (Schaefer: 100..1000)")
    g.add_argument("--ephys-atlas-networks", dest="ephys_atlas_networks", type=int, default=d(7),
                   choices=(7, 17), help="networks of the EEG/MEG Schaefer atlas")
    g.add_argument(
        "--fmri-atlas", dest="fmri_atlas", default=d("Schaefer2018"), metavar="ATLAS|PATH",
        help="fMRI atlas: a TemplateFlow atlas name or a dseg NIfTI path",
    )
    g.add_argument("--fmri-atlas-parcels", dest="fmri_atlas_parcels", type=int, default=d(500),
                   metavar="N", help="parcels of the fMRI atlas (Schaefer: 100..1000)")
    g.add_argument("--fmri-atlas-networks", dest="fmri_atlas_networks", type=int, default=d(7),
                   choices=(7, 17), help="networks of the fMRI Schaefer atlas")
    g.add_argument("--fmri-space", dest="fmri_space", default=d("MNI152NLin2009cAsym"),
                   metavar="TEMPLATE", help="template space of the fMRIPrep BOLD series to use")

    g = parser.add_argument_group("Processing")
    g.add_argument(
        "-p", "--nuisance-regressors", dest="nuisance_regressors", default=d("acompcor"),
        choices=NUISANCE_STRATEGIES,
        help="confound strategy (XCP-D names): acompcor = 24 motion parameters + 5 aCompCor + "
        "cosine drift",
    )
    g.add_argument("--fd-threshold", dest="fd_threshold", type=positive_float, default=d(0.5),
                   metavar="MM", help="framewise displacement above which volumes are reported "
                   "as high-motion (they are not removed: that would break the timing)")
    g.add_argument("--high-pass", dest="high_pass", type=float, default=d(0.01), metavar="HZ",
                   help="BOLD high-pass cutoff (0 disables)")
    g.add_argument("--low-pass", dest="low_pass", type=float, default=d(0.0), metavar="HZ",
                   help="BOLD low-pass cutoff (0 disables)")
    g.add_argument("--min-coverage", dest="min_coverage", type=float, default=d(0.5),
                   metavar="FRACTION", help="parcels with less brain-mask coverage are set to n/a")
    g.add_argument("--window-lengths", dest="window_lengths", type=positive_float, nargs="+",
                   default=d([60.0, 15.0]), metavar="S",
                   help="lengths of the model windows written to the window index")
    g.add_argument("--volume-trigger", dest="volume_trigger", nargs="+", default=d(None),
                   metavar="NAME", help="names of the scanner volume markers in the EEG events "
                   "(default: R128, 'R 128', volume, TR ...)")
    g.add_argument("--pairing", dest="pairing", choices=PAIRING_RULES, default=d("simultaneous"),
                   help="how EEG/MEG recordings find their fMRI run: recorded together (same "
                   "session/task/run, aligned by scanner triggers), or in other sessions of the "
                   "same subject / by any subject watching the same stimulus (same task), aligned "
                   "by the stimulus-segment events of both events.tsv files")
    g.add_argument("--stimulus-event", dest="stimulus_event", nargs="+", default=d(None),
                   metavar="NAME", help="trial_type of the stimulus-segment onsets in events.tsv "
                   "(non-simultaneous pairing; default: movie_segment); segments are matched by "
                   "their stim_file column")
    g.add_argument("--stimulus-tolerance", dest="stimulus_tolerance", type=positive_float,
                   default=d(0.1), metavar="S", help="largest spread of the per-segment offsets "
                   "between the two sessions (presentation jitter) before alignment fails")
    g.add_argument(
        "--ephys-setting", dest="ephys_setting", nargs="+", default=d(None), metavar="KEY=VALUE",
        help="EEG/MEG preprocessing option with MNE-BIDS-Pipeline's names, e.g. l_freq=1 "
        "h_freq=40 raw_resample_sfreq=250 notch_freq=60 (also an [ephys] table in --config-file)",
    )

    g = parser.add_argument_group("EEG/MEG (ephys) options",
                                  "shortcuts for --ephys-setting keys; they win over it")
    g.add_argument("--ephys-space", dest="ephys_space", choices=("source", "sensor"),
                   default=d(None), help="EEG/MEG nodes: atlas parcels on a template head "
                   "('source'), or the sensors (default: ephys setting 'space', 'sensor')")
    g.add_argument("--inverse-method", dest="inverse_method",
                   choices=("eLORETA", "dSPM", "sLORETA", "MNE"), default=d(None),
                   help="source-space inverse (default: ephys setting 'inverse_method', eLORETA)")
    g.add_argument("--source-extract", dest="source_extract", choices=("pca", "mean_flip"),
                   default=d(None), help="parcel time course from its sources (default: ephys "
                   "setting 'source_extract', pca = MNE's pca_flip)")

    g = parser.add_argument_group(
        "Translation model",
        "group level: train and evaluate the model(s) on the participants' derivatives, then apply "
        "them to every subject; participant level with --model-file: apply a trained model")
    g.add_argument("--model", dest="models", type=_model_names, default=d(["samba"]), metavar="NAME[,NAME]",
                   help="model plugin(s) to train (group level): samba, or any plugin registered "
                   "under the samba_bids.models entry point; 'none': only the QC summary")
    g.add_argument("--direction", dest="direction", choices=MODEL_DIRECTIONS, default=d("ephys2fmri"),
                   help="translate EEG/MEG to fMRI, fMRI to EEG/MEG, or train both")
    g.add_argument("--split", dest="split", choices=SPLITS, default=d("both"),
                   help="what the test metrics withhold: time windows of every run, whole subjects "
                   "(--test-subjects), or both at once (one model, two test sets)")
    g.add_argument("--test-subjects", dest="test_subjects", nargs="+", type=_strip_prefix("sub-"),
                   default=d(None), metavar="LABEL",
                   help="subjects withheld for testing (default: the last subject label)")
    g.add_argument("--train-window", dest="train_window", type=positive_float, default=d(60.0),
                   metavar="SECONDS", help="length of the training/evaluation windows")
    g.add_argument("--epochs", dest="epochs", type=positive_int, default=d(100), metavar="N",
                   help="maximum training epochs")
    g.add_argument("--batch-size", dest="batch_size", type=positive_int, default=d(8), metavar="N",
                   help="windows per training batch")
    g.add_argument("--learning-rate", "--lr", dest="lr", type=positive_float, default=d(1e-3),
                   metavar="LR", help="AdamW learning rate")
    g.add_argument("--patience", dest="patience", type=nonneg_int, default=d(15), metavar="N",
                   help="stop after N epochs without validation improvement (0: never stop early)")
    g.add_argument("--model-setting", dest="model_setting", action="append", default=d(None),
                   metavar="KEY=VALUE", help="model plugin setting (repeatable), e.g. dropout=0.2")
    g.add_argument("--device", dest="device", choices=DEVICES, default=d("auto"),
                   help="where training and inference run (auto: CUDA when available)")
    g.add_argument("--n-gpu-procs", dest="n_gpu_procs", type=nonneg_int, default=d(0), metavar="N",
                   help="GPU nodes Nipype's MultiProc runs at once (0: one per visible GPU)")
    g.add_argument("--train-nproc", dest="train_nproc", type=positive_int, default=d(1), metavar="N",
                   help="training processes: N > 1 trains with torchrun + DistributedDataParallel "
                   "(one process per GPU, or gloo processes on CPU)")
    g.add_argument("--train-launcher", dest="train_launcher", default=d(None), metavar="COMMAND",
                   help="command that starts the training workers instead of 'torchrun --standalone "
                   "--nproc-per-node N', e.g. 'srun torchrun --nnodes 2 --nproc-per-node 4 "
                   "--rdzv-backend c10d --rdzv-endpoint HOST:29500' for several nodes")
    g.add_argument("--mc-dropout", dest="mc_dropout", type=nonneg_int, default=d(0), metavar="N",
                   help="Monte-Carlo dropout samples per prediction; writes a per-parcel standard "
                   "deviation beside each prediction (0: off)")
    g.add_argument("--benchmark", dest="benchmark", type=_benchmark_entries, default=d(None),
                   metavar="ENTRY[,ENTRY]",
                   help="group level: also train every entry on one split and write the benchmark "
                   "table group/desc-benchmark_metrics.{tsv,md,svg}; entries are model plugins "
                   "(samba, mlp, cnn, lstm, transformer, ridge, calhas), SAMBA ablations "
                   "(samba:no_wavelet_attention, samba:no_lstm, samba:fixed_hrf, samba:transformer, "
                   "samba:mse, samba:no_pinv_hrf, samba:no_skip_loss), shuffled-EEG nulls "
                   "(shuffled:<entry>), or 'default' for all of them")
    g.add_argument("--benchmark-epochs", dest="benchmark_epochs", type=nonneg_int, default=d(20),
                   metavar="N", help="epoch cap of every benchmark entry (0: --epochs)")
    g.add_argument("--model-file", dest="model_file", type=_existing_file, default=d(None),
                   metavar="PATH", help="participant level: apply this trained model (its .json "
                   "card or .safetensors weights); subjects with only EEG/MEG (or only fMRI) get "
                   "predictions too")

    g = parser.add_argument_group("Performance")
    g.add_argument("--nprocs", "--nthreads", "--n-cpus", "--n_cpus", dest="nprocs", type=int,
                   default=d(0), metavar="N", help="processes Nipype may run at once (0: all CPUs)")
    g.add_argument("--omp-nthreads", dest="omp_nthreads", type=int, default=d(0), metavar="N",
                   help="threads per process (0: min(nprocs - 1, 8))")
    g.add_argument("--mem-mb", "--mem", "--mem_mb", dest="mem_mb", type=_mem_mb, default=d(0),
                   metavar="MB", help="memory Nipype may schedule (unit suffix allowed, e.g. 8G)")
    g.add_argument("--use-plugin", "--nipype-plugin-file", dest="use_plugin", type=_existing_file,
                   default=d(None), metavar="FILE",
                   help="YAML with 'plugin:' and 'plugin_args:' for Nipype's execution "
                   "(fMRIPrep's format); --plugin and --plugin-args win over it")
    g.add_argument("--plugin", "--nipype-plugin", dest="plugin", choices=NIPYPE_PLUGINS, default=d(None),
                   help="Nipype execution plugin (default MultiProc, Linear with --nprocs 1); the "
                   "cluster plugins submit every node as a batch job, which needs the work "
                   "directory and the Python environment on a shared filesystem")
    g.add_argument("--plugin-args", "--plugin_args", dest="plugin_args", nargs="+", default=d(None),
                   metavar="JSON|KEY=VALUE",
                   help="Nipype plugin arguments as one JSON object or KEY=VALUE pairs (values read as "
                   "JSON when possible), e.g. '{\"sbatch_args\": \"-p short --mem=8G\"}' or "
                   "max_jobs=20")

    g = parser.add_argument_group("Run control")
    g.add_argument("-w", "--work-dir", dest="work_dir", type=Path, default=d(None), metavar="DIR",
                   help="intermediate results; reuse it to resume a run (default: ./work)")
    g.add_argument("--stop-on-first-crash", dest="stop_on_first_crash", action="store_true",
                   default=d(False), help="stop at the first failing node")
    g.add_argument("--config-file", dest="config_file", type=_existing_file, default=d(None),
                   metavar="FILE", help="TOML file of these options (keys as the long options; relative "
                   "paths are relative to the file); "
                   "values given on the command line win")
    g.add_argument("--random-seed", dest="random_seed", type=int, default=d(0), metavar="N",
                   help="master random seed")
    g.add_argument("--no-write-graph", dest="write_graph", action="store_false", default=d(True),
                   help="do not write the workflow graph")
    g.add_argument("-v", "--verbose", dest="verbosity", action="count", default=d(0),
                   help="more output (-v info on every node, -vv debug and tracebacks)")
    return parser


# Options that hold paths (resolved against the current directory).
_PATH_DESTS = {"bids_dir", "output_dir", "work_dir", "fmriprep_dir", "templateflow_home",
               "bids_database_dir", "bids_filter_file", "use_plugin", "config_file", "model_file"}


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    """Parse the command line (and ``--config-file``) into a validated :class:`Settings`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = vars(build_parser(suppress_defaults=True).parse_args(argv))
    ephys_table: dict[str, Any] = {}
    if args.config_file:
        file_values, ephys_table = _read_config_file(args.config_file, parser)
        base = Path(args.config_file).parent
        for dest, value in file_values.items():
            if dest not in explicit:
                if dest in _PATH_DESTS and value is not None:
                    value = base / Path(value).expanduser()
                elif dest in ("ephys_atlas", "fmri_atlas") and _looks_like_path(str(value)):
                    value = str(base / Path(value).expanduser())
                setattr(args, dest, value)
    return settings_from_args(args, ephys_table)


def _looks_like_path(value: str) -> bool:
    return "/" in value or value.endswith((".nii", ".nii.gz"))


def _read_config_file(path: Path, parser: argparse.ArgumentParser) -> tuple[dict, dict]:
    try:
        with open(path, "rb") as fobj:
            data = tomllib.load(fobj)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SambaUsageError(f"cannot read TOML configuration: {exc}", path=path) from None
    dests = {a.dest for a in parser._actions}
    # Long option names map to their dest too (e.g. "model" -> models, "learning_rate" -> lr).
    aliases = {opt.lstrip("-").replace("-", "_"): a.dest for a in parser._actions
               for opt in a.option_strings if opt.startswith("--")}
    values: dict[str, Any] = {}
    ephys: dict[str, Any] = {}

    def visit(table: dict, section: str | None):
        for key, value in table.items():
            dest = key.replace("-", "_")
            dest = dest if dest in dests or dest == "ephys" else aliases.get(dest, dest)
            if isinstance(value, dict) and dest == "ephys":
                ephys.update(value)
            elif isinstance(value, dict) and dest == "plugin_args":
                values[dest] = value
            elif isinstance(value, dict) and section is None:
                visit(value, dest)
            elif dest in dests and dest not in {"help", "version", "config_file"}:
                values[dest] = value
            else:
                raise SambaUsageError(f"unknown option {key!r} in the configuration file", path=path)

    visit(data, None)
    return values, ephys


def _parse_key_values(items: Sequence[str] | None, what: str, form: str = "KEY=VALUE"
                      ) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        key, _, value = item.partition("=")
        if not key.strip() or not value.strip():
            raise SambaUsageError(f"{what} expects {form}, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _coerce(value: str) -> Any:
    """Read a KEY=VALUE value as JSON when possible (numbers, null, lists), else a string."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _inside(child: Path, parent: Path) -> bool:
    child, parent = child.resolve(), parent.resolve()
    return child == parent or parent in child.parents


def settings_from_args(args: argparse.Namespace, ephys_table: dict | None = None) -> Settings:
    """Validate the parsed arguments and build the settings object."""
    level = str(args.analysis_level)
    if level not in ANALYSIS_LEVELS:
        raise SambaBadLevelError(
            f"unknown analysis level {level!r}; choose one of: {', '.join(ANALYSIS_LEVELS)}"
        )

    bids_dir = Path(args.bids_dir).expanduser().absolute()
    if not bids_dir.is_dir():
        raise SambaMissingInputError("input BIDS folder does not exist (check container bind mounts)",
                                     path=bids_dir)
    if not (bids_dir / "dataset_description.json").is_file():
        raise SambaValidationError(
            "not a BIDS dataset: dataset_description.json is missing", path=bids_dir
        )
    output_dir = Path(args.output_dir).expanduser().absolute()
    if _inside(output_dir, bids_dir):
        raise SambaUsageError(
            f"the output folder {output_dir} is inside the input dataset {bids_dir}; samba-bids "
            "never writes into its input: choose a folder outside it"
        )
    work_dir = Path(args.work_dir or Path.cwd() / "work").expanduser().absolute()
    if _inside(work_dir, bids_dir):
        raise SambaUsageError(
            f"the work folder {work_dir} is inside the input dataset {bids_dir}; pass -w/--work-dir "
            "with a folder outside it"
        )
    derivatives = {
        name: str(Path(path).expanduser().absolute())
        for name, path in _parse_key_values(args.derivatives, "-d/--derivatives", "NAME=PATH").items()
    }
    if args.fmriprep_dir:
        derivatives["fmriprep"] = str(Path(args.fmriprep_dir).expanduser().absolute())
    elif "fmriprep" not in derivatives and (bids_dir / "derivatives" / "fmriprep").is_dir():
        derivatives["fmriprep"] = str(bids_dir / "derivatives" / "fmriprep")
    for name, path in derivatives.items():
        if not Path(path).is_dir():
            raise SambaMissingInputError(f"derivatives dataset '{name}' does not exist", path=path)

    bids_filters: dict = {}
    if args.bids_filter_file:
        try:
            bids_filters = json.loads(Path(args.bids_filter_file).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SambaUsageError(f"cannot read the BIDS filter file: {exc}",
                                  path=args.bids_filter_file) from None
        if not isinstance(bids_filters, dict) or not all(
            isinstance(v, dict) for v in bids_filters.values()
        ):
            raise SambaUsageError("the BIDS filter file must map query names to {entity: value}",
                                  path=args.bids_filter_file)

    template = args.fmri_space
    ephys_atlas = AtlasSpec.parse(str(args.ephys_atlas), parcels=args.ephys_atlas_parcels,
                                  networks=args.ephys_atlas_networks, template=template)
    fmri_atlas = AtlasSpec.parse(str(args.fmri_atlas), parcels=args.fmri_atlas_parcels,
                                 networks=args.fmri_atlas_networks, template=template)

    ephys = dict(ephys_table or {})
    ephys.update({k: _coerce(v) for k, v in
                  _parse_key_values(args.ephys_setting, "--ephys-setting").items()})
    for dest, key in (("ephys_space", "space"), ("inverse_method", "inverse_method"),
                      ("source_extract", "source_extract")):
        if getattr(args, dest, None) is not None:
            ephys[key] = getattr(args, dest)
    _check_ephys_settings(ephys)

    if args.nprocs < 0 or args.omp_nthreads < 0 or args.mem_mb < 0:
        raise SambaUsageError("--nprocs, --omp-nthreads and --mem-mb must not be negative")
    if not 0 <= args.min_coverage <= 1:
        raise SambaUsageError("--min-coverage must lie between 0 and 1")

    nipype = NipypeSettings(nprocs=args.nprocs, omp_nthreads=args.omp_nthreads, mem_mb=args.mem_mb)
    if args.use_plugin:
        nipype.use_plugin = str(args.use_plugin)
        nipype.plugin, nipype.plugin_args = _read_plugin_file(Path(args.use_plugin))
    cli_plugin_args = _plugin_args(args.plugin_args)
    if args.plugin and args.plugin != nipype.plugin:  # another plugin: the file's arguments are not for it
        nipype.plugin, nipype.plugin_args = str(args.plugin), {}
    nipype.plugin_args = {**nipype.plugin_args, **cli_plugin_args}
    if nipype.plugin not in NIPYPE_PLUGINS:
        raise SambaUsageError(f"unknown Nipype plugin {nipype.plugin!r}; choose one of: "
                              + ", ".join(NIPYPE_PLUGINS))

    workflow = WorkflowSettings(
        ephys_atlas=ephys_atlas,
        fmri_atlas=fmri_atlas,
        fmri_space=template,
        use_raw_bold=bool(args.use_raw_bold),
        nuisance_regressors=args.nuisance_regressors,
        fd_threshold=float(args.fd_threshold),
        high_pass=float(args.high_pass) or None,
        low_pass=float(args.low_pass) or None,
        min_coverage=float(args.min_coverage),
        window_lengths=[float(x) for x in args.window_lengths],
        ephys=ephys,
    )
    if args.volume_trigger:
        workflow.volume_trigger = list(args.volume_trigger)
    workflow.pairing = str(args.pairing)
    workflow.stimulus_tolerance = float(args.stimulus_tolerance)
    if args.stimulus_event:
        workflow.stimulus_event = list(args.stimulus_event)

    execution = ExecutionSettings(
        bids_dir=str(bids_dir),
        output_dir=str(output_dir),
        work_dir=str(work_dir),
        analysis_level=level,
        participant_label=list(args.participant_label or []),
        session_label=list(args.session_label or []),
        task_id=list(args.task_id or []),
        bids_filter_file=str(args.bids_filter_file) if args.bids_filter_file else None,
        bids_filters=bids_filters,
        derivatives=derivatives,
        bids_database_dir=str(args.bids_database_dir) if args.bids_database_dir else None,
        skip_bids_validation=bool(args.skip_bids_validation),
        stop_on_first_crash=bool(args.stop_on_first_crash),
        templateflow_home=str(Path(args.templateflow_home).absolute()) if args.templateflow_home else None,
        write_graph=bool(args.write_graph),
        verbosity=int(args.verbosity or 0),
        run_uuid=new_run_uuid(),
        config_file=str(args.config_file) if args.config_file else None,
    )
    model = ModelSettings(
        models=list(args.models) if not isinstance(args.models, str) else _model_names(args.models),
        direction=args.direction, split=args.split, test_subjects=list(args.test_subjects or []),
        train_window=float(args.train_window), epochs=int(args.epochs), batch_size=int(args.batch_size),
        lr=float(args.lr), patience=int(args.patience), device=args.device,
        n_gpu_procs=int(args.n_gpu_procs), train_nproc=int(args.train_nproc), mc_dropout=int(args.mc_dropout),
        train_launcher=args.train_launcher or None,
        benchmark=(list(args.benchmark) if not isinstance(args.benchmark, str)
                   else _benchmark_entries(args.benchmark)) if args.benchmark else [],
        benchmark_epochs=int(args.benchmark_epochs),
        model_file=str(Path(args.model_file).absolute()) if args.model_file else None,
        model_config={k: _coerce(v) for k, v in
                      _parse_key_values(args.model_setting, "--model-setting").items()},
    )
    if model.model_file and level != "participant":
        raise SambaUsageError("--model-file applies a trained model at the participant level; the "
                              "group level trains its own")
    return Settings(execution=execution, nipype=nipype, workflow=workflow, model=model,
                    seeds=SeedSettings(master=int(args.random_seed)))


def _check_ephys_settings(ephys: dict) -> None:
    from samba_pipeline.ephys.preprocess import EphysSettings

    try:
        EphysSettings.from_dict(ephys)
    except (TypeError, ValueError) as exc:
        raise SambaUsageError(f"invalid EEG/MEG setting: {exc}") from None


def _read_plugin_file(path: Path) -> tuple[str, dict]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SambaUsageError(f"cannot read the Nipype plugin file: {exc}", path=path) from None
    if not isinstance(data, dict) or "plugin" not in data:
        raise SambaUsageError("the Nipype plugin file needs a 'plugin:' entry", path=path)
    args = data.get("plugin_args") or {}
    if not isinstance(args, dict):
        raise SambaUsageError("'plugin_args:' must be a mapping", path=path)
    return str(data["plugin"]), args


def _plugin_args(value) -> dict[str, Any]:
    """``--plugin-args``: one JSON object, or KEY=VALUE pairs (a TOML table is taken as it is)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    items = [value] if isinstance(value, str) else list(value)
    if len(items) == 1 and items[0].lstrip().startswith("{"):
        try:
            parsed = json.loads(items[0])
        except json.JSONDecodeError as exc:
            raise SambaUsageError(f"--plugin-args is not valid JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise SambaUsageError("--plugin-args JSON must be an object")
        return parsed
    return {k: _coerce(v) for k, v in _parse_key_values(items, "--plugin-args").items()}


def settings_to_cli_toml(settings: Settings) -> dict[str, Any]:
    """The settings as a ``--config-file`` TOML table (re-usable to repeat a run)."""
    wf, ex, ny = settings.workflow, settings.execution, settings.nipype

    def atlas_value(spec: AtlasSpec) -> str:
        return spec.path if spec.path else str(spec.name)

    table: dict[str, Any] = {
        "participant_label": ex.participant_label,
        "session_label": ex.session_label,
        "task_id": ex.task_id,
        "skip_bids_validation": ex.skip_bids_validation,
        "derivatives": [f"{k}={v}" for k, v in ex.derivatives.items()],
        "ephys_atlas": atlas_value(wf.ephys_atlas),
        "ephys_atlas_parcels": wf.ephys_atlas.parcels,
        "ephys_atlas_networks": wf.ephys_atlas.networks,
        "fmri_atlas": atlas_value(wf.fmri_atlas),
        "fmri_atlas_parcels": wf.fmri_atlas.parcels,
        "fmri_atlas_networks": wf.fmri_atlas.networks,
        "fmri_space": wf.fmri_space,
        "use_raw_bold": wf.use_raw_bold,
        "nuisance_regressors": wf.nuisance_regressors,
        "fd_threshold": wf.fd_threshold,
        "high_pass": wf.high_pass or 0.0,
        "low_pass": wf.low_pass or 0.0,
        "min_coverage": wf.min_coverage,
        "window_lengths": wf.window_lengths,
        "volume_trigger": wf.volume_trigger,
        "pairing": wf.pairing,
        "stimulus_event": wf.stimulus_event,
        "stimulus_tolerance": wf.stimulus_tolerance,
        "nprocs": ny.nprocs,
        "omp_nthreads": ny.omp_nthreads,
        "mem_mb": ny.mem_mb,
        "random_seed": settings.seeds.master,
    }
    plugin_args = {k: v for k, v in ny.plugin_args.items() if v is not None}
    if ny.plugin != "MultiProc" or plugin_args:  # the default stays out: a --use-plugin file may set it
        table["plugin"] = ny.plugin
    if plugin_args:
        table["plugin_args"] = plugin_args
    md = settings.model
    table.update({
        "model": ",".join(md.models), "direction": md.direction, "split": md.split,
        "train_window": md.train_window, "epochs": md.epochs, "batch_size": md.batch_size,
        "learning_rate": md.lr, "patience": md.patience, "device": md.device,
        "n_gpu_procs": md.n_gpu_procs, "train_nproc": md.train_nproc, "mc_dropout": md.mc_dropout,
    })
    if md.test_subjects:
        table["test_subjects"] = md.test_subjects
    if md.model_file:
        table["model_file"] = md.model_file
    if md.train_launcher:
        table["train_launcher"] = md.train_launcher
    if md.benchmark:
        table["benchmark"] = ",".join(md.benchmark)
        table["benchmark_epochs"] = md.benchmark_epochs
    if md.model_config:
        table["model_setting"] = [f"{k}={json.dumps(v)}" for k, v in md.model_config.items()]
    if ex.templateflow_home:
        table["templateflow_home"] = ex.templateflow_home
    if wf.ephys:
        table["ephys"] = dict(wf.ephys)
    return table


__all__ = ["build_parser", "parse_args", "settings_from_args", "settings_to_cli_toml"]
