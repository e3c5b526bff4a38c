"""Nipype interfaces of the participant level: thin adapters around the pure functions.

Each interface reads its inputs from files, calls the functions in ``samba_pipeline.ephys``,
``samba_pipeline.fmri``, ``samba_pipeline.align`` and ``samba_pipeline.graphs``, and writes its
results into the node's working directory, where Nipype caches them (re-running a workflow
skips nodes whose inputs did not change).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from samba_pipeline.bids.derivatives import read_tsv, write_json, write_tsv

LOGGER = logging.getLogger("nipype.interface")


class _PreprocessEphysInputSpec(BaseInterfaceInputSpec):
    ephys_file = File(exists=True, mandatory=True, desc="raw EEG/MEG recording in a BIDS dataset")
    settings = traits.Dict(desc="EEG/MEG settings (MNE-BIDS-Pipeline names)")
    atlas_file = File(exists=True, desc="EEG/MEG atlas dseg image (source space)")
    atlas_table = File(exists=True, desc="EEG/MEG atlas label table (source space)")
    volume_trigger = traits.List(traits.Str, desc="volume marker names (MR gradient correction)")


class _PreprocessEphysOutputSpec(TraitedSpec):
    raw_file = File(exists=True, desc="preprocessed recording (FIF, work directory only)")
    events_tsv = File(exists=True, desc="events of the recording (onset, description)")
    report_json = File(exists=True, desc="what preprocessing did")
    channels_tsv = File(exists=True, desc="channel table with status (good/bad) and reason")
    sfreq = traits.Float(desc="sampling frequency after preprocessing")
    duration = traits.Float(desc="duration of the preprocessed recording (n_samples / sfreq)")
    mr_qc_figure = File(exists=True, desc="before/after figure of the MR artifact correction "
                        "(only when a correction ran)")
    psd_file = File(exists=True, desc="power spectra before/after preprocessing (npz, for the report)")


class PreprocessEphys(SimpleInterface):
    """Read an EEG/MEG recording with mne-bids and preprocess it (filters, bads, reference).

    With ``space = "source"`` the preprocessed sensors are projected onto the EEG/MEG atlas'
    parcels (:mod:`samba_pipeline.ephys.source`), and ``raw_file`` holds the parcel time
    courses (``misc`` channels named after the parcels) instead of the sensors.
    """

    input_spec = _PreprocessEphysInputSpec
    output_spec = _PreprocessEphysOutputSpec

    def _run_interface(self, runtime):
        from mne_bids import get_bids_path_from_fname

        from samba_pipeline.ephys.preprocess import EphysSettings, preprocess_raw
        from samba_pipeline.ephys.read import events_from_raw, read_bids_events, read_ephys

        options = dict(self.inputs.settings or {})
        bids_path = get_bids_path_from_fname(self.inputs.ephys_file)
        if "ch_types" not in options and bids_path.datatype == "meg":
            options["ch_types"] = ["meg"]  # magnetometers and gradiometers, as MNE handles them
        settings = EphysSettings.from_dict(options)
        raw = read_ephys(bids_path)
        orig_sfreq = float(raw.info["sfreq"])
        orig_duration = raw.n_times / orig_sfreq
        # events.tsv is authoritative (mne-bids drops events outside the recording, which would
        # hide a timing problem from the alignment); the annotations serve when it is absent.
        events = read_bids_events(self.inputs.ephys_file)
        if events is None:
            onsets, descriptions = events_from_raw(raw)
            events = pd.DataFrame({"onset": onsets, "description": descriptions})
        self._results["events_tsv"] = str(write_tsv(Path(runtime.cwd) / "events.tsv", events))

        from samba_pipeline.align import VOLUME_TRIGGER_NAMES, find_volume_triggers

        names = tuple(self.inputs.volume_trigger or VOLUME_TRIGGER_NAMES)
        volumes = find_volume_triggers(events["onset"].to_numpy(float),
                                       events["description"].astype(str).to_numpy(), names=names,
                                       path=self.inputs.ephys_file)
        excerpt: dict = {}
        clean, report = preprocess_raw(raw, settings, volume_onsets=volumes, qc_excerpt=excerpt)
        report = dict(report)
        from samba_pipeline.reports.psd import save_psd_summary

        self._results["psd_file"] = save_psd_summary(raw, clean, settings.ch_types,
                                                     Path(runtime.cwd) / "psd.npz")
        figure = _mr_artifact_figure(report.get("mr_artifacts") or {}, excerpt, runtime.cwd,
                                     self.inputs.ephys_file)
        if figure is not None:
            self._results["mr_qc_figure"] = figure
        if settings.space == "source":
            clean, report["source_space"] = _to_source_space(clean, settings, self.inputs.atlas_file,
                                                       self.inputs.atlas_table,
                                                       self.inputs.ephys_file)
        raw_file = Path(runtime.cwd) / "preproc_raw.fif"
        clean.save(raw_file, overwrite=True, verbose="error")
        scores = pd.DataFrame(report.pop("channel_scores", None) or [])
        report.update(orig_sfreq=orig_sfreq, orig_duration=orig_duration,
                      source=str(self.inputs.ephys_file))
        # Wall-clock step timings go to the node's folder and log, not into the derivatives'
        # sidecars (which must be identical between a resumed and an uninterrupted run).
        timings = _pop_timings(report)
        write_json(Path(runtime.cwd) / "timings.json", timings)
        LOGGER.info("EEG/MEG preprocessing step timings (s): %s", timings)
        self._results["report_json"] = str(write_json(Path(runtime.cwd) / "report.json", report))

        bads = _bad_reasons(report)
        channels = pd.DataFrame({
            "name": raw.ch_names,
            "type": [str(t).upper() for t in raw.get_channel_types()],
            "status": ["bad" if ch in bads else "good" for ch in raw.ch_names],
            "status_description": [bads.get(ch, "n/a") for ch in raw.ch_names],
        })
        if not scores.empty:
            key = next((c for c in ("name", "channel", "ch_name") if c in scores.columns), None)
            if key is not None:
                scores = scores.rename(columns={key: "name"})
                extra = [c for c in scores.columns if c not in channels.columns]
                channels = channels.merge(scores[["name", *extra]], on="name", how="left")
        self._results["channels_tsv"] = str(write_tsv(Path(runtime.cwd) / "channels.tsv", channels))
        self._results.update(raw_file=str(raw_file), sfreq=float(clean.info["sfreq"]),
                             duration=float(clean.n_times / clean.info["sfreq"]))
        return runtime


def _mr_artifact_figure(mr_report: dict, excerpt: dict, cwd, ephys_file) -> str | None:
    """Before/after figure of the MR artifact correction (SVG), when a correction ran."""
    from samba_pipeline.ephys.artifacts import artifact_qc_figure

    applied = [name for name in ("gradient", "bcg") if (mr_report.get(name) or {}).get("applied")]
    if not applied or excerpt.get("before") is None:
        return None
    sfreq = float(excerpt["sfreq"])
    title = (f"{Path(str(ephys_file)).name}: {' + '.join(applied)} correction "
             f"({excerpt['start_s']:.0f}-{excerpt['start_s'] + excerpt['before'].shape[1] / sfreq:.0f} s)")
    path = Path(cwd) / "mr_artifacts_qc.svg"
    artifact_qc_figure(excerpt["before"], excerpt["after"], sfreq, path, title=title)
    return str(path)


def _to_source_space(clean, settings, atlas_file, atlas_table, ephys_file):
    """Parcel time courses of the preprocessed recording (see samba_pipeline.ephys.source)."""
    from samba_pipeline.atlas import read_label_table
    from samba_pipeline.ephys.source import source_parcel_timeseries
    from samba_pipeline.errors import SambaUsageError

    if not atlas_file or not atlas_table:
        raise SambaUsageError(f"{ephys_file}: source space needs the EEG/MEG atlas (image and "
                              "label table)")
    return source_parcel_timeseries(
        clean, atlas_file, read_label_table(Path(atlas_table)), method=settings.inverse_method,
        extract=settings.source_extract, noise_cov=settings.noise_cov, snr=settings.inverse_snr,
        depth=settings.depth, spacing_mm=settings.source_spacing, head_model=settings.head_model,
        subjects_dir=settings.subjects_dir, bem_file=settings.bem_file)


def _pop_timings(report: dict, prefix: str = "") -> dict[str, float]:
    """Remove every ``timings_s`` entry from ``report`` (nested), returning them flattened."""
    out: dict[str, float] = {}
    for key in list(report):
        value = report[key]
        if key == "timings_s" and isinstance(value, dict):
            out.update({f"{prefix}{k}": v for k, v in report.pop(key).items()})
        elif isinstance(value, dict):
            out.update(_pop_timings(value, f"{prefix}{key}."))
    return out


def _bad_reasons(report: dict) -> dict[str, str]:
    reasons: dict[str, list[str]] = {}
    bads = report.get("bads", {}) if isinstance(report.get("bads"), dict) else {}
    for criterion, names in bads.items():
        if isinstance(names, (list, tuple)):
            for name in names:
                reasons.setdefault(str(name), []).append(str(criterion))
    return {ch: "+".join(sorted(set(r))) for ch, r in reasons.items()}


class _ParcellateBoldInputSpec(BaseInterfaceInputSpec):
    bold_file = File(exists=True, mandatory=True)
    mask_file = File(exists=True)
    confounds_file = File(exists=True)
    atlas_file = File(exists=True, mandatory=True)
    atlas_table = File(exists=True, mandatory=True)
    strategy = traits.Str("acompcor", usedefault=True)
    repetition_time = traits.Float(mandatory=True)
    high_pass = traits.Either(None, traits.Float, default=None, usedefault=True)
    low_pass = traits.Either(None, traits.Float, default=None, usedefault=True)
    fd_threshold = traits.Float(0.5, usedefault=True)
    min_coverage = traits.Float(0.5, usedefault=True)


class _ParcellateBoldOutputSpec(TraitedSpec):
    timeseries_tsv = File(exists=True, desc="parcel time series (volumes x parcels)")
    coverage_tsv = File(exists=True, desc="parcel coverage")
    confounds_qc = File(exists=True, desc="confound strategy and high-motion volumes")


class ParcellateBold(SimpleInterface):
    """Regress confounds, filter and average the BOLD series within the atlas parcels."""

    input_spec = _ParcellateBoldInputSpec
    output_spec = _ParcellateBoldOutputSpec

    def _run_interface(self, runtime):
        from samba_pipeline.atlas import read_label_table
        from samba_pipeline.fmri.confounds import select_confounds
        from samba_pipeline.fmri.parcellate import parcellate_bold

        cwd = Path(runtime.cwd)
        import nibabel as nb

        n_volumes = nb.load(self.inputs.bold_file).shape[-1]
        confounds = None
        qc = {"strategy": "none", "columns": [], "n_regressors": 0}
        if self.inputs.strategy != "none" and self.inputs.confounds_file:
            confounds, qc = select_confounds(
                self.inputs.bold_file, strategy=self.inputs.strategy,
                confounds_file=self.inputs.confounds_file, fd_threshold=self.inputs.fd_threshold,
                n_volumes=n_volumes,
            )
        labels = read_label_table(Path(self.inputs.atlas_table))
        mask = self.inputs.mask_file if self.inputs.mask_file else None
        timeseries, coverage = parcellate_bold(
            self.inputs.bold_file, self.inputs.atlas_file, labels, mask_img=mask,
            confounds=confounds, tr=self.inputs.repetition_time, high_pass=self.inputs.high_pass,
            low_pass=self.inputs.low_pass, min_coverage=self.inputs.min_coverage,
        )
        qc = dict(qc)
        qc["n_parcels_below_coverage"] = int(timeseries.isna().all().sum())
        self._results["timeseries_tsv"] = str(write_tsv(cwd / "timeseries.tsv", timeseries))
        self._results["coverage_tsv"] = str(write_tsv(cwd / "coverage.tsv", coverage))
        self._results["confounds_qc"] = str(write_json(cwd / "confounds_qc.json", qc))
        return runtime


class _AlignInputSpec(BaseInterfaceInputSpec):
    events_tsv = File(exists=True, mandatory=True)
    ephys_file = traits.Str(desc="original recording (for messages)")
    ephys_sfreq = traits.Float(mandatory=True, desc="sampling frequency of the preprocessed series")
    ephys_duration = traits.Float(mandatory=True, desc="duration of the recording (s)")
    n_volumes = traits.Int(mandatory=True)
    repetition_time = traits.Float(mandatory=True)
    volume_trigger = traits.List(traits.Str, mandatory=True)
    window_lengths = traits.List(traits.Float, mandatory=True)
    pairing = traits.Str("simultaneous", usedefault=True,
                         desc="'simultaneous' (scanner triggers) or a non-simultaneous rule")
    ephys_events = File(exists=True, desc="EEG/MEG events.tsv with the stimulus segments")
    bold_events = File(exists=True, desc="fMRI events.tsv with the stimulus segments")
    stimulus_event = traits.List(traits.Str, desc="trial_type of the stimulus segments")
    stimulus_tolerance = traits.Float(0.1, usedefault=True)


class _AlignOutputSpec(TraitedSpec):
    alignment_json = File(exists=True)
    windows_tsv = File(exists=True)


class AlignRuns(SimpleInterface):
    """Put EEG/MEG and fMRI on one timeline from the scanner volume triggers, or (recordings
    of different sessions) from the stimulus-segment events of both sessions."""

    input_spec = _AlignInputSpec
    output_spec = _AlignOutputSpec

    def _run_interface(self, runtime):
        from samba_pipeline.align import estimate_alignment, find_volume_triggers, make_windows

        source = self.inputs.ephys_file or None
        if self.inputs.pairing != "simultaneous":
            alignment = _stimulus_alignment(self.inputs, source)
        else:
            events = read_tsv(self.inputs.events_tsv)
            triggers = find_volume_triggers(events["onset"].to_numpy(float),
                                            events["description"].astype(str).to_numpy(),
                                            names=tuple(self.inputs.volume_trigger), path=source)
            alignment = estimate_alignment(
                triggers, self.inputs.n_volumes, self.inputs.repetition_time,
                self.inputs.ephys_duration, self.inputs.ephys_sfreq, ephys_file=source,
            )
        windows = make_windows(alignment["n_volumes_kept"], self.inputs.repetition_time,
                               self.inputs.ephys_sfreq, lengths_s=tuple(self.inputs.window_lengths))
        alignment = dict(alignment)
        alignment["trigger_names"] = list(self.inputs.volume_trigger)
        alignment["ephys_sfreq"] = self.inputs.ephys_sfreq
        alignment["repetition_time"] = self.inputs.repetition_time
        cwd = Path(runtime.cwd)
        self._results["alignment_json"] = str(write_json(cwd / "alignment.json", alignment))
        self._results["windows_tsv"] = str(write_tsv(cwd / "windows.tsv", windows))
        return runtime


def _stimulus_alignment(inputs, source) -> dict:
    from samba_pipeline.align import (
        STIMULUS_EVENT_NAMES,
        estimate_stimulus_alignment,
        read_stimulus_events,
    )
    from samba_pipeline.errors import SambaMissingInputError

    for name in ("ephys_events", "bold_events"):
        if not isdefined(getattr(inputs, name)):
            raise SambaMissingInputError(f"{inputs.pairing} pairing needs the {name} file",
                                         path=source)
    names = tuple(inputs.stimulus_event) if isdefined(inputs.stimulus_event) and \
        inputs.stimulus_event else STIMULUS_EVENT_NAMES
    alignment = estimate_stimulus_alignment(
        read_stimulus_events(inputs.ephys_events, names),
        read_stimulus_events(inputs.bold_events, names), inputs.n_volumes,
        inputs.repetition_time, inputs.ephys_duration, inputs.ephys_sfreq,
        tolerance_s=inputs.stimulus_tolerance, ephys_file=source,
        ephys_events_file=inputs.ephys_events, fmri_events_file=inputs.bold_events)
    alignment["pairing"] = inputs.pairing
    alignment["stimulus_event"] = list(names)
    return alignment


class _CropGraphInputSpec(BaseInterfaceInputSpec):
    raw_file = File(exists=True, mandatory=True)
    fmri_timeseries = File(exists=True, mandatory=True)
    alignment_json = File(exists=True, mandatory=True)


class _CropGraphOutputSpec(TraitedSpec):
    ephys_timeseries = File(exists=True, desc="cropped EEG/MEG series (TSV.gz)")
    fmri_timeseries = File(exists=True, desc="cropped fMRI parcel series (TSV)")
    ephys_graph = File(exists=True, desc="cosine graph of the EEG/MEG nodes (relmat TSV)")
    fmri_graph = File(exists=True, desc="cosine graph of the fMRI parcels (relmat TSV)")
    ephys_sfreq = traits.Float()


class CropAndGraph(SimpleInterface):
    """Crop both series to their overlap and build the cosine-similarity graphs."""

    input_spec = _CropGraphInputSpec
    output_spec = _CropGraphOutputSpec

    def _run_interface(self, runtime):
        import mne

        from samba_pipeline.ephys.preprocess import ephys_timeseries
        from samba_pipeline.graphs import cosine_graph

        alignment = json.loads(Path(self.inputs.alignment_json).read_text())
        raw = mne.io.read_raw_fif(self.inputs.raw_file, preload=True, verbose="error")
        data, names, sfreq = ephys_timeseries(raw, alignment["ephys_start_sample"],
                                              alignment["ephys_stop_sample"])
        fmri = read_tsv(self.inputs.fmri_timeseries)
        first, n_kept = alignment["first_volume"], alignment["n_volumes_kept"]
        fmri = fmri.iloc[first:first + n_kept].reset_index(drop=True)
        cwd = Path(runtime.cwd)
        data = np.asarray(data, dtype=np.float64)
        ephys_df = pd.DataFrame(data, columns=list(names))
        self._results["ephys_timeseries"] = str(write_tsv(cwd / "ephys_timeseries.tsv.gz", ephys_df))
        self._results["fmri_timeseries"] = str(write_tsv(cwd / "fmri_timeseries.tsv", fmri))
        eg = cosine_graph(data)
        fg = cosine_graph(fmri.to_numpy(dtype=np.float64))
        self._results["ephys_graph"] = str(write_tsv(cwd / "ephys_graph.tsv", _relmat(eg, names)))
        self._results["fmri_graph"] = str(write_tsv(cwd / "fmri_graph.tsv", _relmat(fg, fmri.columns)))
        # Sample ephys_start_sample lies at the first kept volume: time 0 of the common timeline
        # (the sidecars' StartTime 0).
        self._results["ephys_sfreq"] = float(sfreq)
        return runtime


def _relmat(matrix: np.ndarray, names) -> pd.DataFrame:
    """A relmat table in XCP-D's layout: first column ``Node``, then one column per node."""
    names = [str(n) for n in names]
    table = pd.DataFrame(matrix, columns=names)
    table.insert(0, "Node", names)
    return table


