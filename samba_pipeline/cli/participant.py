"""The participant level: validate, pair runs, check inputs, build and run the workflow."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import nibabel as nb
import tomli_w

from samba_pipeline.atlas import Atlas, resolve_atlas
from samba_pipeline.bids.derivatives import (
    copy_file,
    dataset_description,
    derivative_path,
    initialise_output_dir,
    write_json,
    write_text,
    write_tsv,
)
from samba_pipeline.bids.layout import RunPair, check_participant_labels, collect_pairs
from samba_pipeline.bids.validate import run_validator
from samba_pipeline.config import Settings
from samba_pipeline.errors import (
    SambaInputError,
    SambaMissingInputError,
    SambaValidationError,
)

LOGGER = logging.getLogger("samba_pipeline.cli")
IMPORTANT = 25


def validate_input(settings: Settings) -> None:
    if settings.execution.skip_bids_validation:
        LOGGER.log(IMPORTANT, "BIDS validation skipped (--skip-bids-validation)")
        return
    LOGGER.log(IMPORTANT, "Validating %s with the BIDS validator", settings.bids_dir)
    result = run_validator(settings.bids_dir)
    if not result.ran:
        LOGGER.warning("BIDS validation not done: %s", result.reason)
        return
    if not result.ok:
        raise SambaValidationError(
            f"the BIDS validator found {len(result.errors)} error(s): {result.summary()} "
            "(fix them, or pass --skip-bids-validation)", path=settings.bids_dir)
    LOGGER.info("BIDS validation passed (%d warnings)", len(result.warnings))


def check_volume_triggers(pair: RunPair, names: list[str]) -> int:
    """The EEG/MEG events must hold scanner volume triggers (checked before anything runs)."""
    from samba_pipeline.align import find_volume_triggers
    from samba_pipeline.ephys.read import events_path, read_bids_events

    table = read_bids_events(pair.ephys_file)
    events = events_path(pair.ephys_file)
    if table is None:
        raise SambaMissingInputError(
            "no events.tsv beside the recording: the scanner volume triggers are needed to align "
            "EEG/MEG and fMRI", path=events)
    triggers = find_volume_triggers(table["onset"].to_numpy(float), table["description"].to_numpy(),
                                    names=tuple(names), path=events)
    if triggers.size == 0:
        raise SambaInputError(
            f"no scanner volume triggers ({', '.join(names)}) among the events; they are needed to "
            "align EEG/MEG and fMRI (name yours with --volume-trigger)", path=events)
    return int(triggers.size)


def check_stimulus_events(pair: RunPair, names: list[str], tolerance_s: float = 0.1) -> int:
    """Non-simultaneous pairs: both events.tsv must list the same stimulus segments, with one
    time offset between the sessions (checked before anything runs); returns their number."""
    from samba_pipeline.align import match_stimulus_segments, read_stimulus_events

    ephys = read_stimulus_events(pair.ephys_events, names=tuple(names))
    fmri = read_stimulus_events(pair.bold_events, names=tuple(names))
    match = match_stimulus_segments(ephys, fmri, tolerance_s=tolerance_s,
                                    ephys_events_file=pair.ephys_events,
                                    fmri_events_file=pair.bold_events)
    return len(match["segments"])


def inspect_pair(pair: RunPair, layout=None, trigger_names: list[str] | None = None,
                 stimulus_names: list[str] | None = None, stimulus_tolerance: float = 0.1) -> dict:
    """Facts the workflow needs from each pair (TR, volumes, sizes), with early input checks.

    A run with one side missing (``--model-file`` on EEG/MEG-only or fMRI-only data) gets the
    facts of the side it has; the volume triggers are then optional.
    """
    if pair.bold_file is None:
        return {"tr": None, "n_volumes": None, "bold_mem_gb": 0.0, "ephys_mem_gb": _ephys_mem_gb(pair)}
    if pair.ephys_file is None:
        trigger_names = None
    bold = Path(pair.bold_file)
    try:
        img = nb.load(str(bold))
        shape = img.shape
    except Exception as exc:
        raise SambaInputError(f"cannot read the BOLD series: {exc}", path=bold) from None
    if len(shape) != 4 or shape[-1] < 2:
        raise SambaInputError(f"BOLD series must be 4-D with several volumes, shape is {shape}", path=bold)
    tr = _repetition_time(pair, layout)
    n_volumes = int(shape[-1])
    if pair.pairing != "simultaneous":
        check_stimulus_events(pair, stimulus_names or ["movie_segment"], stimulus_tolerance)
    elif trigger_names is not None:
        check_volume_triggers(pair, trigger_names)
    if pair.confounds_file:
        n_rows = _count_rows(Path(pair.confounds_file))
        if n_rows != n_volumes:
            raise SambaInputError(
                f"confounds file has {n_rows} rows but the BOLD series {bold.name} has {n_volumes} volumes",
                path=pair.confounds_file)
    n_vox = int(shape[0] * shape[1] * shape[2])
    return {
        "tr": tr,
        "n_volumes": n_volumes,
        # The BOLD is streamed; only labelled voxels are kept (float32, plus a float64 product):
        # 0.75 x the float32 series bounds it (whole participant level: 1.96 GB peak at 2 mm x 300).
        "bold_mem_gb": round(0.3 + n_vox * n_volumes * 4 * 0.75 / 1e9, 2),
        "ephys_mem_gb": _ephys_mem_gb(pair),
    }


def _space_of(path) -> str | None:
    """The template a file's name declares (``tpl-X`` or ``space-X``), if any."""
    match = re.search(r"(?:^|_)(?:tpl|space)-([a-zA-Z0-9]+)", Path(path).name)
    return match.group(1) if match else None


