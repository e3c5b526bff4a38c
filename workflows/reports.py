"""Report nodes (wiring only; the figures and pages are made in samba_pipeline.reports).

Participant level, in each ``sub_<label>_wf``::

    <run>_wf: preprocess_ephys, parcellate_bold, align, crop_graph -> reportlets   (cached)
    reportlets of every run -> merge_reportlets -+
    sinks / published predictions -> merge_wait -+-> report  (OUT/sub-<label>.html; always runs)

Group level: every ``publish_*`` node and ``group_summary`` -> ``reports`` (rebuilds each
subject's report with its predictions, and writes OUT/group.html).
"""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from samba_pipeline.config import Settings
from samba_pipeline.interfaces.reports import GroupReports, RunReportlets, SubjectReport

_RUN_INPUTS = {
    "preprocess_ephys": [
        ("psd_file", "psd_file"),
        ("report_json", "ephys_report_json"),
        ("channels_tsv", "channels_tsv"),
        ("events_tsv", "events_tsv"),
    ],
    "parcellate_bold": [("confounds_qc", "confounds_qc_json")],
    "align": [("alignment_json", "alignment_json")],
    "crop_graph": [
        ("fmri_timeseries", "fmri_timeseries"),
        ("ephys_graph", "ephys_graph"),
        ("fmri_graph", "fmri_graph"),
    ],
}


def _run_reportlets(run_wf: pe.Workflow, settings: Settings, pair, atlases: dict, facts: dict) -> pe.Node:
    node = pe.Node(
        RunReportlets(
            entities={
                k: v
                for k, v in pair.entities.items()
                if k in ("subject", "session", "task", "acquisition", "run")
            },
            ephys_datatype=pair.ephys_datatype or "eeg",
            fd_threshold=settings.workflow.fd_threshold,
            atlases=[
                (f"{name} atlas: {atlas.spec.label()}", str(atlas.image), str(atlas.table))
                for name, atlas in (("EEG/MEG", atlases.get("ephys")), ("fMRI", atlases.get("fmri")))
                if atlas is not None
            ],
        ),
        name="reportlets",
        mem_gb=max(0.5, float(facts.get("bold_mem_gb") or 0.0)),
    )
    if pair.bold_file and "parcellate_bold" in run_wf.list_node_names():
        node.inputs.bold_file = pair.bold_file
        if facts.get("tr"):
            node.inputs.repetition_time = float(facts["tr"])
        if pair.mask_file:
            node.inputs.mask_file = pair.mask_file
        if pair.confounds_file:
            node.inputs.confounds_file = pair.confounds_file
    names = set(run_wf.list_node_names())
    for src, pairs in _RUN_INPUTS.items():
        if src in names:
            run_wf.connect([(run_wf.get_node(src), node, pairs)])
    return node


def add_subject_report(
    wf: pe.Workflow, settings: Settings, subject: str, runs: list, atlases: dict, inputs: dict
) -> None:
    """Add the reportlets of every run and the subject's report node to ``sub_<label>_wf``.

    ``runs``: ``[(pair, run_wf), ...]`` as built by the participant workflow.
    """
    from samba_pipeline.reports.boilerplate import methods_html

    merge = pe.Node(niu.Merge(max(1, len(runs))), name="merge_reportlets", run_without_submitting=True)
    wait_sources = []
    for i, (pair, run_wf) in enumerate(runs, start=1):
        _run_reportlets(run_wf, settings, pair, atlases, inputs[pair.name])
        wf.connect(run_wf, "reportlets.out_files", merge, f"in{i}")
        for name in run_wf.list_node_names():
            if name.startswith(("ds_", "publish_")):
                wait_sources.append(
                    (run_wf, f"{name}.{'out_files' if name.startswith('publish_') else 'out_file'}")
                )
    for name in wf.list_node_names():
        if "." not in name and name.startswith("publish_"):
            wait_sources.append((wf.get_node(name), "out_files"))
    report = pe.Node(
        SubjectReport(
            output_dir=str(settings.output_dir), subject=subject, methods_html=methods_html(settings)
        ),
        name="report",
        run_without_submitting=True,
    )
    wf.connect(merge, "out", report, "reportlets")
    if wait_sources:
        wait = pe.Node(niu.Merge(len(wait_sources)), name="merge_wait", run_without_submitting=True)
        for i, (src, out) in enumerate(wait_sources, start=1):
            wf.connect(src, out, wait, f"in{i}")
        wf.connect(wait, "out", report, "wait")


def add_group_reports(wf: pe.Workflow, settings: Settings) -> None:
    """Rebuild the subject reports and write the group report after every publishing node."""
    sources = [
        name
        for name in wf.list_node_names()
        if "." not in name and (name.startswith("publish_") or name == "group_summary")
    ]
    reports = pe.Node(
        GroupReports(output_dir=str(settings.output_dir)), name="reports", run_without_submitting=True
    )
    if sources:
        wait = pe.Node(niu.Merge(len(sources)), name="merge_reports_wait", run_without_submitting=True)
        for i, name in enumerate(sources, start=1):
            wf.connect(wf.get_node(name), "out_files", wait, f"in{i}")
        wf.connect(wait, "out", reports, "wait")
    else:
        wf.add_nodes([reports])


__all__ = ["add_group_reports", "add_subject_report"]
