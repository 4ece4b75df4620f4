"""The process runner's normal operation: warm reuse, fresh mode, lifecycle, validation,
concurrency, start-up limits, and entry-point discovery of the installed test plugin package."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from importlib.metadata import distribution

import pytest

from forgeflow.engine.runners import get_runner
from forgeflow.plugins.lifecycle import LifecycleState, LifecycleStore
from forgeflow.plugins.registry import PluginRegistry

from ._helpers import call, group_gone


def test_get_runner_picks_by_settings(settings, registry):
    from forgeflow.engine.runners.inline import InlineRunner
    from forgeflow.engine.runners.process import ProcessRunner

    assert settings.runner == "process"
    runner = get_runner(settings, registry)  # a RunnerSet: calls that name no runner go to settings.runner
    try:
        assert runner.name == "process" and runner.runners() == {}  # created on first use
        assert runner.run(call("pid")).outputs["pid"] != os.getpid()
        assert list(runner.runners()) == ["process"]
        assert isinstance(runner.runner(), ProcessRunner)
    finally:
        runner.close()
    inline = get_runner(settings.model_copy(update={"runner": "inline"}), registry)
    assert inline.name == "inline" and inline.run(call("pid")).outputs["pid"] == os.getpid()
    assert isinstance(inline.runner(), InlineRunner)


def test_warm_worker_is_reused_across_calls(runner):
    pids = {runner.run(call("pid")).outputs["pid"] for _ in range(3)}
    assert len(pids) == 1
    (pid,) = pids
    assert pid != os.getpid()
    assert runner.worker_pids("testkit") == [pid]
    runner.close()
    assert group_gone(pid)


def test_fresh_mode_uses_a_new_process_per_call(make_runner):
    runner = make_runner("process", reuse_workers=False)
    pids = [runner.run(call("pid")).outputs["pid"] for _ in range(2)]
    assert pids[0] != pids[1]
    assert runner.worker_pids() == []
    assert all(group_gone(p, within_s=3) for p in pids)  # reaped in the background


def test_a_cancel_that_kills_the_worker_as_its_call_is_sent_ends_the_call_cancelled(runner, monkeypatch):
    """The race a loaded host met: the cancel sees the worker serving the job and kills it just
    before the call is written to it. The call ends ``Cancelled``, not a runner error."""
    from forgeflow.engine.runners.worker_process import Worker

    send = Worker.send

    def cancelled_first(self: Worker, message: dict) -> None:
        runner.cancel_job("racing")
        send(self, message)

    monkeypatch.setattr(Worker, "send", cancelled_first)
    result = runner.run(call("sleep", config={"seconds": 30}, job_id="racing"))
    assert (result.ok, result.error_type, result.error) == (False, "Cancelled", "cancelled by request")
    monkeypatch.undo()
    runner.forget_job("racing")
    assert runner.run(call("noop", job_id="next")).ok  # the pool serves on with a new worker


def test_result_fields(runner):
    result = runner.run(call("numbers", config={"start": 5}, inputs={"count": 3}))
    assert result.ok
    assert result.outputs == {"numbers": [5, 6, 7]}
    assert result.result_size_bytes == len(b'{"numbers":[5,6,7]}')
    assert result.duration_ms > 0
    assert result.peak_memory_mb is not None and result.peak_memory_mb > 5
    assert result.error is None and result.error_type is None


def test_alias_resolves_to_the_plugin(runner):
    assert runner.run(call("noop", plugin="tk")).ok


def test_lifecycle_transitions_and_recovery(runner, registry, ff_home):
    other_process_view = LifecycleStore(ff_home / "plugins.sqlite")  # what the API would read
    assert registry.status("testkit").state == LifecycleState.LOADED

    assert runner.run(call("noop")).ok
    status = other_process_view.get("testkit")
    assert status.state == LifecycleState.INITIALIZED
    assert (status.calls, status.failures) == (1, 0)

    seen: list[LifecycleState] = []
    worker = threading.Thread(target=lambda: runner.run(call("sleep", config={"seconds": 0.6})))
    worker.start()
    deadline = time.monotonic() + 3
    while worker.is_alive() and time.monotonic() < deadline:
        seen.append(other_process_view.get("testkit").state)
        time.sleep(0.05)
    worker.join()
    assert LifecycleState.RUNNING in seen

    failed = runner.run(call("fail", config={"message": "lifecycle boom"}))
    assert failed.error_type == "RuntimeError"
    status = other_process_view.get("testkit")
    assert status.state == LifecycleState.FAILED
    assert status.last_error == "lifecycle boom" and status.last_error_type == "RuntimeError"
    assert (status.calls, status.failures) == (3, 1)

    assert runner.run(call("noop")).ok  # recovery
    status = other_process_view.get("testkit")
    assert status.state == LifecycleState.INITIALIZED
    assert (status.calls, status.failures) == (4, 1)
    assert status.last_duration_ms is not None


def test_crash_marks_failed_then_fresh_worker_recovers(runner, registry):
    assert runner.run(call("segfault")).error_type == "WorkerCrashed"
    assert registry.status("testkit").state == LifecycleState.FAILED
    assert registry.status("testkit").last_error_type == "WorkerCrashed"
    assert runner.run(call("noop")).ok
    assert registry.status("testkit").state == LifecycleState.INITIALIZED


@pytest.mark.parametrize(
    "plugin,tool,config,inputs,error_type,needles",
    [
        ("nosuch", "noop", {}, {}, "UnknownPlugin", ["nosuch", "testkit"]),
        ("testkit", "nop", {}, {}, "UnknownTool", ["testkit", "nop", "did you mean 'noop'"]),
        ("testkit", "numbers", {"start": "zero"}, {"count": 2}, "ConfigError", ["testkit.numbers", "start"]),
        ("testkit", "numbers", {}, {"count": "many"}, "InputError", ["testkit.numbers", "count"]),
        ("testkit", "numbers", {}, {}, "InputError", ["count", "Field required"]),
        ("testkit", "scale", {"factor": [1]}, {"numbers": [1]}, "ConfigError", ["factor"]),
        ("needs-weights", "detect", {}, {}, "PluginUnavailable", ["needs-weights", "weights file not found"]),
        ("broken-import", "anything", {}, {}, "PluginUnavailable", ["broken-import", "failed to import"]),
    ],
)
def test_bad_calls_are_typed_and_start_nothing(runner, registry, plugin, tool, config, inputs, error_type, needles):
    result = runner.run(call(tool, plugin=plugin, config=config, inputs=inputs))
    assert not result.ok
    assert result.error_type == error_type
    for needle in needles:
        assert needle in result.error, (needle, result.error)
    assert runner.worker_pids() == []
    # A caller's mistake is not the plugin's failure.
    if plugin == "testkit":
        assert registry.status("testkit").state == LifecycleState.LOADED
    if plugin in ("needs-weights", "broken-import"):
        assert registry.status(plugin).state == LifecycleState.UNAVAILABLE


def test_two_threads_call_at_once(runner):
    results: list = [None, None]

    def work(i: int) -> None:
        results[i] = runner.run(call("sleep", config={"seconds": 0.5}))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(r is not None and r.ok for r in results), results
    assert len(runner.worker_pids("testkit")) == 2  # one worker per concurrent call, both kept warm
    # ... and both are used again afterwards.
    again = [runner.run(call("pid")).outputs["pid"] for _ in range(2)]
    assert set(again) <= set(runner.worker_pids("testkit"))


def test_many_concurrent_calls_share_the_pool(runner):
    results = []
    lock = threading.Lock()

    def work() -> None:
        for n in range(5):
            r = runner.run(call("numbers", inputs={"count": n}))
            with lock:
                results.append((n, r))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 15
    assert all(r.ok and r.outputs == {"numbers": list(range(n))} for n, r in results)
    assert len(runner.worker_pids("testkit")) <= 2  # idle pool is bounded


def test_worker_startup_budget(make_runner):
    runner = make_runner("process", worker_startup_timeout_s=0.001)
    result = runner.run(call("noop"))
    assert result.error_type == "TimeoutError"
    assert "worker_startup_timeout_s" in result.error
    assert runner.worker_pids() == []


def test_media_through_the_worker_context(runner, settings, tmp_path):
    import cv2
    import numpy as np

    from forgeflow.plugins import MediaStore

    image = tmp_path / "frame.png"
    cv2.imwrite(str(image), np.zeros((24, 32, 3), dtype=np.uint8))
    ref = MediaStore(settings.media_root).put_file(image).ref
    result = runner.run(call("probe_media", inputs={"media": ref}))
    assert result.ok, result
    assert result.outputs == {"media_kind": "image", "frame_count": 1, "width": 32, "height": 24}
    outside = runner.run(call("probe_media", inputs={"media": str(image)}))
    assert outside.error_type == "MediaError"
    assert "outside the allowed media roots" in outside.error


def test_worker_dies_with_its_parent(ff_home, tmp_path):
    """PR_SET_PDEATHSIG: a runner process killed with SIGKILL takes its warm workers with it."""
    script = textwrap.dedent(
        """
        import os, signal
        from forgeflow.settings import get_settings
        from forgeflow.plugins.registry import PluginRegistry
        from forgeflow.engine.runners import get_runner, ToolCall
        runner = get_runner(get_settings(), PluginRegistry.discover())
        print(runner.run(ToolCall(plugin="testkit", tool="pid")).outputs["pid"], flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    worker_pid = int(out.stdout.strip())
    assert group_gone(worker_pid, within_s=3), "the worker outlived its parent"


def test_entry_point_discovery_of_installed_test_package():
    dist = distribution("forgeflow-testplugins")
    eps = {ep.name: ep.value for ep in dist.entry_points if ep.group == "forgeflow.plugins"}
    assert eps["testkit"] == "forgeflow_testplugins.testkit:plugin"
    registry = PluginRegistry.discover()
    entry = registry.resolve("tk")
    assert entry.name == "testkit" and entry.available
    assert entry.entry_point == "forgeflow_testplugins.testkit:plugin"
    assert {"noop", "pid", "fail", "hang", "allocate", "segfault", "hard_exit", "spam_stdout"} <= set(
        entry.plugin.tools
    )
    assert not registry.resolve("broken-import").available
    assert not registry.resolve("needs-weights").available


def test_worker_loads_only_installed_entry_points():
    from forgeflow.engine.runners.worker import load_plugin

    plugin, reason = load_plugin("testkit")
    assert plugin is not None and plugin.name == "testkit" and reason is None
    plugin, reason = load_plugin("/tmp/evil.py")
    assert plugin is None and "no installed plugin" in reason
    plugin, reason = load_plugin("needs-weights")
    assert plugin is None and "weights file not found" in reason


def test_unavailable_inside_worker_is_plugin_unavailable(settings, ff_home, monkeypatch):
    """A plugin available to the parent's registry but not to the worker (a race or a different
    environment) comes back as PluginUnavailable, not as a crash."""
    from forgeflow.engine.runners.process import ProcessRunner
    from forgeflow.plugins.registry import PluginEntry

    real = PluginRegistry.discover()
    entry = real.resolve("needs-weights")
    # Pretend the parent thinks the plugin is fine.
    fake = PluginRegistry([PluginEntry(entry.name, entry.entry_point, entry.plugin, None, ())])
    runner = ProcessRunner(settings, fake)
    try:
        result = runner.run(call("detect", plugin="needs-weights"))
    finally:
        runner.close()
    assert result.error_type == "PluginUnavailable"
    assert "weights file not found" in result.error
