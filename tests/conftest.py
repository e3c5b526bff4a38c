"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory):
    """The default demo dataset (2 subjects, 3 minutes), generated once per test session.

    Returns ``(bids_root, truth_dir)``; treat both as read-only.
    """
    from samba_pipeline.simulate import generate_demo_dataset

    parent = tmp_path_factory.mktemp("demo")
    return generate_demo_dataset(parent / "demo", subjects=2, minutes=3.0)
