"""Fixtures of the engine tests."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def sample_clip() -> Path:
    """A short offline clip (the sample clip's first 16 frames)."""
    from forgeflow.cli.sample_clip import make_sample_clip

    return make_sample_clip(Path(tempfile.mkdtemp(prefix="forgeflow-engine-")) / "clip.mp4", frames=16)
