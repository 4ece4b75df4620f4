"""Resume: a job killed mid-stage continues after its last chunk; a job that failed at stage k, retried,
starts at stage k with the earlier stages' artifacts (tests/test_api/test_job_retry.py); either way
the result is an uninterrupted run's.

Real processes: ``forgeflow run`` killed with SIGKILL (its workers die with it), then run again with
``--resume``. The stand-in
detector appends a byte per frame it makes to a tally file, so the work done is counted, not guessed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.test_pipeline_orchestration.test_long_video import make_video

FRAMES = 600


def resume_pipeline(tally: Path, delay_s: float = 0.0) -> dict[str, Any]:
    return {
        "pipeline": [
            {
                "plugin": "testkit",
                "tool": "crowd_players",
                "config": {"people": 3, "tally_file": str(tally), "delay_s": delay_s},
            },
            {"plugin": "testkit", "tool": "count_players"},
        ]
    }


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "forgeflow.cli", "run", *args]


def _env(home: Path, folder: Path) -> dict[str, str]:
    return {
        **os.environ,
        "FORGEFLOW_HOME": str(home),
        "FORGEFLOW_MEDIA_INPUT_ROOTS": str(folder),
        "FORGEFLOW_FRAME_CHUNK_FRAMES": "50",
        "FORGEFLOW_ANNOTATE_MEDIA": "false",
        "FORGEFLOW_USE_ENGINE": "false",
        "COLUMNS": "200",
    }


def frames_made(tally: Path) -> int:
    return tally.stat().st_size if tally.exists() else 0


def test_a_job_killed_mid_stage_resumes_after_its_last_chunk(tmp_path: Path, prefect_api_url: str) -> None:
    folder = tmp_path / "in"
    video = make_video(folder / "v.mp4", FRAMES)
    tally = tmp_path / "tally"
    pipeline_file = tmp_path / "pipeline.json"
    pipeline_file.write_text(json.dumps(resume_pipeline(tally, delay_s=0.004)))
    home, env = tmp_path / "home", _env(tmp_path / "home", folder)
    args = [str(pipeline_file), "--input", str(video)]

    proc = subprocess.Popen(
        _cli(*args), env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 180
        while frames_made(tally) < 0.6 * FRAMES:  # ~60% of stage 0
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "stage 0 never got to 60%"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI, its Prefect client and the workers: no hook runs
        proc.wait()
    killed_at = frames_made(tally)
    assert killed_at < FRAMES

    resumed = subprocess.run(
        _cli(*args, "--resume", "--json", "--out", str(tmp_path / "out")),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    envelope = json.loads(resumed.stdout)
    made = frames_made(tally)
    # the retry made only the frames after the last chunk the killed run stored (at most one chunk again)
    assert FRAMES <= made <= killed_at + (FRAMES - killed_at) + 50, (killed_at, made)
    assert made <= 1.1 * FRAMES

    # identical to an uninterrupted run (a fresh home: nothing to resume from)
    fresh = tmp_path / "fresh"
    whole = subprocess.run(_cli(*args, "--json"), env=_env(fresh, folder), capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert json.loads(whole.stdout)["result"] == envelope["result"]
    assert envelope["result"]["players"]["frames"] == FRAMES
    # the job that succeeded leaves no checkpoints behind
    assert not any((home / "checkpoints").rglob("*.json*"))


@pytest.mark.fast
def test_the_resume_flag_is_said_only_when_set() -> None:
    from forgeflow.pipeline.definition import PipelineDefinition

    plain = PipelineDefinition.model_validate({"stages": [{"plugin": "testkit", "tool": "noop"}]})
    assert "resume" not in plain.model_dump(mode="json")  # pipelines written before it keep their JSON
    resumed = PipelineDefinition.model_validate({"pipeline": [{"plugin": "testkit", "tool": "noop"}], "resume": True})
    assert resumed.resume and resumed.model_dump(mode="json")["resume"] is True
