"""Group-level Nipype workflow (wiring only)."""

from __future__ import annotations

from nipype.pipeline import engine as pe

from samba_pipeline.config import Settings
from samba_pipeline.interfaces.group import GroupSummary
from samba_pipeline.workflows.participant import workflow_name


def init_group_wf(settings: Settings) -> pe.Workflow:
    """Summarise all participant derivatives in the output folder into ``group/``."""
    wf = pe.Workflow(name=workflow_name().replace("_wf", "_group_wf"), base_dir=str(settings.work_dir))
    summary = pe.Node(GroupSummary(output_dir=str(settings.output_dir)), name="group_summary")
    wf.add_nodes([summary])
    return wf