def check_atlas_spaces(atlases: dict[str, Atlas], pairs: list[RunPair]) -> None:
    """An atlas file whose name declares a template must be in the space of the BOLD series:
    samba-bids never resamples across templates (only onto the BOLD grid of the same space)."""
    for pair in pairs:
        bold_space = _space_of(pair.bold_file) if pair.bold_file else None
        if bold_space is None:
            continue
        for modality, atlas in atlases.items():
            atlas_space = _space_of(atlas.image)
            if atlas_space is not None and atlas_space != bold_space:
                raise SambaInputError(
                    f"the {'EEG/MEG' if modality == 'ephys' else 'fMRI'} atlas is in template space "
                    f"{atlas_space} but the BOLD series {Path(pair.bold_file).name} is in {bold_space}; "
                    f"give an atlas in {bold_space}", path=atlas.image)


def check_ephys_files(pair: RunPair) -> None:
    """A BrainVision header names its data and marker files: they must be there (EEGLAB .set: .fdt)."""
    if pair.ephys_file is None:
        return
    header = Path(pair.ephys_file)
    if header.suffix == ".vhdr":
        text = header.read_text(encoding="latin-1")
        for key in ("DataFile", "MarkerFile"):
            match = re.search(rf"^{key}=(.+?)\s*$", text, flags=re.MULTILINE)
            if match and not (header.parent / match.group(1)).is_file():
                raise SambaMissingInputError(f"the BrainVision header names the {key} {match.group(1)}, "
                                             "which is missing", path=header)


def _ephys_mem_gb(pair: RunPair) -> float:
    if pair.ephys_file is None:
        return 0.0
    check_ephys_files(pair)
    from samba_pipeline.ephys.preprocess import estimate_ephys_mem_gb

    ephys_size = Path(pair.ephys_file).stat().st_size
    for sibling in Path(pair.ephys_file).parent.glob(Path(pair.ephys_file).stem + ".*"):
        if sibling.suffix in (".eeg", ".dat", ".fdt"):
            ephys_size += sibling.stat().st_size
    # BrainVision/EDF store 2-4 bytes per sample; MNE works in float64 (8 bytes).
    return round(estimate_ephys_mem_gb(1, int(ephys_size / 2)), 2)


