"""Nipype interfaces of the group level."""

from __future__ import annotations

from nipype.interfaces.base import BaseInterfaceInputSpec, SimpleInterface, TraitedSpec, traits

from samba_pipeline.bids.derivatives import write_json, write_tsv


def _groupmean_name(key: str) -> str:
    """``task-rest_desc-preproc_stat-cosine_relmat.tsv`` -> ``..._desc-preprocGroupmean_...``; a
    name without ``desc`` gets ``desc-groupmean`` (one desc entity per name, as BIDS requires)."""
    import re

    if re.search(r"_desc-[a-zA-Z0-9]+", key):
        return re.sub(r"_desc-([a-zA-Z0-9]+)", lambda m: f"_desc-{m.group(1)}Groupmean", key, count=1)
    return key.replace("_stat-cosine_relmat.tsv", "_desc-groupmean_stat-cosine_relmat.tsv")


class _GroupSummaryInputSpec(BaseInterfaceInputSpec):
    output_dir = traits.Str(mandatory=True)


class _GroupSummaryOutputSpec(TraitedSpec):
    out_files = traits.List(traits.Str)


class GroupSummary(SimpleInterface):
    """QC table of all runs and group-mean graphs, written to ``<output_dir>/group``."""

    input_spec = _GroupSummaryInputSpec
    output_spec = _GroupSummaryOutputSpec
    _always_run = True  # the participant outputs it reads are not Nipype inputs

    def _run_interface(self, runtime):
        from pathlib import Path

        from samba_pipeline.group import mean_relmats, qc_table

        group = Path(self.inputs.output_dir) / "group"
        files = [write_tsv(group / "desc-qc_runs.tsv", qc_table(self.inputs.output_dir))]
        for key, table in mean_relmats(self.inputs.output_dir).items():
            name = _groupmean_name(key)
            files.append(write_tsv(group / name, table))
            files.append(write_json(group / name.replace(".tsv", ".json"), {
                "RelationshipMeasure": "mean over runs of the cosine similarity of mean-centred series",
                "NumberOfRuns": table.attrs.get("n_runs"), "Weighted": True, "Directed": False}))
        self._results["out_files"] = [str(f) for f in files]
        return runtime
