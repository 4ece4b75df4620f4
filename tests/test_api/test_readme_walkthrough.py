"""The README's API walkthrough (upload, submit, follow over REST and the WebSocket, template, cancel),
run as written with bash against a live ``forgeflow serve``: only its ``API=`` line gets this test's
port, and the checkout it expects (``.venv/bin/python``, ``examples/sample.mp4``) is made in a
temporary folder."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_http

pytestmark = pytest.mark.vision

README = Path(__file__).resolve().parents[2] / "README.md"
API_LINE = "API=http://127.0.0.1:8700"


def walkthrough() -> str:
    """The bash block of the README's walkthrough section."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Walkthrough: upload, submit, follow, template, cancel") :]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    assert match, "the walkthrough has no bash block"
    return match.group(1)


def test_the_readme_walkthrough_runs_as_written(tmp_path: Path, prefect_api_url: str) -> None:
    from forgeflow.cli.sample_clip import make_sample_clip

    script = walkthrough()
    assert script.count(API_LINE) == 1
    port = free_port()
    script = script.replace(API_LINE, f"API=http://127.0.0.1:{port}")

    checkout = tmp_path / "checkout"
    python = checkout / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    make_sample_clip(checkout / "examples" / "sample.mp4")

    home = tmp_path / "home"
    env = {**os.environ, "FORGEFLOW_HOME": str(home), "PREFECT_API_URL": prefect_api_url}
    home.mkdir()
    with (home / "serve.log").open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "forgeflow.cli", "serve", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=120, proc=server)
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=checkout,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{(home / 'serve.log').read_text()[-4000:]}"
    finally:
        subprocess.run([sys.executable, "-m", "forgeflow.cli", "engine", "stop"], env=env, capture_output=True)
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)

    lines = done.stdout.splitlines()
    # the WebSocket printed every message of the first job, seq 1, 2, 3 …, ending with its terminal one
    messages = [line.split() for line in lines if re.match(r"^\d+ (pipeline_|job_status)", line)]
    assert [int(m[0]) for m in messages] == list(range(1, len(messages) + 1))
    assert messages[-1][1:] == ["job_status", "succeeded"]
    assert sum(1 for m in messages if m[1] == "pipeline_stage_end") == 3
    assert "succeeded" in lines  # the job's status over REST
    assert "soccer-analysis" in lines and "every frame, in warm worker processes" in lines  # saved, replaced
    assert lines[-2:] == ["True", "cancelled"]
