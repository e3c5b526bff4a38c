"""Layout queries: which (EEG/MEG run, fMRI run) pairs exist per subject, session and task.

fMRIPrep's own index skips ``eeg/`` and ``meg/``; samba-bids indexes ``eeg``, ``meg`` and
``func`` of the raw dataset itself (pybids), plus the fMRIPrep derivatives, and pairs runs that
share session, task and run. What was found and what was skipped is reported, not guessed.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from samba_pipeline.config import Settings
from samba_pipeline.errors import (
    SambaInputError,
    SambaMissingInputError,
    SambaNoMatchError,
    SambaValidationError,
)

LOGGER = logging.getLogger("samba_pipeline.bids")

EPHYS_EXTENSIONS = [".vhdr", ".edf", ".bdf", ".set", ".fif", ".con", ".sqd"]
PAIR_ENTITIES = ("session", "task", "run")


@dataclass
class RunPair:
    """One simultaneous (or paired) EEG/MEG recording and fMRI run of a subject."""

    subject: str
    session: str | None
    task: str
    run: str | None
    ephys_file: str | None
    ephys_datatype: str | None
    bold_file: str | None
    bold_json: str | None = None
    mask_file: str | None = None
    confounds_file: str | None = None
    bold_source: str = "fmriprep"  # "fmriprep" or "raw"
    acquisition: str | None = None
    #: "simultaneous" (aligned by scanner triggers), or the rule that paired recordings of
    #: different sessions/subjects (aligned by the stimulus events in the two events files)
    pairing: str = "simultaneous"
    ephys_events: str | None = None
    bold_events: str | None = None

    @property
    def entities(self) -> dict[str, str]:
        ents = {"subject": self.subject, "session": self.session, "task": self.task, "run": self.run}
        return {k: v for k, v in ents.items() if v is not None}

    @property
    def name(self) -> str:
        parts = [f"sub-{self.subject}"]
        if self.session:
            parts.append(f"ses-{self.session}")
        parts.append(f"task-{self.task}")
        if self.run:
            parts.append(f"run-{self.run}")
        return "_".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PairingReport:
    pairs: list[RunPair] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    layout: object = None

    def summary(self) -> str:
        lines = [f"{len(self.pairs)} run(s) to process:"]
        for p in self.pairs:
            eph = Path(p.ephys_file).name if p.ephys_file else "no EEG/MEG"
            bold = f"{Path(p.bold_file).name} ({p.bold_source})" if p.bold_file else "no fMRI"
            lines.append(f"  {p.name}: {eph} + {bold}")
        if self.skipped:
            lines.append(f"{len(self.skipped)} item(s) skipped:")
            lines += [f"  {s}" for s in self.skipped]
        return "\n".join(lines)


def _ignore_patterns(settings: Settings) -> list:
    ignore = ["code", "stimuli", "sourcedata", "models", "derivatives",
              re.compile(r"^.*/\."),
              re.compile(r"sub-[a-zA-Z0-9]+(/ses-[a-zA-Z0-9]+)?/(anat|beh|dwi|fmap|perf|pet|ieeg|nirs|motion|micr)")]
    labels = settings.execution.participant_label
    if labels and settings.workflow.pairing != "same-stimulus":  # that rule may need any subject
        keep = "|".join(re.escape(label) for label in labels)
        ignore.append(re.compile(rf"sub-(?!({keep})(\b|_))[a-zA-Z0-9]+"))
    return ignore


def build_layout(settings: Settings):
    """A pybids layout of the raw dataset (eeg/meg/func only) with the fMRIPrep derivatives."""
    from bids import BIDSLayout, BIDSLayoutIndexer

    bids_dir = settings.bids_dir
    check_dataset_description(bids_dir)
    indexer = BIDSLayoutIndexer(validate=False, ignore=_ignore_patterns(settings))
    kwargs = {}
    if settings.execution.bids_database_dir:
        kwargs["database_path"] = settings.execution.bids_database_dir
    try:
        layout = BIDSLayout(str(bids_dir), indexer=indexer, validate=False, **kwargs)
    except Exception as exc:
        raise SambaValidationError(f"pybids cannot index the dataset: {exc}", path=bids_dir) from None
    fmriprep = settings.fmriprep_dir()
    if fmriprep is not None:
        desc = fmriprep / "dataset_description.json"
        if not desc.is_file():
            raise SambaMissingInputError(
                "fMRIPrep derivatives lack dataset_description.json (is this an fMRIPrep output folder?)",
                path=fmriprep,
            )
        try:
            indexer = BIDSLayoutIndexer(validate=False, ignore=_ignore_patterns(settings))
            layout.add_derivatives(str(fmriprep), parent_database_path=None, validate=False,
                                   indexer=indexer)
        except Exception as exc:
            raise SambaInputError(f"pybids cannot index the fMRIPrep derivatives: {exc}",
                                  path=fmriprep) from None
    return layout


def check_dataset_description(bids_dir: Path) -> dict:
    """``dataset_description.json`` must exist and be a JSON object with Name and BIDSVersion."""
    path = Path(bids_dir) / "dataset_description.json"
    if not path.is_file():
        raise SambaValidationError("dataset_description.json is missing (required by BIDS)", path=path)
    try:
        desc = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise SambaValidationError(f"dataset_description.json is not UTF-8 text ({exc.reason} at byte "
                                   f"{exc.start})", path=path) from None
    except OSError as exc:
        raise SambaValidationError(f"cannot read dataset_description.json: {exc.strerror}",
                                   path=path) from None
    except json.JSONDecodeError as exc:
        raise SambaValidationError(f"dataset_description.json is not valid JSON ({exc})", path=path) from None
    if not isinstance(desc, dict):
        raise SambaValidationError("dataset_description.json must hold a JSON object", path=path)
    missing = [key for key in ("Name", "BIDSVersion") if not desc.get(key)]
    if missing:
        raise SambaValidationError(
            f"dataset_description.json lacks the REQUIRED field(s) {', '.join(missing)}", path=path)
    return desc


def check_participants_table(bids_dir: Path, on_disk: list[str]) -> None:
    """Warn (as the BIDS validator does) when participants.tsv and the sub-* folders disagree."""
    path = Path(bids_dir) / "participants.tsv"
    if not path.is_file():
        return
    try:
        import pandas as pd

        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, encoding="utf-8")
        listed = sorted(str(v)[4:] if str(v).startswith("sub-") else str(v)
                        for v in table["participant_id"])
    except UnicodeDecodeError as exc:
        LOGGER.warning("%s: not UTF-8 text (%s at byte %d); participants not cross-checked", path,
                       exc.reason, exc.start)
        return
    except Exception as exc:  # pandas' parser errors have many types; the table is optional
        LOGGER.warning("%s: cannot read it (%s); participants not cross-checked", path, exc)
        return
    only_table = sorted(set(listed) - set(on_disk))
    only_disk = sorted(set(on_disk) - set(listed))
    if only_table:
        LOGGER.warning("%s lists participant(s) without a sub-* folder: %s", path,
                       ", ".join(f"sub-{s}" for s in only_table))
    if only_disk:
        LOGGER.warning("%s does not list the participant folder(s) %s", path,
                       ", ".join(f"sub-{s}" for s in only_disk))


def _filters(settings: Settings, query: str) -> dict:
    """A --bids-filter-file query: ``null`` means the entity is absent, ``"*"`` any value."""
    from bids.layout import Query

    flt = dict(settings.execution.bids_filters.get(query, {}))
    for key, value in list(flt.items()):
        if value is None:
            flt[key] = Query.NONE
        elif value == "*":
            flt[key] = Query.ANY
    return flt


def _check_labels(labels: list[str], available: list[str], root: Path) -> None:
    missing = sorted(set(labels) - set(available))
    if missing:
        raise SambaNoMatchError(
            f"participant label(s) {', '.join(missing)} not found in {root} "
            f"(found: {', '.join(available[:10])}{' ...' if len(available) > 10 else ''}); "
            "in a container, check the bind mount of the input folder"
        )


def check_participant_labels(settings: Settings) -> list[str]:
    """Subjects on disk; the requested labels must be among them (cheap, before indexing)."""
    on_disk = sorted(p.name[4:] for p in settings.bids_dir.glob("sub-*") if p.is_dir())
    if not on_disk:
        raise SambaValidationError("no sub-* folders found: not a BIDS dataset?", path=settings.bids_dir)
    _check_labels(settings.execution.participant_label, on_disk, settings.bids_dir)
    return on_disk


def collect_pairs(settings: Settings, layout=None, unpaired: str | None = None) -> PairingReport:
    """Find the EEG/MEG and fMRI runs to process, honouring every filter in ``settings``.

    ``unpaired="ephys"`` also keeps EEG/MEG recordings without an fMRI run (and ``"fmri"`` fMRI
    runs without EEG/MEG) as runs with one side missing: a trained model predicts the other side.
    """
    ex = settings.execution
    check_participants_table(settings.bids_dir, check_participant_labels(settings))
    layout = layout or build_layout(settings)
    subjects = sorted(layout.get_subjects(scope="raw"))
    if ex.participant_label:
        _check_labels(ex.participant_label, subjects, settings.bids_dir)
        subjects = [s for s in subjects if s in ex.participant_label]

    report = PairingReport(layout=layout)
    base = {}
    if ex.session_label:
        base["session"] = ex.session_label
    if ex.task_id:
        base["task"] = ex.task_id

    fmriprep = settings.fmriprep_dir()
    any_ephys = False
    pairing = settings.workflow.pairing
    for subject in subjects:
        # non-simultaneous pairs are named after the fMRI run: --session-label selects its session
        ephys_base = {k: v for k, v in base.items() if pairing == "simultaneous" or k != "session"}
        query = dict(datatype=["eeg", "meg"], suffix=["eeg", "meg"], extension=EPHYS_EXTENSIONS, **ephys_base)
        query.update(_filters(settings, "ephys"))  # the user's filters win
        ephys_query = dict(query)
        ephys_files = layout.get(scope="raw", subject=subject, **query)
        any_ephys |= bool(ephys_files)
        bolds = []
        if fmriprep is not None:
            query = dict(datatype="func", suffix="bold", desc="preproc", space=settings.workflow.fmri_space,
                         extension=[".nii.gz", ".nii"], **base)
            query.update(_filters(settings, "bold"))
            bolds = layout.get(scope="derivatives", subject=subject, **query)
        source = "fmriprep"
        if not bolds and settings.workflow.use_raw_bold:
            query = dict(datatype="func", suffix="bold", extension=[".nii.gz", ".nii"], **base)
            query.update({k: v for k, v in _filters(settings, "bold").items() if k != "space"})
            bolds = layout.get(scope="raw", subject=subject, **query)
            source = "raw"
        if pairing != "simultaneous" and bolds:
            from samba_pipeline.bids.stimulus_pairs import pair_by_stimulus

            others = [] if pairing != "same-stimulus" else [
                f for f in layout.get(scope="raw", **ephys_query) if f.get_entities()["subject"] != subject]
            any_ephys |= bool(others)
            everyone = sorted(layout.get_subjects(scope="raw"))
            report.pairs.extend(pair_by_stimulus(subject, everyone, ephys_files, others, bolds, source,
                                                 layout, report, pairing, _make_pair, settings.bids_dir))
            continue
        if not ephys_files and unpaired == "fmri" and bolds:
            report.pairs.extend(_make_pair(subject, None, bold, source, layout) for bold in bolds)
            continue
        if not ephys_files:
            report.skipped.append(f"sub-{subject}: no EEG/MEG recording matches the filters")
            continue
        if not bolds and unpaired == "ephys":
            report.pairs.extend(_make_pair(subject, eph, None, source, layout) for eph in ephys_files)
            continue
        if not bolds:
            where = f"in {fmriprep}" if fmriprep else "(no fMRIPrep derivatives given)"
            spaces = sorted(layout.get(scope="derivatives", subject=subject, datatype="func", suffix="bold",
                                       desc="preproc", return_type="id", target="space")) if fmriprep else []
            found = f" (it has space(s) {', '.join(spaces)}: pick one with --fmri-space)" if spaces else ""
            report.skipped.append(
                f"sub-{subject}: no preprocessed BOLD in space {settings.workflow.fmri_space} {where}{found}"
            )
            continue
        report.pairs.extend(_pair_subject(subject, ephys_files, bolds, source, layout, report, unpaired))

    if not report.pairs:
        if not any_ephys:
            anywhere = layout.get(scope="raw", datatype=["eeg", "meg"], suffix=["eeg", "meg"],
                                  extension=EPHYS_EXTENSIONS)
            if anywhere and (base or settings.execution.bids_filters):
                raise SambaNoMatchError(
                    "the session/task/filter selection matched no EEG/MEG recording (the dataset "
                    f"has {len(anywhere)}: check --session-label, --task-id and --bids-filter-file)")
            raise SambaMissingInputError(
                "no EEG/MEG recordings found for the selected subjects", path=settings.bids_dir)
        if fmriprep is None and not settings.workflow.use_raw_bold:
            raise SambaMissingInputError(
                "no fMRIPrep derivatives found (looked for BIDS_DIR/derivatives/fmriprep); pass "
                "--fmriprep-dir PATH, or --use-raw-bold if the raw BOLD is already in "
                f"{settings.workflow.fmri_space} space",
                path=settings.bids_dir,
            )
        hint = (" (EEG/MEG and fMRI from different sessions or subjects? pair them by the stimulus "
                "with --pairing same-subject or same-stimulus)" if pairing == "simultaneous" else "")
        raise SambaNoMatchError("the filters matched no EEG/MEG-fMRI pair: " + "; ".join(report.skipped)
                                + hint)
    return report


def _key(entities: dict) -> tuple:
    return tuple(str(entities.get(k)) if entities.get(k) is not None else None for k in PAIR_ENTITIES)


def _pair_subject(subject, ephys_files, bolds, source, layout, report, unpaired=None) -> list[RunPair]:
    bold_by_key = {}
    for bold in bolds:
        key = _key(bold.get_entities())
        if key in bold_by_key:
            raise SambaInputError(
                f"several BOLD series match {dict(zip(PAIR_ENTITIES, key))} (e.g. other resolutions or "
                f"duplicate runs: {Path(bold_by_key[key].path).name}, {Path(bold.path).name}); select "
                "one with --bids-filter-file, e.g. {\"bold\": {\"res\": \"2\"}}",
                path=bold.path,
            )
        bold_by_key[key] = bold
    ephys_by_key = {}
    for eph in ephys_files:
        key = _key(eph.get_entities())
        if key in ephys_by_key:
            raise SambaInputError(
                f"several EEG/MEG recordings match {dict(zip(PAIR_ENTITIES, key))} (duplicate runs: "
                f"{Path(ephys_by_key[key].path).name}, {Path(eph.path).name}); keep one, give them "
                "different run labels, or select one with --bids-filter-file",
                path=eph.path,
            )
        ephys_by_key[key] = eph
    pairs = []
    used = set()
    for eph in ephys_files:
        ents = eph.get_entities()
        key = _key(ents)
        bold = bold_by_key.get(key)
        if bold is None:
            # One run per (session, task) on each side: pair them even if run labels differ.
            same = [k for k in bold_by_key if k[:2] == key[:2]]
            same_e = [e for e in ephys_files if _key(e.get_entities())[:2] == key[:2]]
            if len(same) == 1 and len(same_e) == 1:
                bold = bold_by_key[same[0]]
        if bold is None and unpaired == "ephys":
            pairs.append(_make_pair(subject, eph, None, source, layout))
            continue
        if bold is None:
            report.skipped.append(f"{Path(eph.path).name}: no fMRI run with the same session/task/run")
            continue
        used.add(bold.path)
        pairs.append(_make_pair(subject, eph, bold, source, layout))
    for bold in bolds:
        if bold.path not in used and unpaired == "fmri":
            pairs.append(_make_pair(subject, None, bold, source, layout))
        elif bold.path not in used:
            report.skipped.append(
                f"{Path(bold.path).name}: no EEG/MEG recording with the same session/task/run")
    return pairs


def _make_pair(subject, eph, bold, source, layout) -> RunPair:
    """A run of ``subject``: EEG/MEG file ``eph`` and BOLD ``bold`` (either may be None, not both)."""
    ents = (eph or bold).get_entities()
    if eph is None and "run" in ents:  # the run label of an fMRIPrep output is an int
        ents = dict(ents, run=str(ents["run"]))
    if bold is None:
        return RunPair(subject=subject, session=ents.get("session"), task=ents.get("task"),
                       run=str(ents["run"]) if ents.get("run") is not None else None,
                       acquisition=ents.get("acquisition"), ephys_file=eph.path,
                       ephys_datatype=ents.get("datatype"), bold_file=None)
    bents = bold.get_entities()
    mask = confounds = None
    if source == "fmriprep":
        common = {k: bents[k] for k in ("subject", "session", "task", "run", "acquisition", "echo")
                  if k in bents}
        masks = layout.get(scope="derivatives", suffix="mask", desc="brain", space=bents.get("space"),
                           extension=[".nii.gz", ".nii"], **common,
                           **({"res": bents["res"]} if "res" in bents else {}))
        mask = masks[0].path if masks else None
        conf = layout.get(scope="derivatives", desc="confounds", suffix="timeseries", extension=".tsv",
                          **common)
        confounds = conf[0].path if conf else None
    bold_json = re.sub(r"\.nii(\.gz)?$", ".json", bold.path)
    return RunPair(
        subject=subject,
        session=ents.get("session"),
        task=ents.get("task"),
        run=str(ents["run"]) if ents.get("run") is not None else None,
        acquisition=ents.get("acquisition"),
        ephys_file=eph.path if eph is not None else None,
        ephys_datatype=ents.get("datatype") if eph is not None else None,
        bold_file=bold.path,
        bold_json=bold_json if Path(bold_json).is_file() else None,
        mask_file=mask,
        confounds_file=confounds,
        bold_source=source,
    )