class _SinkInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    output_dir = traits.Str(mandatory=True)
    entities = traits.Dict(mandatory=True, desc="BIDS entities of the output")
    metadata = traits.Dict(desc="JSON sidecar content (none written when empty)")


class _SinkOutputSpec(TraitedSpec):
    out_file = File(exists=True)
    out_meta = File()


class DerivativesSink(SimpleInterface):
    """Copy a result into the derivatives dataset under its BIDS name (atomically)."""

    input_spec = _SinkInputSpec
    output_spec = _SinkOutputSpec
    _always_run = True

    def _run_interface(self, runtime):
        from samba_pipeline.bids.derivatives import copy_file, derivative_path

        ents = dict(self.inputs.entities)
        out = derivative_path(self.inputs.output_dir, **ents)
        copy_file(self.inputs.in_file, out)
        self._results["out_file"] = str(out)
        meta = dict(self.inputs.metadata or {})
        if meta:
            ents["extension"] = ".json"
            sidecar = derivative_path(self.inputs.output_dir, **ents)
            if sidecar == out:
                raise ValueError(f"sidecar would overwrite {out}")
            write_json(sidecar, meta)
            self._results["out_meta"] = str(sidecar)
        return runtime


class _OptionalSinkInputSpec(_SinkInputSpec):
    in_file = File(exists=True, desc="nothing is written when undefined")