def _repetition_time(pair: RunPair, layout=None) -> float:
    """RepetitionTime of the BOLD series (pybids metadata, with inheritance, else its sidecar)."""
    from samba_pipeline.fmri.parcellate import check_repetition_time, read_repetition_time

    bold = layout.get_file(pair.bold_file) if layout is not None else None
    meta = bold.get_metadata() if bold is not None else {}
    if "RepetitionTime" in meta:
        return check_repetition_time(meta["RepetitionTime"], pair.bold_json or pair.bold_file)
    return read_repetition_time(pair.bold_json or pair.bold_file)


def _count_rows(path: Path) -> int:
    try:
        with open(path, "rb") as fobj:
            lines = [line for line in fobj.read().splitlines() if line.strip()]
    except OSError as exc:
        raise SambaMissingInputError(f"cannot read: {exc.strerror}", path=path) from None
    return max(len(lines) - 1, 0)


def write_atlases(settings: Settings, atlases: dict[str, Atlas]) -> None:
    from samba_pipeline.graphs import region_map
    from samba_pipeline.workflows.participant import atlas_output_entities

    out = settings.output_dir
    root = out / "sourcedata" / "atlases"
    if not (root / "dataset_description.json").is_file():
        write_json(root / "dataset_description.json", {
            "Name": "Atlases used by samba-bids", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "samba-bids"}]})
    for modality, atlas in atlases.items():
        ents = atlas_output_entities(atlas)
        image = derivative_path(out, **ents, extension=".nii.gz")
        if not image.is_file() or image.stat().st_size != atlas.image.stat().st_size:
            copy_file(atlas.image, image)
        table = derivative_path(out, **ents, extension=".tsv")
        copy_file(atlas.table, table)
        write_json(root / f"atlas-{atlas.entities['atlas']}_description.json", {
            "AtlasName": atlas.entities["atlas"], "License": "see the atlas authors",
            "Description": f"{atlas.spec.label()} used for the {modality} parcels"})
    fine, coarse = atlases["fmri"], atlases["ephys"]
    rmap = region_map(coarse.labels, fine.labels, coarse_img=str(coarse.image), fine_img=str(fine.image))
    fents = {k: v for k, v in atlas_output_entities(fine).items() if k in ("atlas", "segmentation", "scale")}
    table = rmap.astype(int)
    table.insert(0, "Node", list(rmap.index))
    write_tsv(derivative_path(out, **fents, stat="regionmap", suffix="relmat", extension=".tsv"), table)
    write_json(derivative_path(out, **fents, stat="regionmap", suffix="relmat", extension=".json"), {
        "RelationshipMeasure": "region map: 1 where the EEG/MEG (coarse) parcel in the column feeds "
                               "the fMRI (fine) parcel in the row (same hemisphere and network)",
        "Weighted": False, "Directed": True, "StorageFormat": "Full",
        "RowAtlas": fine.spec.label(), "ColumnAtlas": coarse.spec.label()})


