"""The engine that ``forgeflow run`` starts in the background: reused by the next run, stopped after
its idle time with nothing left behind, one for concurrent first runs, and not used when opted out.
Real ``forgeflow run`` processes, a real engine, real workers and real Prefect servers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from forgeflow.engine.client import EngineClient

NUMBERS = {
    "pipeline": [
        {"plugin": "testkit", "tool": "numbers", "config": {}},
        {"plugin": "testkit", "tool": "scale", "config": {"factor": 2}},
        {"plugin": "testkit", "tool": "total", "config": {}},
    ],
    "input": {"count": 4},
}


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A FORGEFLOW_HOME whose engine (if a test leaves one) is stopped, with all its processes."""
    home = tmp_path / "home"
    yield home
    client = EngineClient(home / "engine.sock")
    with contextlib.suppress(Exception):
        pid = int(client.status()["pid"])
        tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        client.shutdown(drain=False)
        _, alive = psutil.wait_procs(tree, timeout=20)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                os.killpg(proc.pid, signal.SIGKILL)


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "FORGEFLOW_HOME": str(home), "FORGEFLOW_AUTO_ENGINE": "true", **extra}
    return env


def forgeflow_run(pipeline: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "forgeflow.cli", "run", str(pipeline), "--json", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def write_pipeline(tmp_path: Path) -> Path:
    path = tmp_path / "numbers.json"
    path.write_text(json.dumps(NUMBERS))
    return path


def test_the_background_engine_is_reused_then_stops_after_its_idle_time_leaving_nothing(
    home: Path, tmp_path: Path
) -> None:
    """No PREFECT_API_URL: the engine starts its own Prefect server, which must go with it."""
    pipeline = write_pipeline(tmp_path)
    env = cli_env(home, FORGEFLOW_ENGINE_IDLE_STOP_S="600")
    env.pop("PREFECT_API_URL", None)
    first = forgeflow_run(pipeline, env)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["result"]["total"] == 12
    assert "starting this host's engine in the background" in first.stderr
    client = EngineClient(home / "engine.sock")
    status = client.status()
    pid = status["pid"]
    assert (status["started_by"], status["idle_stop_s"], status["jobs"]["finished"]) == ("forgeflow run", 600, 1)
    assert status["prefect_api_url"].startswith("http://127.0.0.1:")  # its own server

    second = forgeflow_run(pipeline, env)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["result"]["total"] == 12
    assert "starting this host's engine" not in second.stderr
    status = client.status()
    assert (status["pid"], status["jobs"]["finished"]) == (pid, 2)  # the same engine ran the second job
    assert {w["plugin"] for w in status["workers"]} == {"testkit"}

    shown = subprocess.run(
        [sys.executable, "-m", "forgeflow.cli", "engine", "status"], env=env, capture_output=True, text=True
    )
    assert "started by forgeflow run" in shown.stdout and "stops after 600 s idle" in shown.stdout

    # everything it started: workers, its Prefect server (and that server's own children)
    tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    assert len(tree) >= 3, [p.cmdline() for p in tree]
    client.set_idle_stop(1)  # the same rule as FORGEFLOW_ENGINE_IDLE_STOP_S=1, without a race with the runs
    _, alive = psutil.wait_procs(tree, timeout=60)
    assert not alive, [p.cmdline() for p in alive]
    assert not (home / "engine.sock").exists()
    assert not (home / "prefect" / "server.pid").exists()
    log = (home / "logs" / "engine.log").read_text()
    assert "no job or call for 1 s (idle stop)" in log and f"engine pid {pid} stopped" in log


def test_two_first_runs_at_once_share_one_engine(home: Path, tmp_path: Path, prefect_api_url: str) -> None:
    pipeline = write_pipeline(tmp_path)
    env = cli_env(home, PREFECT_API_URL=prefect_api_url)
    results: list[subprocess.CompletedProcess[str]] = []
    runs = [threading.Thread(target=lambda: results.append(forgeflow_run(pipeline, env))) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    assert [json.loads(r.stdout)["result"]["total"] for r in results] == [12, 12]
    status = EngineClient(home / "engine.sock").status()
    assert status["jobs"]["finished"] == 2  # both jobs ran on the one engine
    log = (home / "logs" / "engine.log").read_text()
    assert log.count("starting (started by forgeflow run)") == 1, log  # no second engine was even started


@pytest.mark.parametrize("opt_out", ["--no-engine", "FORGEFLOW_AUTO_ENGINE=false"])
def test_opting_out_runs_the_job_in_the_command_itself(
    opt_out: str, home: Path, tmp_path: Path, prefect_api_url: str
) -> None:
    pipeline = write_pipeline(tmp_path)
    env = cli_env(home, PREFECT_API_URL=prefect_api_url)
    args: list[str] = []
    if opt_out.startswith("--"):
        args.append(opt_out)
    else:
        name, value = opt_out.split("=")
        env[name] = value
    done = forgeflow_run(pipeline, env, *args)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"]["total"] == 12
    assert not (home / "engine.sock").exists()
    assert not (home / "logs" / "engine.log").exists()


def test_a_call_that_comes_while_its_worker_warms_up_takes_that_worker(ff_home: Path) -> None:
    """The engine starts a job's workers ahead of its flow run: the stage's call must wait for the
    worker being started, not start a second one (two model loads on a cold machine)."""
    from forgeflow.engine.runners.base import ToolCall
    from forgeflow.engine.runners.process import ProcessRunner
    from forgeflow.plugins.lifecycle import LifecycleStore
    from forgeflow.plugins.registry import PluginRegistry
    from forgeflow.settings import get_settings

    settings = get_settings()
    runner = ProcessRunner(settings, PluginRegistry.discover(LifecycleStore(settings.lifecycle_db)))
    try:
        warming = threading.Thread(target=runner.warm, args=("testkit",), kwargs={"if_none": True})
        warming.start()
        deadline = time.monotonic() + 10
        while not runner.status()["workers"] and time.monotonic() < deadline:  # the warm-up has begun
            time.sleep(0.01)
        result = runner.run(ToolCall(plugin="testkit", tool="noop"))
        warming.join()
        assert result.ok, result
        assert len(runner.worker_pids("testkit")) == 1
        assert runner.warm("testkit", if_none=True) is False  # it has a worker: no second one
    finally:
        runner.close()


def _outputs(out: Path) -> dict[str, Any]:
    envelope = json.loads((out / "result.json").read_text())
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    return {
        "files": sorted(p.name for p in out.iterdir()),
        "result": envelope["result"],
        "stages": [(s["plugin"], s["tool"], s["status"]) for s in envelope["stages"]],
        "events": [
            (e["type"], e.get("stage_index"), e["seq"]) for e in events if e["type"] != "pipeline_stage_progress"
        ],
        "annotated": (out / "annotated.jpg").read_bytes(),
    }


@pytest.mark.vision
def test_the_readme_command_writes_the_same_files_through_the_background_engine(
    home: Path, tmp_path: Path, prefect_api_url: str
) -> None:
    """`forgeflow run examples/soccer-analysis.json --input MEDIA --out DIR` (README) on an image:
    through the background engine and in the command itself, the same files with the same result,
    messages and annotated image."""
    from ultralytics import ASSETS

    readme_job = Path(__file__).resolve().parents[2] / "examples" / "soccer-analysis.json"
    env = cli_env(home, PREFECT_API_URL=prefect_api_url)
    outputs = {}
    command = [sys.executable, "-m", "forgeflow.cli", "run", str(readme_job), "--input", f"{ASSETS}/bus.jpg"]
    for way, args in (("engine", []), ("here", ["--no-engine"])):
        out = tmp_path / way
        done = subprocess.run(
            [*command, "--out", str(out), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        outputs[way] = _outputs(out)
    assert EngineClient(home / "engine.sock").status()["jobs"]["finished"] == 1  # the first went to the engine
    assert outputs["engine"] == outputs["here"]
    assert outputs["engine"]["files"] == ["annotated.jpg", "events.jsonl", "result.json"]
    assert len(outputs["engine"]["result"]["players"][0]["players"]) == 4