class OptionalDerivativesSink(DerivativesSink):
    """A :class:`DerivativesSink` for outputs that exist only sometimes (e.g. a QC figure of a
    correction that did not run): without ``in_file`` it writes nothing."""

    input_spec = _OptionalSinkInputSpec

    def _run_interface(self, runtime):
        if not isdefined(self.inputs.in_file):
            return runtime
        return super()._run_interface(runtime)


class _SidecarInputSpec(BaseInterfaceInputSpec):
    base = traits.Dict(desc="static metadata")
    sampling_frequency = traits.Float(desc="SamplingFrequency (Hz)")
    extra_json = File(exists=True, desc="JSON merged under 'extra_key' (or at top level)")
    extra_key = traits.Str("", usedefault=True)


class _SidecarOutputSpec(TraitedSpec):
    metadata = traits.Dict()


class MakeSidecar(SimpleInterface):
    """Assemble a JSON sidecar from static metadata and values known only at run time."""

    input_spec = _SidecarInputSpec
    output_spec = _SidecarOutputSpec

    def _run_interface(self, runtime):
        meta = dict(self.inputs.base or {})
        if self.inputs.sampling_frequency:
            meta["SamplingFrequency"] = float(self.inputs.sampling_frequency)
        if self.inputs.extra_json:
            extra = json.loads(Path(self.inputs.extra_json).read_text())
            source_space = extra.get("source_space") if isinstance(extra, dict) else None
            head_model = source_space.get("HeadModel") if isinstance(source_space, dict) else None
            if head_model:  # which head model source space used (known only at run time)
                meta["HeadModel"] = head_model
            if self.inputs.extra_key:
                meta[self.inputs.extra_key] = extra
            else:
                meta.update(extra)
        self._results["metadata"] = meta
        return runtime


__all__ = ["PreprocessEphys", "ParcellateBold", "AlignRuns", "CropAndGraph", "DerivativesSink",
           "MakeSidecar", "OptionalDerivativesSink"]
