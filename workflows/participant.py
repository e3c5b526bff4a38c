"""Participant-level Nipype workflows (wiring only; the numerics live in samba_pipeline).

``init_samba_participant_wf``
    one ``sub_<label>_wf`` per subject, each with one ``<run>_wf`` per EEG/MEG-fMRI pair:

    ephys_file -> preprocess_ephys --------------------+
                                                       +-> align -> crop_graph -> sinks
    bold + confounds + atlas -> parcellate_bold -------+
"""

from __future__ import annotations

import re
from pathlib import Path

from nipype.pipeline import engine as pe

from samba_pipeline.__about__ import __version__
from samba_pipeline.bids.layout import RunPair
from samba_pipeline.config import Settings
from samba_pipeline.interfaces.participant import (
    AlignRuns,
    CropAndGraph,
    DerivativesSink,
    MakeSidecar,
    OptionalDerivativesSink,
    ParcellateBold,
    PreprocessEphys,
)


def workflow_name() -> str:
    """Top-level name carries the minor version, so a new minor version never reuses a cache."""
    major, minor = __version__.split(".")[:2]
    return f"samba_bids_{major}_{minor}_wf"


def _node_name(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", text)


def init_samba_participant_wf(settings: Settings, pairs: list[RunPair], atlases: dict,
                              inputs: dict[str, dict], card: dict | None = None) -> pe.Workflow:
    """The whole participant level: one sub-workflow per subject.

    ``atlases`` maps ``'ephys'``/``'fmri'`` to resolved :class:`samba_pipeline.atlas.Atlas`;
    ``inputs`` maps each pair's name to facts read in the main process (TR, volumes, sizes).
    """
    wf = pe.Workflow(name=workflow_name(), base_dir=str(settings.work_dir))
    subjects = sorted({p.subject for p in pairs})
    for subject in subjects:
        sub_pairs = [p for p in pairs if p.subject == subject]
        wf.add_nodes([init_single_subject_wf(settings, subject, sub_pairs, atlases, inputs, card)])
    return wf


def init_single_subject_wf(settings, subject, pairs, atlases, inputs, card=None) -> pe.Workflow:
    """One ``<run>_wf`` per run; with a trained model (``card``, from ``--model-file``) each run
    also gets its prediction, and runs with only EEG/MEG (or only fMRI) get a prediction-only
    workflow (see :mod:`samba_pipeline.workflows.translate`)."""
    from samba_pipeline.workflows import translate

    wf = pe.Workflow(name=f"sub_{_node_name(subject)}_wf")
    runs = []
    for pair in pairs:
        if pair.ephys_file and pair.bold_file:
            run_wf = init_run_wf(settings, pair, atlases, inputs[pair.name])
            wf.add_nodes([run_wf])
            if card is not None:
                translate.add_paired_prediction(wf, run_wf, settings, pair, atlases, card)
        else:
            run_wf = translate.init_single_modality_wf(settings, pair, atlases, inputs[pair.name], card)
            wf.add_nodes([run_wf])
        runs.append((pair, run_wf))
    from samba_pipeline.workflows.reports import add_subject_report

    add_subject_report(wf, settings, subject, runs, atlases, inputs)  # OUT/sub-<label>.html, last
    return wf


def init_ephys_node(settings: Settings, pair: RunPair, atlases: dict, facts: dict) -> tuple[pe.Node, bool]:
    """The EEG/MEG preprocessing node of a run, and whether it writes source-space parcels."""
    wset = settings.workflow
    ephys = pe.Node(PreprocessEphys(ephys_file=pair.ephys_file, settings=dict(wset.ephys),
                                    volume_trigger=list(wset.volume_trigger)),
                    name="preprocess_ephys", mem_gb=facts["ephys_mem_gb"])
    # Source space: parcel time courses of the EEG/MEG atlas (named by its template and atlas).
    ephys_atlas = atlases.get("ephys")
    source_space = dict(wset.ephys).get("space", "sensor") == "source" and ephys_atlas is not None
    if source_space:
        ephys.inputs.atlas_file = str(ephys_atlas.image)
        ephys.inputs.atlas_table = str(ephys_atlas.table)
    return ephys, source_space


def init_parcellate_node(settings: Settings, pair: RunPair, atlases: dict, facts: dict) -> pe.Node:
    """The BOLD confound-regression and parcellation node of a run."""
    wset = settings.workflow
    fmri_atlas = atlases["fmri"]
    parcellate = pe.Node(
        ParcellateBold(bold_file=pair.bold_file, atlas_file=str(fmri_atlas.image),
                       atlas_table=str(fmri_atlas.table), repetition_time=facts["tr"],
                       strategy=wset.nuisance_regressors if pair.confounds_file else "none",
                       high_pass=wset.high_pass, low_pass=wset.low_pass,
                       fd_threshold=wset.fd_threshold, min_coverage=wset.min_coverage),
        name="parcellate_bold", mem_gb=facts["bold_mem_gb"])
    if pair.mask_file:
        parcellate.inputs.mask_file = pair.mask_file
    if pair.confounds_file:
        parcellate.inputs.confounds_file = pair.confounds_file
    return parcellate


def init_run_wf(settings: Settings, pair: RunPair, atlases: dict, facts: dict) -> pe.Workflow:
    """Preprocess, parcellate, align and graph one EEG/MEG-fMRI pair, and write its derivatives."""
    wset = settings.workflow
    out = str(settings.output_dir)
    wf = pe.Workflow(name=_node_name(pair.name.replace(f"sub-{pair.subject}_", "")) + "_wf")
    ents = pair.entities
    # The EEG/MEG atlas is written with the region map; the series stay in sensor space for now.
    fmri_atlas = atlases["fmri"]
    datatype = pair.ephys_datatype or "eeg"

    ephys, source_space = init_ephys_node(settings, pair, atlases, facts)
    ephys_atlas = atlases.get("ephys")
    parcellate = init_parcellate_node(settings, pair, atlases, facts)

    align = pe.Node(AlignRuns(n_volumes=facts["n_volumes"], repetition_time=facts["tr"],
                              volume_trigger=list(wset.volume_trigger), ephys_file=pair.ephys_file,
                              window_lengths=[float(x) for x in wset.window_lengths]),
                    name="align")
    if pair.pairing != "simultaneous":  # recordings of other sessions: the stimulus aligns them
        align.inputs.trait_set(pairing=pair.pairing, ephys_events=pair.ephys_events,
                               bold_events=pair.bold_events,
                               stimulus_event=list(wset.stimulus_event),
                               stimulus_tolerance=float(wset.stimulus_tolerance))
    crop = pe.Node(CropAndGraph(), name="crop_graph", mem_gb=facts["ephys_mem_gb"])

    sources_eeg = [_uri(settings, pair.ephys_file)]
    sources_bold = [_uri(settings, pair.bold_file)] + (
        [_uri(settings, pair.confounds_file)] if pair.confounds_file else [])
    fmri_ents = dict(ents, datatype="func", space=wset.fmri_space, **_atlas_ents(fmri_atlas))
    bold_note = ("fMRIPrep desc-preproc_bold" if pair.bold_source == "fmriprep" else
                 "raw BOLD used as given (--use-raw-bold): assumed already in "
                 f"{wset.fmri_space} space; no fMRIPrep preprocessing")
    fmri_meta = MakeSidecar(base={
        "SamplingFrequency": 1.0 / facts["tr"], "RepetitionTime": facts["tr"], "StartTime": 0.0,
        "Sources": sources_bold, "Atlas": fmri_atlas.spec.label(), "BoldSource": bold_note,
        "HighPass": wset.high_pass, "LowPass": wset.low_pass, "Units": "z-score (per parcel)",
        "NodeFiles": f"bids::{_atlas_rel(fmri_atlas)}",
    }, extra_key="Confounds")
    fmri_meta_node = pe.Node(fmri_meta, name="fmri_meta", run_without_submitting=True)
    ephys_base = {
        "StartTime": 0.0, "Sources": sources_eeg, "Space": "sensor", "Units": "V",
        "Description": "preprocessed EEG/MEG sensor time series, cropped to the fMRI overlap",
    }
    if source_space:
        ephys_base.update(
            Space="source", Atlas=ephys_atlas.spec.label(),
            NodeFiles=f"bids::{_atlas_rel(ephys_atlas)}",
            Units="A*m" if dict(wset.ephys).get("inverse_method", "eLORETA") in ("MNE", "eLORETA")
            else "unitless (noise-normalised)",
            Description="EEG/MEG source-space parcel time series (template head), cropped to "
                        "the fMRI overlap")
    ephys_meta_node = pe.Node(MakeSidecar(base=ephys_base, extra_key="Preprocessing"),
                              name="ephys_meta", run_without_submitting=True)

    relmat_base = {"RelationshipMeasure": "cosine similarity of mean-centred time series",
                   "Weighted": True, "Directed": False, "ValidDiagonal": True, "StorageFormat": "Full"}

    def sink(name, entities, **inputs):
        node = pe.Node(DerivativesSink(output_dir=out, entities=entities, **inputs),
                       name=f"ds_{name}", run_without_submitting=True)
        return node

    ds_fmri_ts = sink("fmri_timeseries", dict(fmri_ents, stat="mean", suffix="timeseries", extension=".tsv"))
    ds_fmri_cov = sink("fmri_coverage", dict(fmri_ents, stat="coverage", suffix="bold", extension=".tsv"))
    ds_fmri_graph = sink("fmri_graph", dict(fmri_ents, stat="cosine", suffix="relmat", extension=".tsv"),
                         metadata=dict(relmat_base, Sources=sources_bold,
                                       NodeFiles=f"bids::{_atlas_rel(fmri_atlas)}"))
    ds_confounds = sink("confounds_qc", dict(ents, datatype="func", desc="confounds", suffix="qc",
                                            extension=".json"))
    eph_ents = dict(ents, datatype=datatype, desc="preproc")
    if source_space:
        eph_ents.update(space=ephys_atlas.template, **_atlas_ents(ephys_atlas))
    ds_ephys_ts = sink("ephys_timeseries", dict(eph_ents, suffix="timeseries", extension=".tsv.gz"))
    ds_ephys_graph = sink("ephys_graph", dict(eph_ents, stat="cosine", suffix="relmat", extension=".tsv"),
                          metadata=dict(relmat_base, Sources=sources_eeg))
    ds_channels = sink("ephys_channels", dict(ents, datatype=datatype, desc="preproc",
                                              suffix="channels", extension=".tsv"))
    ds_alignment = sink("alignment", dict(ents, suffix="alignment", extension=".json"))
    ds_windows = sink("windows", dict(ents, suffix="windows", extension=".tsv"))
    if pair.pairing == "simultaneous" and datatype == "eeg":  # figure only if MR correction ran
        ds_mr_qc = pe.Node(OptionalDerivativesSink(
            output_dir=out, entities=dict(ents, desc="mrartifacts", suffix=datatype, extension=".svg")),
            name="ds_mr_qc", run_without_submitting=True)
        wf.connect(ephys, "mr_qc_figure", ds_mr_qc, "in_file")

    wf.connect([
        (ephys, align, [("events_tsv", "events_tsv"), ("sfreq", "ephys_sfreq"),
                        ("duration", "ephys_duration")]),
        (ephys, crop, [("raw_file", "raw_file")]),
        (parcellate, crop, [("timeseries_tsv", "fmri_timeseries")]),
        (align, crop, [("alignment_json", "alignment_json")]),
        (parcellate, fmri_meta_node, [("confounds_qc", "extra_json")]),
        (crop, ds_fmri_ts, [("fmri_timeseries", "in_file")]),
        (fmri_meta_node, ds_fmri_ts, [("metadata", "metadata")]),
        (parcellate, ds_fmri_cov, [("coverage_tsv", "in_file")]),
        (crop, ds_fmri_graph, [("fmri_graph", "in_file")]),
        (parcellate, ds_confounds, [("confounds_qc", "in_file")]),
        (ephys, ephys_meta_node, [("report_json", "extra_json")]),
        (crop, ephys_meta_node, [("ephys_sfreq", "sampling_frequency")]),
        (crop, ds_ephys_ts, [("ephys_timeseries", "in_file")]),
        (ephys_meta_node, ds_ephys_ts, [("metadata", "metadata")]),
        (crop, ds_ephys_graph, [("ephys_graph", "in_file")]),
        (ephys, ds_channels, [("channels_tsv", "in_file")]),
        (align, ds_alignment, [("alignment_json", "in_file")]),
        (align, ds_windows, [("windows_tsv", "in_file")]),
    ])  # fmt:skip
    return wf


def _atlas_ents(atlas) -> dict:
    ents = dict(atlas.entities)
    if "seg" in ents:
        ents["segmentation"] = ents.pop("seg")
    return ents


def _atlas_rel(atlas) -> str:
    from samba_pipeline.bids.derivatives import derivative_path

    return str(derivative_path("", **atlas_output_entities(atlas), extension=".nii.gz"))


def atlas_output_entities(atlas) -> dict:
    res = atlas.spec.resolution if atlas.spec.is_templateflow else None
    m = re.search(r"res-([a-zA-Z0-9]+)", Path(atlas.image).name)
    if m:
        res = m.group(1)
    ents = dict(tpl=atlas.template, atlas=atlas.entities["atlas"], suffix="dseg")
    if res is not None:
        ents["res"] = f"{int(res):02d}" if str(res).isdigit() else str(res)
    if "seg" in atlas.entities:
        ents["segmentation"] = atlas.entities["seg"]
    if "scale" in atlas.entities:
        ents["scale"] = atlas.entities["scale"]
    return ents


def _uri(settings: Settings, path: str) -> str:
    """A BIDS URI for an input file (``bids:raw:...`` or ``bids:<derivative>:...``)."""
    path = Path(path)
    for name, root in settings.execution.derivatives.items():
        try:
            return f"bids:{name}:{path.relative_to(root)}"
        except ValueError:
            continue
    try:
        return f"bids:raw:{path.relative_to(settings.bids_dir)}"
    except ValueError:
        return str(path)


__all__ = ["init_samba_participant_wf", "init_run_wf", "workflow_name", "atlas_output_entities"]
