"""Nipype interfaces of the reports (thin adapters around :mod:`samba_pipeline.reports`).

``RunReportlets`` draws one run's QC figures into its node folder (cached by Nipype like any
other node); ``SubjectReport`` copies them into ``OUT/sub-XX/figures``, adds the methods
boilerplate and the model reportlets, and writes ``OUT/sub-XX.html``; ``GroupReports`` rebuilds
every subject's report after the group level wrote predictions and writes ``OUT/group.html``.
The last two always run: what they read from the output folder is not a Nipype input.
"""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)


class _RunReportletsInputSpec(BaseInterfaceInputSpec):
    entities = traits.Dict(mandatory=True, desc="BIDS entities of the run")
    ephys_datatype = traits.Str("eeg", usedefault=True)
    psd_file = File(exists=True, desc="spectra before/after preprocessing (npz)")
    ephys_report_json = File(exists=True)
    channels_tsv = File(exists=True)
    events_tsv = File(exists=True)
    alignment_json = File(exists=True)
    confounds_qc_json = File(exists=True)
    bold_file = File(exists=True)
    mask_file = File(exists=True)
    confounds_file = File(exists=True)
    repetition_time = traits.Float()
    fd_threshold = traits.Float(0.5, usedefault=True)
    fmri_timeseries = File(exists=True, desc="cropped, confound-regressed parcel series")
    ephys_graph = File(exists=True)
    fmri_graph = File(exists=True)
    atlases = traits.List(
        traits.Tuple(traits.Str, traits.Str, traits.Str),
        desc="(label, dseg image, label table) of each atlas",
    )


class _RunReportletsOutputSpec(TraitedSpec):
    out_files = traits.List(File(exists=True))


class RunReportlets(SimpleInterface):
    """The QC figures of one run (power spectra, bad channels, carpet, motion, atlases, graphs,
    alignment, summary table), written into the node folder."""

    input_spec = _RunReportletsInputSpec
    output_spec = _RunReportletsOutputSpec

    def _run_interface(self, runtime):
        from samba_pipeline.reports.subject import run_reportlets

        kw = {}
        for name in (
            "psd_file",
            "ephys_report_json",
            "channels_tsv",
            "events_tsv",
            "alignment_json",
            "confounds_qc_json",
            "bold_file",
            "mask_file",
            "confounds_file",
            "fmri_timeseries",
            "ephys_graph",
            "fmri_graph",
        ):
            value = getattr(self.inputs, name)
            if isdefined(value):
                kw[name] = value
        tr = self.inputs.repetition_time if isdefined(self.inputs.repetition_time) else None
        self._results["out_files"] = run_reportlets(
            Path(runtime.cwd) / "reportlets",
            entities=dict(self.inputs.entities),
            ephys_datatype=self.inputs.ephys_datatype,
            tr=tr,
            fd_threshold=self.inputs.fd_threshold,
            atlases=[tuple(a) for a in self.inputs.atlases] if isdefined(self.inputs.atlases) else None,
            **kw,
        )
        return runtime


class _SubjectReportInputSpec(BaseInterfaceInputSpec):
    output_dir = traits.Str(mandatory=True)
    subject = traits.Str(mandatory=True)
    methods_html = traits.Str(desc="methods boilerplate (HTML) of the run's settings")
    reportlets = InputMultiObject(
        traits.Either(File(exists=True), traits.List(File(exists=True))),
        desc="reportlets to publish in OUT/sub-XX/figures",
    )
    wait = InputMultiObject(traits.Any, desc="outputs of nodes that must finish first (not read)")


class _ReportOutputSpec(TraitedSpec):
    out_report = File(exists=True)


class SubjectReport(SimpleInterface):
    """Publish the subject's reportlets and write ``OUT/sub-XX.html``."""

    input_spec = _SubjectReportInputSpec
    output_spec = _ReportOutputSpec
    _always_run = True

    def _run_interface(self, runtime):
        from samba_pipeline.bids.derivatives import copy_file, write_text
        from samba_pipeline.reports.subject import (
            assemble_subject_report,
            figure_name,
            model_reportlets,
        )

        out = Path(self.inputs.output_dir)
        folder = out / f"sub-{self.inputs.subject}" / "figures"
        files = []
        for item in self.inputs.reportlets if isdefined(self.inputs.reportlets) else []:
            files.extend(item if isinstance(item, list) else [item])
        for path in files:
            copy_file(path, folder / Path(path).name)
        if isdefined(self.inputs.methods_html) and self.inputs.methods_html:
            write_text(
                folder / figure_name({"subject": self.inputs.subject}, "methods", "report", ".html"),
                self.inputs.methods_html,
            )
        model_reportlets(out, self.inputs.subject)
        self._results["out_report"] = str(assemble_subject_report(out, self.inputs.subject))
        return runtime


class _GroupReportsInputSpec(BaseInterfaceInputSpec):
    output_dir = traits.Str(mandatory=True)
    wait = InputMultiObject(traits.Any, desc="outputs of nodes that must finish first (not read)")


class GroupReports(SimpleInterface):
    """After the group level: every subject's model reportlets and report, and ``OUT/group.html``."""

    input_spec = _GroupReportsInputSpec
    output_spec = _ReportOutputSpec
    _always_run = True

    def _run_interface(self, runtime):
        from samba_pipeline.reports.group import build_group_report
        from samba_pipeline.reports.subject import assemble_subject_report, model_reportlets

        out = Path(self.inputs.output_dir)
        for sub_dir in sorted(p for p in out.glob("sub-*") if p.is_dir()):
            subject = sub_dir.name.removeprefix("sub-")
            if model_reportlets(out, subject) or (sub_dir / "figures").is_dir():
                assemble_subject_report(out, subject)
        self._results["out_report"] = str(build_group_report(out))
        return runtime


__all__ = ["GroupReports", "RunReportlets", "SubjectReport"]
