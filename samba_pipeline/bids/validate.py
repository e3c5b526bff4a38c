"""Run the official BIDS validator (the Deno build from PyPI, which works offline)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

LOGGER = logging.getLogger("samba_pipeline.bids")


@dataclass
class ValidationResult:
    ran: bool
    errors: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)
    reason: str = ""

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self, limit: int = 5) -> str:
        parts = []
        for issue in self.errors[:limit]:
            where = issue.get("location") or ""
            text = issue.get("issueMessage") or issue.get("subCode") or ""
            parts.append(f"{issue.get('code', '?')}: {text} {where}".strip())
        more = len(self.errors) - limit
        if more > 0:
            parts.append(f"... and {more} more")
        return "; ".join(parts)


def validator_executable() -> str | None:
    """The ``bids-validator-deno`` executable next to this Python, or on PATH."""
    beside = Path(sys.executable).with_name("bids-validator-deno")
    if beside.is_file():
        return str(beside)
    return shutil.which("bids-validator-deno")


def run_validator(dataset: str | Path, *, timeout: float = 600, extra_args: list[str] | None = None
                  ) -> ValidationResult:
    """Validate ``dataset``; returns the errors and warnings the validator reported."""
    exe = validator_executable()
    if exe is None:
        return ValidationResult(ran=False, reason="bids-validator-deno is not installed")
    cmd = [exe, "--format", "json", "--ignoreNiftiHeaders", *(extra_args or []), str(dataset)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return ValidationResult(ran=False, reason=f"the validator could not run: {exc}")
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        reason = f"unreadable validator output: {proc.stderr.strip()[-300:]}"
        return ValidationResult(ran=False, reason=reason)
    issues = report.get("issues", {}).get("issues", [])
    errors = [i for i in issues if i.get("severity") == "error"]
    warnings = [i for i in issues if i.get("severity") == "warning"]
    return ValidationResult(ran=True, errors=errors, warnings=warnings)
