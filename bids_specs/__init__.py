"""Derivatives naming rules and sidecar templates; installed as ``samba_pipeline.bids_specs``."""

from pathlib import Path

SPEC_DIR = Path(__file__).parent


def spec_path(name: str) -> Path:
    """Return the path of a specification file shipped in this folder."""
    path = SPEC_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"samba-bids specification file {name!r} is missing from {SPEC_DIR}")
    return path
