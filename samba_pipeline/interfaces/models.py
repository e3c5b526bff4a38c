"""Nipype interfaces for training and applying translation models.

Training and inference nodes take a ``use_gpu`` input: Nipype's MultiProc plugin treats a node
whose ``use_gpu`` is true as a GPU node and runs at most ``n_gpu_procs`` of them at once
(``--n-gpu-procs``), while CPU nodes keep running beside them. Every node writes its files into a
staging folder inside its working directory; :class:`PublishStage` copies them into the output
folder atomically.
"""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)


class _TrainInputSpec(BaseInterfaceInputSpec):
    output_dir = traits.Str(mandatory=True, desc="derivatives folder with participant-level results")
    model = traits.Str("samba", usedefault=True, desc="model plugin name")
    direction = traits.Enum("ephys2fmri", "fmri2ephys", usedefault=True)
    settings = traits.Dict(desc="ModelSettings fields")
    seed = traits.Int(0, usedefault=True)
    fmri_atlas = traits.Dict(desc="atlas/seg/scale of the fMRI parcels to train on")
    inputs_digest = traits.Str(mandatory=True, desc="digest of the participant files read (for caching)")
    checkpoint = traits.Str(mandatory=True, desc="checkpoint file (outside the node folder: survives reruns)")
    use_gpu = traits.Bool(False, usedefault=True, desc="GPU node for Nipype's MultiProc scheduler")


class _TrainOutputSpec(TraitedSpec):
    stage_dir = traits.Directory(exists=True, desc="staged derivatives (group/...)")
    model_prefix = traits.Str(desc="trained model files (prefix of .json/.safetensors)")


class TrainModel(SimpleInterface):
    """Train one model plugin in one direction on every participant's aligned runs."""

    input_spec = _TrainInputSpec
    output_spec = _TrainOutputSpec

    def _run_interface(self, runtime):
        from samba_pipeline.training.pipeline import clear_stage, train_group_model

        stage = clear_stage(Path(runtime.cwd) / "stage")
        out = train_group_model(self.inputs.output_dir, stage, model=self.inputs.model,
                                direction=self.inputs.direction, settings=dict(self.inputs.settings),
                                seed=self.inputs.seed, checkpoint=self.inputs.checkpoint,
                                fmri_atlas=dict(self.inputs.fmri_atlas or {}))
        self._results["stage_dir"] = str(stage)
        self._results["model_prefix"] = str(out["prefix"])
        return runtime


class _ApplyInputSpec(BaseInterfaceInputSpec):
    output_dir = traits.Str(mandatory=True)
    model_prefix = traits.Str(mandatory=True)
    mc_dropout = traits.Int(0, usedefault=True)
    device = traits.Str("auto", usedefault=True)
    seed = traits.Int(0, usedefault=True)
    use_gpu = traits.Bool(False, usedefault=True, desc="GPU node for Nipype's MultiProc scheduler")


class _ApplyOutputSpec(TraitedSpec):
    stage_dir = traits.Directory(exists=True)


class ApplyModel(SimpleInterface):
    """Apply a trained model to every aligned run (group level)."""

    input_spec = _ApplyInputSpec
    output_spec = _ApplyOutputSpec

    def _run_interface(self, runtime):
        from samba_pipeline.training.pipeline import apply_group_model, clear_stage
        from samba_pipeline.training.trainer import resolve_device

        stage = clear_stage(Path(runtime.cwd) / "stage")
        apply_group_model(self.inputs.model_prefix, self.inputs.output_dir, stage,
                          mc_dropout=self.inputs.mc_dropout, device=resolve_device(self.inputs.device),
                          seed=self.inputs.seed)
        self._results["stage_dir"] = str(stage)
        return runtime


