"""Errors that samba-bids reports to users, each with a BIDS-execution-spec exit code.

Every error a user can cause with their data or their command line is one of these. The CLI
prints ``str(error)`` as one line (no traceback unless ``-vv``) and exits with ``error.exit_code``.
"""

from __future__ import annotations

import os

# Exit codes recommended by the BIDS execution spec (draft) and sysexits.h.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_VALIDATION = 16
EXIT_BAD_LEVEL = 17
EXIT_NO_MATCH = 18
EXIT_USAGE = 64
EXIT_DATAERR = 65
EXIT_NOINPUT = 66
EXIT_CANTCREAT = 73
EXIT_IOERR = 74


class SambaError(Exception):
    """Base class of the errors samba-bids reports to users."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class SambaUsageError(SambaError):
    """The command line or configuration file is wrong."""

    exit_code = EXIT_USAGE


class SambaValidationError(SambaError):
    """The input is not a valid BIDS dataset."""

    exit_code = EXIT_VALIDATION


class SambaBadLevelError(SambaError):
    """The analysis level is not one samba-bids knows."""

    exit_code = EXIT_BAD_LEVEL


class SambaNoMatchError(SambaError):
    """The entity filters selected no data."""

    exit_code = EXIT_NO_MATCH


class SambaInputError(SambaError):
    """An input file holds data samba-bids cannot use (data error)."""

    exit_code = EXIT_DATAERR


class SambaMissingInputError(SambaError):
    """A required input (file, modality, derivative, atlas) is missing or unreadable."""

    exit_code = EXIT_NOINPUT


class SambaOutputError(SambaError):
    """An output could not be created."""

    exit_code = EXIT_CANTCREAT
