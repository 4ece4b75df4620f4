"""Cross-job batching: the engine's runner (real ``Engine``, real warm worker processes, real
Ultralytics for the vision tools) joins concurrent calls of a batchable tool from different jobs
into one worker call, answers each job alone, and keeps cancel, timeout and crash isolation per job.

Calls go in through ``Engine.call``, the path of every stage call on the host, from one thread per
job, as the jobs' stage threads make them."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from forgeflow.canonical import canonical_bytes
from forgeflow.engine.runners.base import CallResult, ToolCall
from forgeflow.host.core import Engine
from forgeflow.settings import Settings

PROBE = {"plugin": "testkit", "tool": "batch_probe"}


@pytest.fixture
def engine(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Engine]:
    overrides: dict[str, Any] = getattr(request, "param", {})
    built = Engine(Settings(home=tmp_path / "home", **overrides))
    try:
        yield built
    finally:
        built.close()


def call_all(engine: Engine, calls: list[ToolCall]) -> list[CallResult]:
    """Every call at once, one thread each (as concurrent jobs make them); their results in order."""
    results: list[CallResult | None] = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def one(index: int) -> None:
        start.wait()
        results[index] = engine.call(calls[index])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(r is not None for r in results), "a call never returned"
    return [r for r in results if r is not None]


def probe(
    record: Path, job: str, value: int, *, hold_s: float = 0.0, timeout_s: float = 60.0, **extra: Any
) -> ToolCall:
    return ToolCall(
        **PROBE,
        config={"record": str(record), "hold_s": hold_s},
        inputs={"value": value, **extra},
        job_id=job,
        stage_index=0,
        timeout_s=timeout_s,
    )


def passes(record: Path) -> list[tuple[int, int]]:
    """The batched passes the tool recorded: (worker pid, calls joined)."""
    lines = record.read_text().split() if record.exists() else []
    return [(int(lines[i]), int(lines[i + 1])) for i in range(0, len(lines), 2)]


def test_concurrent_calls_of_different_jobs_run_as_one_batch(engine: Engine, tmp_path: Path) -> None:
    record = tmp_path / "passes.txt"
    engine.call(probe(record, "warm", 0))  # the worker is warm: the batch does not wait for its start
    record.unlink()
    results = call_all(engine, [probe(record, f"job-{i}", i) for i in range(6)])

    assert [r.ok for r in results] == [True] * 6, [r.error for r in results]
    assert [r.outputs["doubled"] for r in results] == [0, 2, 4, 6, 8, 10]  # type: ignore[index]
    assert len({r.outputs["pid"] for r in results}) == 1  # type: ignore[index]  # one worker served them all
    joined = passes(record)
    assert sum(groups for _pid, groups in joined) == 6
    assert len(joined) < 6, joined  # fewer model passes than jobs
    assert engine.runner.status()["batches"] < 1 + 6


@pytest.mark.parametrize("engine", [{"batching": False}], indirect=True)
def test_batching_off_runs_every_call_alone(engine: Engine, tmp_path: Path) -> None:
    record = tmp_path / "passes.txt"
    results = call_all(engine, [probe(record, f"job-{i}", i) for i in range(3)])
    assert [r.outputs["doubled"] for r in results] == [0, 2, 4]  # type: ignore[index]
    assert sorted(groups for _pid, groups in passes(record)) == [1, 1, 1]
    assert engine.runner.status()["batches"] == 0


def test_cancelled_and_timed_out_calls_of_a_batch_end_alone(engine: Engine, tmp_path: Path) -> None:
    record = tmp_path / "passes.txt"
    engine.call(probe(record, "warm", 0))
    record.unlink()
    calls = [
        probe(record, "cancelled", 1, seconds=30),  # still before its pass when the job is cancelled
        probe(record, "timed-out", 2, seconds=30, timeout_s=1.5),
        probe(record, "ok-1", 3),
        probe(record, "ok-2", 4),
    ]
    cancel = engine.pool.cancel_job  # what Engine.cancel does to a running job's calls
    timer = threading.Timer(1.0, cancel, args=("cancelled",))
    timer.start()
    began = time.monotonic()
    results = call_all(engine, calls)
    timer.join()

    assert results[0].error_type == "Cancelled", results[0]
    assert results[1].error_type == "TimeoutError", results[1]
    assert "batch" in (results[1].error or "")
    assert [results[2].ok, results[3].ok] == [True, True]
    assert [results[2].outputs["doubled"], results[3].outputs["doubled"]] == [6, 8]  # type: ignore[index]
    assert results[2].outputs["pid"] == results[3].outputs["pid"]  # type: ignore[index]
    assert (results[2].outputs["pid"], 2) in passes(record)  # type: ignore[index]  # the two finished ones joined
    assert time.monotonic() - began < 25  # nobody waited for the 30 s sleepers
    # the worker left busy with abandoned calls was stopped; the pool serves the next call
    after = engine.call(probe(record, "after", 5))
    assert after.ok and after.outputs == {"doubled": 10, "pid": after.outputs["pid"]}  # type: ignore[index]


@pytest.mark.parametrize("engine", [{"device_slots": {"cpu": 1}}], indirect=True)
def test_a_call_cancelled_while_its_batch_waits_for_the_device_ends_alone(engine: Engine, tmp_path: Path) -> None:
    record = tmp_path / "passes.txt"
    running: dict[str, CallResult] = {}
    holder = threading.Thread(
        target=lambda: running.setdefault("r", engine.call(probe(record, "holder", 1, hold_s=2.5)))
    )
    holder.start()
    deadline = time.monotonic() + 60
    while not record.exists():  # the holder's pass has begun: it holds the only CPU slot
        assert time.monotonic() < deadline
        time.sleep(0.05)
    threading.Timer(0.5, engine.pool.cancel_job, args=("queued",)).start()
    queued = engine.call(probe(record, "queued", 2, hold_s=4))

    assert queued.error_type == "Cancelled", queued
    assert holder.is_alive()  # it ended while the batch ahead of it still ran
    holder.join(60)
    assert running["r"].ok and running["r"].outputs["doubled"] == 2  # type: ignore[index]
    assert len(passes(record)) == 1  # the cancelled call never reached a worker


def test_a_worker_crash_in_a_batch_fails_only_the_poisoned_job(engine: Engine, tmp_path: Path) -> None:
    record = tmp_path / "passes.txt"
    engine.call(probe(record, "warm", 0))
    record.unlink()
    results = call_all(
        engine, [probe(record, "ok-1", 1), probe(record, "poisoned", 2, crash=True), probe(record, "ok-2", 3)]
    )

    assert [results[0].ok, results[2].ok] == [True, True], [r.error for r in results]
    assert [results[0].outputs["doubled"], results[2].outputs["doubled"]] == [2, 6]  # type: ignore[index]
    assert results[1].error_type == "WorkerCrashed", results[1]
    joined = passes(record)
    first_joined = next(i for i, (_pid, groups) in enumerate(joined) if groups > 1)  # it crashed in a joined pass
    retried = joined[first_joined + 1 :]
    assert len(retried) >= 2 and all(groups == 1 for _pid, groups in retried), joined  # then each went alone


def test_a_call_over_its_memory_in_a_batch_fails_alone(engine: Engine, tmp_path: Path) -> None:
    record = tmp_path / "passes.txt"
    engine.call(probe(record, "warm", 0))
    calls = [probe(record, f"ok-{i}", i) for i in range(3)]
    calls[1] = probe(record, "hog", 1, allocate_mb=4096)
    for call in calls:
        call.memory_limit_mb = 256  # the batch may take 3 x 256 MB; the hog wants 4 GB
    results = call_all(engine, calls)

    assert results[1].error_type == "MemoryError", results[1]
    assert [results[0].ok, results[2].ok] == [True, True], [r.error for r in results]
    assert [results[0].outputs["doubled"], results[2].outputs["doubled"]] == [0, 4]  # type: ignore[index]
    assert engine.call(probe(record, "after", 5)).ok  # the pool serves on (the worker was replaced)


def test_a_failing_input_in_a_joined_pass_fails_only_its_call(engine: Engine, tmp_path: Path) -> None:
    record = tmp_path / "passes.txt"
    results = call_all(engine, [probe(record, "ok", 1), probe(record, "bad", 2, fail=True), probe(record, "ok2", 3)])
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].error_type == "ValueError"


@pytest.mark.parametrize(
    "engine",
    [
        {
            "reuse_outputs": False,  # the pose stage makes its own model pass (no reuse of detection's)
            "batch_waits_ms": {"forgesyte-yolo-tracker.detect_players": 2000, "pose-estimator.estimate_poses": 2000},
        }
    ],
    indirect=True,
)
def test_batched_vision_calls_are_byte_identical_to_calls_alone(engine: Engine) -> None:
    from forgeflow.cli.sample_clip import assets_dir

    assets = assets_dir()
    engine.settings.media_input_roots.append(assets)
    images = [str(assets / name) for name in ("bus.jpg", "zidane.jpg", "bus.jpg", "zidane.jpg")]
    detect = {"plugin": "forgesyte-yolo-tracker", "tool": "detect_players", "config": {"device": "cpu", "imgsz": 320}}
    pose = {"plugin": "pose-estimator", "tool": "estimate_poses", "config": {"device": "cpu", "imgsz": 320}}

    def stage(spec: dict[str, Any], job: str, inputs: dict[str, Any]) -> ToolCall:
        return ToolCall(**spec, inputs=inputs, job_id=job, stage_index=0, timeout_s=120)

    def outputs(result: CallResult) -> dict[str, Any]:
        assert result.ok and result.outputs is not None, result.error
        return result.outputs

    alone_players = [outputs(engine.call(stage(detect, f"alone-{i}", {"media": m}))) for i, m in enumerate(images[:2])]
    alone_poses = [
        outputs(engine.call(stage(pose, f"alone-{i}", {"media": images[i], **alone_players[i]}))) for i in range(2)
    ]
    before = engine.runner.status()
    players = [
        outputs(r) for r in call_all(engine, [stage(detect, f"job-{i}", {"media": m}) for i, m in enumerate(images)])
    ]
    poses = [
        outputs(r)
        for r in call_all(engine, [stage(pose, f"job-{i}", {"media": images[i], **players[i]}) for i in range(4)])
    ]
    after = engine.runner.status()

    for i in range(4):  # the artifacts are content-addressed: equal refs are equal bytes
        assert canonical_bytes(players[i]) == canonical_bytes(alone_players[i % 2])
        assert canonical_bytes(poses[i]) == canonical_bytes(alone_poses[i % 2])
    # 8 calls ran in fewer batches than calls: the jobs' calls were joined
    assert after["batched_calls"] - before["batched_calls"] == 8
    assert after["batches"] - before["batches"] < 8


def test_batch_limits_come_from_the_tool_then_the_host_per_tool(monkeypatch: pytest.MonkeyPatch) -> None:
    from forgeflow.engine.batching import BatchLimits, batch_limits
    from forgeflow.plugins.builtin.pose_estimator import plugin as pose
    from forgeflow_testplugins.testkit import plugin as testkit

    probe_tool, pose_tool = testkit.tools["batch_probe"], pose.tools["estimate_poses"]
    assert batch_limits(Settings(), "testkit", probe_tool) == BatchLimits(8, 200.0)  # the tool's BatchSpec
    assert batch_limits(Settings(), "pose-estimator", pose_tool) == BatchLimits(8, 10.0)  # the host's defaults
    monkeypatch.setenv("FORGEFLOW_BATCH_SIZES", "testkit.batch_probe=3,pose-estimator.estimate_poses=1")
    monkeypatch.setenv("FORGEFLOW_BATCH_WAITS_MS", '{"testkit.batch_probe": 5}')
    assert batch_limits(Settings(), "testkit", probe_tool) == BatchLimits(3, 5.0)
    assert batch_limits(Settings(), "pose-estimator", pose_tool) is None  # a size of 1: never batched
    assert batch_limits(Settings(batching=False), "testkit", probe_tool) is None
    assert batch_limits(Settings(), "testkit", testkit.tools["sleep"]) is None  # not batchable


def test_plugins_say_which_tools_take_batches() -> None:
    from forgeflow.plugins.registry import PluginRegistry

    registry = PluginRegistry.discover()
    tools = {t["name"]: t for t in registry.describe("testkit")["tools"]}
    assert tools["batch_probe"]["batch"] == {"max_batch": 8, "max_wait_ms": 200.0}
    assert tools["sleep"]["batch"] is None
    poses = {t["name"]: t for t in registry.describe("pose")["tools"]}
    assert poses["estimate_poses"]["batch"] == {"max_batch": None, "max_wait_ms": None}