class _PredictInputSpec(BaseInterfaceInputSpec):
    model_file = File(exists=True, mandatory=True, desc="model card (.json) or weights")
    source_file = File(exists=True, mandatory=True, desc="source series TSV(.gz), one column per node")
    target_file = File(exists=True, desc="measured target series on the same timeline (for metrics)")
    entities = traits.Dict(mandatory=True, desc="BIDS entities of the run")
    fmri_entities = traits.Dict(desc="space/atlas/seg/scale for fMRI prediction file names")
    atlas_image = File(exists=True, desc="fMRI atlas dseg image (for the predicted BOLD NIfTI)")
    atlas_table = File(exists=True, desc="its label table")
    ephys_datatype = traits.Str("eeg", usedefault=True)
    onset_s = traits.Float(0.0, usedefault=True, desc="time of the first predicted sample in the source")
    alignment_note = traits.Str("", usedefault=True)
    mc_dropout = traits.Int(0, usedefault=True)
    device = traits.Str("auto", usedefault=True)
    seed = traits.Int(0, usedefault=True)
    use_gpu = traits.Bool(False, usedefault=True, desc="GPU node for Nipype's MultiProc scheduler")


class _PredictOutputSpec(TraitedSpec):
    stage_dir = traits.Directory(exists=True)


class PredictRun(SimpleInterface):
    """Apply a trained model (``--model-file``) to one run's source series."""

    input_spec = _PredictInputSpec
    output_spec = _PredictOutputSpec

    def _run_interface(self, runtime):
        from nipype.interfaces.base import isdefined

        from samba_pipeline.training.pipeline import clear_stage, load_trained_model, write_run_prediction

        stage = clear_stage(Path(runtime.cwd) / "stage")
        net, card = load_trained_model(self.inputs.model_file, device=self.inputs.device)
        opt = {name: getattr(self.inputs, name) for name in ("target_file", "atlas_image", "atlas_table")
               if isdefined(getattr(self.inputs, name))}
        write_run_prediction(
            net, card, stage, source_file=self.inputs.source_file, entities=dict(self.inputs.entities),
            model_name=card["Plugin"], fmri_entities=dict(self.inputs.fmri_entities or {}),
            ephys_datatype=self.inputs.ephys_datatype, mc_dropout=self.inputs.mc_dropout,
            seed=self.inputs.seed, device=str(next(net.parameters()).device), onset_s=self.inputs.onset_s,
            alignment_note=self.inputs.alignment_note, model_file=str(self.inputs.model_file), **opt)
        self._results["stage_dir"] = str(stage)
        return runtime


class _EphysSeriesInputSpec(BaseInterfaceInputSpec):
    raw_file = File(exists=True, mandatory=True, desc="preprocessed recording (FIF)")
    events_tsv = File(exists=True, desc="events of the recording (onset, description)")
    repetition_time = traits.Float(mandatory=True, desc="TR of the fMRI the model predicts (s)")
    volume_trigger = traits.List(traits.Str, desc="names of scanner volume triggers")


class _EphysSeriesOutputSpec(TraitedSpec):
    timeseries = File(exists=True, desc="EEG/MEG series (TSV.gz), one column per channel/parcel")
    sfreq = traits.Float()
    onset_s = traits.Float(desc="time of the first sample in the recording (s)")
    note = traits.Str(desc="what the timeline starts at")


