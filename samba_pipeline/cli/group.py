"""The group level: summarise every participant's derivatives (Nipype workflow)."""

from __future__ import annotations

import logging

from samba_pipeline.config import Settings

LOGGER = logging.getLogger("samba_pipeline.cli")


def run_group(settings: Settings) -> None:
    from samba_pipeline.workflows.group import init_group_wf

    wf = init_group_wf(settings)
    wf.config["execution"].update({"crashfile_format": "txt",
                                   "crashdump_dir": str(settings.log_dir()),
                                   "check_version": False})
    try:
        wf.run(**settings.nipype.get_plugin())
    except RuntimeError as exc:
        from samba_pipeline.cli.run import raise_node_error

        raise_node_error([settings.log_dir()], exc)