def run_participant(settings: Settings) -> None:
    from samba_pipeline.workflows.participant import init_samba_participant_wf

    check_participant_labels(settings)
    validate_input(settings)
    card = None
    if settings.model.model_file:  # read (and check) the model before any node runs
        from samba_pipeline.training.pipeline import load_trained_model

        _, card = load_trained_model(settings.model.model_file)
        card["_file"] = settings.model.model_file
        LOGGER.log(IMPORTANT, "Applying the %s model (%s) from %s", card["Plugin"], card["Dims"]["direction"],
                   settings.model.model_file)
    unpaired = None if card is None else ("ephys" if card["Dims"]["direction"] == "ephys2fmri" else "fmri")
    report = collect_pairs(settings, unpaired=unpaired)
    layout = report.layout
    LOGGER.log(IMPORTANT, "%s", report.summary())
    atlases = {"ephys": resolve_atlas(settings.workflow.ephys_atlas),
               "fmri": resolve_atlas(settings.workflow.fmri_atlas)}
    LOGGER.log(IMPORTANT, "Atlases: EEG/MEG %s; fMRI %s", atlases["ephys"].spec.label(),
               atlases["fmri"].spec.label())
    check_atlas_spaces(atlases, report.pairs)
    facts = {pair.name: inspect_pair(pair, layout, settings.workflow.volume_trigger,
                                     settings.workflow.stimulus_event,
                                     settings.workflow.stimulus_tolerance)
             for pair in report.pairs}

    initialise_output_dir(settings.output_dir, dataset_description(
        config_hash=settings.configuration_hash(), bids_dir=settings.bids_dir,
        derivatives=settings.execution.derivatives,
        templateflow_home=settings.execution.templateflow_home))
    write_atlases(settings, atlases)

    wf = init_samba_participant_wf(settings, report.pairs, atlases, facts, card=card)
    _configure(wf, settings)
    subjects = sorted({p.subject for p in report.pairs})
    _save_run_config(settings, subjects)
    if settings.execution.write_graph:
        _write_graph(wf, settings, subjects)
    LOGGER.log(IMPORTANT, "Running the participant workflow (%s) in %s", wf.name, settings.work_dir)
    plugin = settings.nipype.get_plugin()
    try:
        wf.run(**plugin)
    except RuntimeError as exc:
        from samba_pipeline.cli.run import raise_node_error

        raise_node_error([settings.log_dir(s) for s in subjects] + [settings.log_dir()], exc)


def _configure(wf, settings: Settings) -> None:
    ex = settings.execution
    wf.config["execution"].update({
        "crashfile_format": "txt",
        "stop_on_first_crash": ex.stop_on_first_crash,
        "remove_unnecessary_outputs": False,
        "check_version": False,
        "crashdump_dir": str(settings.log_dir()),
    })
    for node_name in wf.list_node_names():
        sub = node_name.split(".")[0]
        m = re.match(r"sub_(.+)_wf$", sub)
        if m:
            node = wf.get_node(node_name)
            node.config = node.config or {}
            node.config.setdefault("execution", {})
            node.config["execution"]["crashdump_dir"] = str(settings.log_dir(m.group(1)))
            node.config["execution"]["crashfile_format"] = "txt"


def _save_run_config(settings: Settings, subjects: list[str]) -> None:
    from samba_pipeline.cli.parser import settings_to_cli_toml

    text = tomli_w.dumps(settings_to_cli_toml(settings))
    for subject in subjects:
        write_text(settings.log_dir(subject) / "samba-bids.toml", text)
    settings.to_toml(settings.work_dir / settings.execution.run_uuid / "config.toml")


def _write_graph(wf, settings: Settings, subjects: list[str]) -> None:
    """Write the workflow graph (Graphviz dot source; rendered when Graphviz is installed)."""
    graph = wf._create_flat_graph()
    for subject in subjects:
        lines = ["digraph samba_bids {", "  rankdir=LR;"]
        prefix = f"sub_{subject}_wf."
        for u, v in graph.edges():
            if u.fullname.startswith(wf.name + "." + prefix) or u.fullname.startswith(prefix):
                lines.append(f'  "{_short(u.fullname)}" -> "{_short(v.fullname)}";')
        lines.append("}")
        path = derivative_path(settings.output_dir, subject=subject, desc="workflow", suffix="graph",
                               extension=".dot")
        write_text(path, "\n".join(lines) + "\n")


def _short(name: str) -> str:
    return re.sub(r"^samba_bids_\d+_\d+_wf\.sub_[^.]+_wf\.", "", name)


__all__ = ["run_participant", "inspect_pair", "validate_input", "write_atlases"]