class EphysSeries(SimpleInterface):
    """The EEG/MEG series of a recording without fMRI, ready for an EEG/MEG -> fMRI model.

    With scanner volume triggers (an EEG-fMRI recording whose BOLD is missing) the series starts
    at the first trigger and ends one TR after the last one, so the predicted volumes line up with
    the acquired ones; without triggers it is the whole recording.
    """

    input_spec = _EphysSeriesInputSpec
    output_spec = _EphysSeriesOutputSpec

    def _run_interface(self, runtime):
        import mne
        import pandas as pd
        from nipype.interfaces.base import isdefined

        from samba_pipeline.align import find_volume_triggers, to_sample
        from samba_pipeline.bids.derivatives import read_tsv, write_tsv
        from samba_pipeline.ephys.preprocess import ephys_timeseries

        raw = mne.io.read_raw_fif(self.inputs.raw_file, preload=True, verbose="error")
        sfreq = float(raw.info["sfreq"])
        triggers = []
        if isdefined(self.inputs.events_tsv) and self.inputs.volume_trigger:
            events = read_tsv(self.inputs.events_tsv)
            if len(events):
                triggers = find_volume_triggers(events["onset"].to_numpy(float),
                                                events["description"].astype(str).to_numpy(),
                                                names=tuple(self.inputs.volume_trigger),
                                                path=self.inputs.events_tsv)
        if len(triggers) >= 2:
            start = int(to_sample(float(triggers[0]), sfreq))
            stop = min(raw.n_times, int(to_sample(float(triggers[-1]) + self.inputs.repetition_time, sfreq)))
            note = f"first scanner volume trigger ({len(triggers)} triggers)"
        else:
            start, stop = 0, raw.n_times
            note = "first EEG/MEG sample (no scanner volume triggers)"
        data, names, sfreq = ephys_timeseries(raw, start, stop)
        out = Path(runtime.cwd) / "ephys_timeseries.tsv.gz"
        self._results["timeseries"] = str(write_tsv(out, pd.DataFrame(data, columns=list(names))))
        self._results["sfreq"] = sfreq
        self._results["onset_s"] = start / sfreq
        self._results["note"] = note
        return runtime


class _BenchmarkInputSpec(BaseInterfaceInputSpec):
    output_dir = traits.Str(mandatory=True, desc="derivatives folder with participant-level results")
    bids_dir = traits.Str("", usedefault=True,
                          desc="raw dataset (func events.tsv for stimulus classification)")
    entries = traits.List(traits.Str, mandatory=True, desc="benchmark entries (see training.benchmark)")
    directions = traits.List(traits.Str, mandatory=True)
    settings = traits.Dict(desc="ModelSettings fields")
    seed = traits.Int(0, usedefault=True)
    fmri_atlas = traits.Dict(desc="atlas/seg/scale of the fMRI parcels to train on")
    inputs_digest = traits.Str(mandatory=True, desc="digest of the participant files read (for caching)")
    use_gpu = traits.Bool(False, usedefault=True, desc="GPU node for Nipype's MultiProc scheduler")


class _BenchmarkOutputSpec(TraitedSpec):
    stage_dir = traits.Directory(exists=True, desc="staged group/desc-benchmark_metrics.*")


class Benchmark(SimpleInterface):
    """Train every benchmark entry on one split; stage the Table-I-style benchmark tables."""

    input_spec = _BenchmarkInputSpec
    output_spec = _BenchmarkOutputSpec

    def _run_interface(self, runtime):
        from samba_pipeline.training.benchmark import run_benchmark
        from samba_pipeline.training.pipeline import clear_stage

        stage = clear_stage(Path(runtime.cwd) / "stage")
        run_benchmark(self.inputs.output_dir, stage, entries=list(self.inputs.entries),
                      directions=list(self.inputs.directions), settings=dict(self.inputs.settings),
                      seed=self.inputs.seed, fmri_atlas=dict(self.inputs.fmri_atlas or {}),
                      bids_dir=self.inputs.bids_dir or None)
        self._results["stage_dir"] = str(stage)
        return runtime


class _PublishInputSpec(BaseInterfaceInputSpec):
    stage_dir = traits.Directory(exists=True, mandatory=True)
    output_dir = traits.Str(mandatory=True)


class _PublishOutputSpec(TraitedSpec):
    out_files = traits.List(traits.Str)


class PublishStage(SimpleInterface):
    """Copy a node's staged derivatives into the output folder (atomically, file by file)."""

    input_spec = _PublishInputSpec
    output_spec = _PublishOutputSpec
    _always_run = True

    def _run_interface(self, runtime):
        from samba_pipeline.training.pipeline import publish

        self._results["out_files"] = publish(self.inputs.stage_dir, self.inputs.output_dir)
        return runtime


__all__ = ["ApplyModel", "Benchmark", "EphysSeries", "PredictRun", "PublishStage", "TrainModel"]
