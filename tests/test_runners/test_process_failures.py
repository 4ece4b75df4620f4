"""The process runner against plugins that misbehave: each failure is typed, and the next call to a
healthy tool still works."""

from __future__ import annotations

import time

import pytest

from ._helpers import call, group_gone, pid_alive


def healthy_pid(runner) -> int:
    result = runner.run(call("pid"))
    assert result.ok, result
    return result.outputs["pid"]


def test_plugin_exception_is_typed_with_traceback_and_worker_survives(runner):
    first = healthy_pid(runner)
    result = runner.run(call("fail", config={"message": "kaboom", "error": "RuntimeError"}))
    assert not result.ok
    assert result.error_type == "RuntimeError"
    assert result.error == "kaboom"
    assert "RuntimeError: kaboom" in result.traceback
    assert "testkit.py" in result.traceback
    value_error = runner.run(call("fail", config={"error": "ValueError"}))
    assert value_error.error_type == "ValueError"
    # An exception does not cost the warm worker.
    assert healthy_pid(runner) == first


def test_hang_is_killed_within_timeout_and_group_is_gone(runner):
    worker_pid = healthy_pid(runner)
    started = time.monotonic()
    result = runner.run(call("hang", timeout_s=1.0))
    elapsed = time.monotonic() - started
    assert not result.ok
    assert result.error_type == "TimeoutError"
    assert "timed out after 1 s" in result.error
    assert 1.0 <= elapsed < 1.0 + 1.0, elapsed
    assert 1000 <= result.duration_ms < 2000
    assert group_gone(worker_pid), "the worker's process group outlived the timeout"
    assert not pid_alive(worker_pid)
    assert healthy_pid(runner) != worker_pid  # replaced by a fresh worker


def test_allocation_past_limit_is_memory_error_and_worker_recycled(runner):
    worker_pid = healthy_pid(runner)
    result = runner.run(call("allocate", config={"megabytes": 2048}, memory_limit_mb=128, timeout_s=30))
    assert not result.ok
    assert result.error_type == "MemoryError"
    assert "memory limit of 128 MB" in result.error
    assert group_gone(worker_pid)
    assert healthy_pid(runner) != worker_pid


def test_allocation_within_limit_succeeds_and_reports_peak(runner):
    result = runner.run(call("allocate", config={"megabytes": 64}, memory_limit_mb=256))
    assert result.ok, result
    assert result.outputs == {"allocated_mb": 64}
    assert result.peak_memory_mb is not None and result.peak_memory_mb >= 64


def test_rss_watchdog_enforces_limit_where_rlimit_is_off(make_runner, monkeypatch):
    """Hosts with an NVIDIA driver run without RLIMIT_AS: the parent's RSS watchdog is the limit."""
    monkeypatch.setenv("FORGEFLOW_WORKER_RLIMIT_AS", "off")
    runner = make_runner("process")
    worker_pid = healthy_pid(runner)
    result = runner.run(call("allocate", config={"megabytes": 4096}, memory_limit_mb=192, timeout_s=30))
    assert not result.ok
    assert result.error_type == "MemoryError"
    assert "memory limit of 192 MB" in result.error and "resident memory" in result.error
    assert group_gone(worker_pid)
    assert healthy_pid(runner) != worker_pid


def test_segfault_is_worker_crashed_with_signal_and_log_tail(runner):
    worker_pid = healthy_pid(runner)
    result = runner.run(call("segfault"))
    assert not result.ok
    assert result.error_type == "WorkerCrashed"
    assert "died with SIGSEGV (signal 11)" in result.error
    assert "Segmentation fault" in result.error  # faulthandler's dump, from the worker log
    assert "testkit.py" in result.error
    assert healthy_pid(runner) != worker_pid


def test_os_exit_is_worker_crashed_with_exit_code(runner):
    result = runner.run(call("hard_exit", config={"code": 7}))
    assert not result.ok
    assert result.error_type == "WorkerCrashed"
    assert "exited with code 7" in result.error
    assert runner.run(call("noop")).ok


def test_stdout_spam_never_corrupts_the_protocol(runner, settings):
    worker_pid = healthy_pid(runner)
    result = runner.run(call("spam_stdout", config={"lines": 5000}))
    assert result.ok, result
    assert result.outputs == {"lines": 5000}
    assert healthy_pid(runner) == worker_pid  # same worker, protocol still in sync
    log = (settings.logs_dir / "workers" / "testkit.log").read_text(errors="replace")
    assert "spam line 4999" in log and "raw bytes on fd 1" in log


def test_invalid_output_is_output_error(runner):
    result = runner.run(call("bad_output"))
    assert result.error_type == "OutputError"
    assert "value" in result.error
    assert runner.run(call("noop")).ok


@pytest.mark.parametrize(
    "tool,config,kw,error_type",
    [
        ("hang", {}, {"timeout_s": 0.5}, "TimeoutError"),
        ("allocate", {"megabytes": 1024}, {"memory_limit_mb": 64}, "MemoryError"),
        ("segfault", {}, {}, "WorkerCrashed"),
    ],
)
def test_fresh_mode_failures_then_healthy_call(make_runner, tool, config, kw, error_type):
    runner = make_runner("process", reuse_workers=False)
    assert runner.run(call(tool, config=config, **kw)).error_type == error_type
    assert runner.run(call("noop")).ok
    assert runner.worker_pids() == []
