"""The group level: summarise every participant's derivatives, then train, evaluate and apply
the translation model(s) (Nipype workflow)."""

from __future__ import annotations

import logging

from samba_pipeline.config import Settings

LOGGER = logging.getLogger("samba_pipeline.cli")
IMPORTANT = 25


def run_group(settings: Settings) -> None:
    from samba_pipeline.models.registry import get_model_class
    from samba_pipeline.training.data import load_runs
    from samba_pipeline.training.pipeline import _fmri_atlas_filter, derivatives_digest
    from samba_pipeline.training.trainer import resolve_device
    from samba_pipeline.workflows.group import init_group_wf

    ms = settings.model
    for name in ms.trained_models():  # unknown plugins fail now, not inside a node
        get_model_class(name)
    if ms.benchmark:  # unknown benchmark entries too
        from samba_pipeline.training.benchmark import expand_entries, parse_entry

        for name in expand_entries(ms.benchmark):
            for direction in ms.directions():
                parse_entry(name, direction)
    fmri_filter = _fmri_atlas_filter(dict(settings.workflow.fmri_atlas.entities()))
    runs = load_runs(settings.output_dir, fmri_atlas=fmri_filter)  # clear errors before any node runs
    device = resolve_device(ms.device)
    size_gb = sum(r.ephys.nbytes + r.fmri.nbytes for r in runs) / 1024**3
    LOGGER.log(IMPORTANT, "Group level: %d run(s) of %d subject(s); model(s) %s, direction %s, on %s",
               len(runs), len({r.subject for r in runs}), ", ".join(ms.trained_models()) or "none",
               ms.direction, device)
    del runs
    wf = init_group_wf(settings, inputs_digest=derivatives_digest(settings.output_dir, fmri_filter),
                       use_gpu=device.type == "cuda", train_mem_gb=round(1.5 + 4 * size_gb, 2))
    wf.config["execution"].update({"crashfile_format": "txt",
                                   "crashdump_dir": str(settings.log_dir()),
                                   "check_version": False,
                                   "remove_unnecessary_outputs": False,
                                   "stop_on_first_crash": settings.execution.stop_on_first_crash})
    plugin = settings.nipype.get_plugin()
    if ms.n_gpu_procs and plugin["plugin"] == "MultiProc":
        plugin["plugin_args"]["n_gpu_procs"] = ms.n_gpu_procs
    try:
        wf.run(**plugin)
    except RuntimeError as exc:
        from samba_pipeline.cli.run import raise_node_error

        raise_node_error([settings.log_dir()], exc)
