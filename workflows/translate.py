"""Participant-level translation with a trained model (``--model-file``), wiring only.

Paired runs (EEG/MEG and fMRI) get a ``predict_<run>`` node fed by the run's cropped series
(the measured target gives the run's metrics). Runs with only the model's source modality get a
``<run>_predict_wf``:

    EEG/MEG only:  ephys_file -> preprocess_ephys -> ephys_series -> predict -> publish
                   (the predicted fMRI starts at the first scanner volume trigger when the
                   recording has them, else at the first EEG/MEG sample)
    fMRI only:     bold -> parcellate_bold -> predict -> publish
"""

from __future__ import annotations

from nipype.pipeline import engine as pe

from samba_pipeline.bids.layout import RunPair
from samba_pipeline.config import Settings
from samba_pipeline.interfaces.models import EphysSeries, PredictRun, PublishStage
from samba_pipeline.interfaces.participant import DerivativesSink, MakeSidecar
from samba_pipeline.workflows.participant import (
    _atlas_ents,
    _atlas_rel,
    _node_name,
    _uri,
    init_ephys_node,
    init_parcellate_node,
)


def _use_gpu(settings: Settings) -> bool:
    from samba_pipeline.training.trainer import resolve_device

    return resolve_device(settings.model.device).type == "cuda"


def _predict_node(settings: Settings, pair: RunPair, atlases: dict, card: dict, name: str) -> pe.Node:
    fmri_atlas = atlases["fmri"]
    node = pe.Node(PredictRun(
        model_file=card["_file"], entities=pair.entities,
        fmri_entities=dict(space=settings.workflow.fmri_space, **_atlas_ents(fmri_atlas)),
        atlas_image=str(fmri_atlas.image), atlas_table=str(fmri_atlas.table),
        ephys_datatype=pair.ephys_datatype or "eeg", mc_dropout=settings.model.mc_dropout,
        device=settings.model.device, seed=settings.seeds.torch, use_gpu=_use_gpu(settings)),
        name=name, n_procs=settings.nipype.resolved_omp_nthreads())
    return node


def add_paired_prediction(wf: pe.Workflow, run_wf: pe.Workflow, settings: Settings, pair: RunPair,
                          atlases: dict, card: dict) -> None:
    """Predict a paired run from its cropped source series; score it against the measured target."""
    direction = card["Dims"]["direction"]
    tag = run_wf.name.removesuffix("_wf")
    predict = _predict_node(settings, pair, atlases, card, f"predict_{tag}")
    predict.inputs.alignment_note = "first kept fMRI volume (the run's alignment)"
    publish = pe.Node(PublishStage(output_dir=str(settings.output_dir)), name=f"publish_predict_{tag}",
                      run_without_submitting=True)
    ephys_out, fmri_out = "crop_graph.ephys_timeseries", "crop_graph.fmri_timeseries"
    source, target = (ephys_out, fmri_out) if direction == "ephys2fmri" else (fmri_out, ephys_out)
    wf.connect([
        (run_wf, predict, [(source, "source_file"), (target, "target_file")]),
        (predict, publish, [("stage_dir", "stage_dir")]),
    ])  # fmt:skip


def init_single_modality_wf(settings: Settings, pair: RunPair, atlases: dict, facts: dict,
                            card: dict | None) -> pe.Workflow:
    """Preprocess the one modality a run has and predict the other with the trained model."""
    if card is None:
        raise ValueError(f"{pair.name} has only one modality; that needs a model (--model-file)")
    direction = card["Dims"]["direction"]
    out = str(settings.output_dir)
    wset = settings.workflow
    wf = pe.Workflow(name=_node_name(pair.name.replace(f"sub-{pair.subject}_", "")) + "_predict_wf")
    predict = _predict_node(settings, pair, atlases, card, "predict")
    publish = pe.Node(PublishStage(output_dir=out), name="publish_predict", run_without_submitting=True)
    wf.connect(predict, "stage_dir", publish, "stage_dir")

    if direction == "ephys2fmri":
        if not pair.ephys_file:
            raise ValueError(f"{pair.name}: an EEG/MEG -> fMRI model needs the EEG/MEG recording")
        ephys, source_space = init_ephys_node(settings, pair, atlases, facts)
        series = pe.Node(EphysSeries(repetition_time=float(card["Metadata"]["RepetitionTime"]),
                                     volume_trigger=list(wset.volume_trigger)),
                         name="ephys_series", mem_gb=facts["ephys_mem_gb"])
        meta = pe.Node(MakeSidecar(base={
            "Sources": [_uri(settings, pair.ephys_file)], "Space": "source" if source_space else "sensor",
            "Description": "preprocessed EEG/MEG time series (no fMRI run: from the first volume trigger "
                           "when present, else the whole recording)"},
            extra_key="Preprocessing"), name="ephys_meta", run_without_submitting=True)
        eph_ents = dict(pair.entities, datatype=pair.ephys_datatype or "eeg", desc="preproc")
        ds_series = pe.Node(DerivativesSink(output_dir=out, entities=dict(eph_ents, suffix="timeseries",
                                                                          extension=".tsv.gz")),
                            name="ds_ephys_timeseries", run_without_submitting=True)
        ds_channels = pe.Node(DerivativesSink(output_dir=out, entities=dict(eph_ents, suffix="channels",
                                                                            extension=".tsv")),
                              name="ds_ephys_channels", run_without_submitting=True)
        wf.connect([
            (ephys, series, [("raw_file", "raw_file"), ("events_tsv", "events_tsv")]),
            (ephys, meta, [("report_json", "extra_json")]),
            (series, meta, [("sfreq", "sampling_frequency")]),
            (series, ds_series, [("timeseries", "in_file")]),
            (meta, ds_series, [("metadata", "metadata")]),
            (ephys, ds_channels, [("channels_tsv", "in_file")]),
            (series, predict, [("timeseries", "source_file"), ("onset_s", "onset_s"),
                               ("note", "alignment_note")]),
        ])  # fmt:skip
        return wf

    if not pair.bold_file:
        raise ValueError(f"{pair.name}: an fMRI -> EEG/MEG model needs the fMRI run")
    fmri_atlas = atlases["fmri"]
    parcellate = init_parcellate_node(settings, pair, atlases, facts)
    predict.inputs.alignment_note = "first volume of the BOLD series"
    fmri_ents = dict(pair.entities, datatype="func", space=wset.fmri_space, **_atlas_ents(fmri_atlas))
    ds_fmri = pe.Node(DerivativesSink(
        output_dir=out, entities=dict(fmri_ents, stat="mean", suffix="timeseries", extension=".tsv"),
        metadata={"RepetitionTime": facts["tr"], "SamplingFrequency": 1.0 / facts["tr"], "StartTime": 0.0,
                  "Atlas": fmri_atlas.spec.label(), "NodeFiles": f"bids::{_atlas_rel(fmri_atlas)}",
                  "Sources": [_uri(settings, pair.bold_file)], "Units": "z-score (per parcel)"}),
        name="ds_fmri_timeseries", run_without_submitting=True)
    wf.connect([
        (parcellate, ds_fmri, [("timeseries_tsv", "in_file")]),
        (parcellate, predict, [("timeseries_tsv", "source_file")]),
    ])  # fmt:skip
    return wf


__all__ = ["add_paired_prediction", "init_single_modality_wf"]
