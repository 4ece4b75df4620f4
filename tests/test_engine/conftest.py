"""Fixtures of the engine tests."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from forgeflow.engine.client import EngineClient, ensure_engine
from forgeflow.settings import Settings


@pytest.fixture(scope="session")
def sample_clip() -> Path:
    """A short offline clip (the sample clip's first 16 frames)."""
    from forgeflow.cli.sample_clip import make_sample_clip

    return make_sample_clip(Path(tempfile.mkdtemp(prefix="forgeflow-engine-")) / "clip.mp4", frames=16)


@pytest.fixture
def start_engine(tmp_path: Path, prefect_api_url: str) -> Iterator[Callable[..., EngineClient]]:
    started: list[tuple[EngineClient, int]] = []

    def start(**overrides: Any) -> EngineClient:
        settings = Settings(home=tmp_path / f"home{len(started)}", **overrides)
        client, status = ensure_engine(settings, env={"PREFECT_API_URL": prefect_api_url}, timeout=180)
        started.append((client, status["pid"]))
        return client

    yield start
    import contextlib
    import os
    import signal

    from forgeflow.processes import pid_alive

    for client, pid in started:
        try:
            client.shutdown(drain=False)
        except Exception:
            pass
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # the engine is this process's child: reap it once it exits
            if not pid_alive(pid):  # gone, or a zombie (which os.kill(pid, 0) would still find)
                break
            time.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
