"""``samba-bids`` entry point: parse, validate, build the Nipype workflow, run it, report.

Exit codes (BIDS execution spec): 0 success, 1 unexpected failure, 2 argparse usage error,
16 BIDS validation failed, 17 unknown analysis level, 18 filters matched nothing, 64 usage,
65 data error, 66 input missing, 73 cannot create output.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Sequence

from samba_pipeline.errors import (
    EXIT_FAILURE,
    EXIT_OK,
    SambaError,
    SambaInputError,
)

LOGGER = logging.getLogger("samba_pipeline.cli")
IMPORTANT = 25
logging.addLevelName(IMPORTANT, "IMPORTANT")


def setup_logging(verbosity: int) -> None:
    """Log level 25 - 5 * verbosity, as fMRIPrep users know it; Nipype shows node progress."""
    level = max(IMPORTANT - 5 * verbosity, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s | %(name)-22s | %(levelname)-9s | %(message)s",
                                           "%y%m%d-%H:%M:%S"))
    root = logging.getLogger("samba_pipeline")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    from nipype import config as ncfg
    from nipype import logging as nlogging

    ncfg.set("logging", "workflow_level", "INFO" if verbosity < 2 else "DEBUG")
    ncfg.set("logging", "interface_level", "WARNING" if verbosity < 2 else "DEBUG")
    ncfg.set("logging", "utils_level", "WARNING")
    nlogging.update_logging(ncfg)
    if verbosity < 2:
        for name in ("nipype.workflow", "nipype.interface"):
            flt = _ShortNipypeErrors()
            logging.getLogger(name).filters[:] = [f for f in logging.getLogger(name).filters
                                                  if not isinstance(f, _ShortNipypeErrors)]
            logging.getLogger(name).addFilter(flt)
    for name in ("mne", "mne_bids"):
        logging.getLogger(name).setLevel(logging.ERROR if verbosity < 2 else logging.INFO)


class _ShortNipypeErrors(logging.Filter):
    """At default verbosity, Nipype's node-crash records lose their tracebacks.

    The user gets samba-bids' one-line error at the end; the full traceback stays in the crash
    file (and is shown with -vv).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            message = record.getMessage()
            if "Traceback" in message or "\n" in message:
                first = message.strip().splitlines()[0]
                record.msg, record.args = first, ()
        return True


def main(argv: Sequence[str] | None = None) -> int:
    from samba_pipeline.cli.parser import parse_args

    try:
        settings = parse_args(argv)
    except SambaError as exc:
        print(f"samba-bids: error: {exc}", file=sys.stderr)
        return exc.exit_code
    setup_logging(settings.execution.verbosity)
    settings.apply_environment()
    start = time.monotonic()
    try:
        if settings.execution.analysis_level == "participant":
            from samba_pipeline.cli.participant import run_participant

            run_participant(settings)
        else:
            from samba_pipeline.cli.group import run_group

            run_group(settings)
    except SambaError as exc:
        LOGGER.critical("%s", exc)
        if settings.execution.verbosity >= 2:
            LOGGER.debug("".join(traceback.format_exc()))
        return exc.exit_code
    except KeyboardInterrupt:
        LOGGER.critical("interrupted; re-run the same command with the same -w to resume")
        return 130
    except Exception as exc:  # an unexpected failure: a bug, or a failing node
        LOGGER.critical("samba-bids failed: %s: %s", type(exc).__name__, exc)
        LOGGER.critical("%s", "".join(traceback.format_exc()))
        return EXIT_FAILURE
    LOGGER.log(IMPORTANT, "samba-bids %s level finished in %.1f s; outputs in %s",
               settings.execution.analysis_level, time.monotonic() - start, settings.output_dir)
    return EXIT_OK


_ERROR_LINE = re.compile(r"(?:samba_pipeline\.errors\.)?(Samba\w*Error): (.+)$")


def error_from_crashfiles(crash_dir: Path) -> SambaError | None:
    """Recover the user-facing error a node raised, from Nipype's text crash files."""
    from samba_pipeline import errors

    found = None
    for crash in sorted(crash_dir.glob("crash-*.txt"), key=lambda p: p.stat().st_mtime):
        text = crash.read_text(errors="replace")
        matches = [m for line in text.splitlines() if (m := _ERROR_LINE.search(line.strip()))]
        if matches:
            name, message = matches[-1].groups()
            klass = getattr(errors, name, SambaInputError)
            err = klass.__new__(klass)
            Exception.__init__(err, message)
            err.message, err.path = message, None
            found = err
    return found


def raise_node_error(crash_dirs: list[Path], exc: Exception) -> None:
    """After a failed workflow run: raise the user's one-line error a node left in its crash
    file, or a generic failure that says where the crash files are."""
    for crash_dir in crash_dirs:
        if crash_dir.is_dir():
            err = error_from_crashfiles(crash_dir)
            if err is not None:
                raise err from None
    raise SambaError(f"the workflow failed ({exc}); crash files are in "
                     + ", ".join(str(d) for d in crash_dirs)) from None


__all__ = ["main", "setup_logging", "error_from_crashfiles", "raise_node_error"]
