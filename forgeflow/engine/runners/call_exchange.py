"""One call's exchange with its worker, and the limits enforced while it runs.

:func:`exchange` sends a ``call`` message to a warm worker and reads until its ``result``, relaying
``progress`` on the way. It is where a call's isolation is enforced from the parent's side:

* **timeout**: the protocol pipe is read with a deadline; the timeout is the longest a call may go
  without progress (a tool that reports more frames done runs on, up to the host's
  ``max_stage_timeout_s``). When it passes, the worker's group is killed: ``TimeoutError``;
* **memory**: :class:`RssWatchdog` samples the resident memory of the worker and its children every
  :data:`WATCHDOG_PERIOD_S` and stops the call when it grew by more than the limit
  (``MemoryError``);
* **crashes**: EOF or a broken protocol is diagnosed by :func:`crash_result` (the signal or exit
  code, an out-of-memory kill, ``std::bad_alloc`` in native code, the worker log's tail).

The answer is the call's result and whether the worker may serve another call.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from forgeflow.canonical import JsonObject
from forgeflow.engine.runners import Prepared, progress_relay, result_from_message
from forgeflow.engine.runners.base import CallResult, ProgressCallback, ToolCall
from forgeflow.engine.runners.protocol import DeadlineExceeded, PeerClosed, ProtocolError, int_field
from forgeflow.engine.runners.worker_log import LOG_TAIL_BYTES, file_size, read_log_tail
from forgeflow.engine.runners.worker_process import Worker
from forgeflow.pipeline.outcome import EndReason
from forgeflow.plugins.errors import StageMemoryExceeded, StageTimeout, WorkerCrashed

__all__ = ["WATCHDOG_PERIOD_S", "CallLimits", "MemoryExceeded", "RssWatchdog", "crash_result", "exchange"]

#: Resident-memory watchdog period.
WATCHDOG_PERIOD_S = 0.05


class MemoryExceeded(Exception):
    """The watchdog saw the worker's group past its limit (``rss_bytes`` resident)."""

    def __init__(self, rss_bytes: int) -> None:
        super().__init__(rss_bytes)
        self.rss_bytes = rss_bytes


class RssWatchdog:
    """A worker's resident memory against a limit of ``limit_mb`` above what it held when the call
    began; :meth:`check` raises :class:`MemoryExceeded` past it and keeps the peak it saw."""

    def __init__(self, worker: Worker, limit_mb: int) -> None:
        self.worker = worker
        baseline = worker.group_rss() if worker.watch_memory else 0
        self.limit_bytes = baseline + limit_mb * 2**20
        self.peak_rss = baseline

    def check(self) -> None:
        rss = self.worker.group_rss()
        self.peak_rss = max(self.peak_rss, rss)
        if rss > self.limit_bytes:
            raise MemoryExceeded(rss)


@dataclass(frozen=True)
class CallLimits:
    """What bounds one call: its memory limit, its timeout and the host's cap on any stage."""

    memory_limit_mb: int
    timeout_s: float
    max_stage_timeout_s: float


def exchange(
    worker: Worker,
    prepared: Prepared,
    call: ToolCall,
    limits: CallLimits,
    on_progress: ProgressCallback | None,
    is_cancelled: Callable[[str | None], bool],
) -> tuple[CallResult, bool]:
    """Run ``call`` in ``worker``: its result and whether the worker may serve again (a worker that
    was killed, crashed or asked to be recycled may not)."""
    label = f"{prepared.plugin}.{prepared.tool.name}"
    limit_mb = limits.memory_limit_mb
    request: JsonObject = {
        "type": "call",
        "tool": prepared.tool.name,
        "config": call.config,
        "inputs": call.inputs,
        "memory_limit_mb": limit_mb,
        "job_id": call.job_id,
        "stage_index": call.stage_index,
        "artifact_budget_bytes": call.artifact_budget_bytes,
        "checkpoint_key": call.checkpoint_key,
        "resume": call.resume,
    }
    log_offset = file_size(worker.log_path)
    watchdog = RssWatchdog(worker, limit_mb)

    start = time.monotonic()
    # The timeout is the longest a call may go without progress: a tool that reports more frames
    # done (a long video) runs on, up to the host's cap in all; one that stalls dies on time.
    deadline = start + call.timeout_s
    cap = start + max(call.timeout_s, limits.max_stage_timeout_s)
    furthest = -1.0
    worker.calls += 1
    tick = WATCHDOG_PERIOD_S if worker.watch_memory else None
    try:
        worker.send(request)
        relay = progress_relay(on_progress)
        while True:
            message = worker.reader.read(deadline, tick=tick, on_tick=watchdog.check)
            if message.get("type") != "progress":
                break
            done = message.get("done")
            if isinstance(done, (int, float)) and done > furthest:
                furthest = float(done)
                deadline = min(time.monotonic() + call.timeout_s, cap)
            if relay is not None:
                relay(message)
    except DeadlineExceeded:
        now = time.monotonic()
        elapsed = (now - start) * 1000.0
        worker.kill()
        why = (
            f"timed out after {call.timeout_s:g} s"
            if furthest < 0
            else f"made no progress for {call.timeout_s:g} s (after {now - start:.0f} s in all)"
            if now < cap
            else f"ran into the host's cap of {limits.max_stage_timeout_s:g} s (FORGEFLOW_MAX_STAGE_TIMEOUT_S)"
        )
        return CallResult.failure(StageTimeout, f"{label} {why}; {worker.killed_what}", duration_ms=elapsed), False
    except MemoryExceeded as exc:
        elapsed = (time.monotonic() - start) * 1000.0
        worker.kill()
        return CallResult.failure(
            StageMemoryExceeded,
            f"{label} exceeded its memory limit of {limit_mb} MB (resident memory reached "
            f"{exc.rss_bytes / 2**20:.0f} MB); {worker.killed_what}",
            duration_ms=elapsed,
            peak_memory_mb=round(exc.rss_bytes / 2**20, 1),
        ), False
    except (PeerClosed, BrokenPipeError, ConnectionError, ProtocolError, OSError) as exc:
        elapsed = (time.monotonic() - start) * 1000.0
        if is_cancelled(call.job_id):
            worker.kill()
            return CallResult.failure(EndReason.CANCELLED, "cancelled by request", duration_ms=elapsed), False
        return crash_result(worker, label, limit_mb, exc, log_offset, elapsed), False
    if message.get("type") != "result":
        worker.kill()
        return CallResult.failure(
            WorkerCrashed, f"{label}: {worker.noun} sent an unexpected {message.get('type')!r} message"
        ), False
    result = result_from_message(message)
    worker.loads = int_field(message, "resource_loads") or worker.loads
    if result.peak_memory_mb is None and watchdog.peak_rss:
        result.peak_memory_mb = round(watchdog.peak_rss / 2**20, 1)
    recycle = bool(message.get("recycle"))
    if recycle:
        # The worker leaves by itself after a MemoryError; make sure of it.
        worker.wait_exit(2.0)
        worker.kill()
    return result, not recycle


def crash_result(
    worker: Worker, label: str, limit_mb: int, exc: Exception, log_offset: int, elapsed_ms: float
) -> CallResult:
    """The failure of a call whose worker closed its pipe or broke the protocol (``exc``): killed for
    memory, ``std::bad_alloc`` in native code, or a crash with its exit and the log it left."""
    broke = isinstance(exc, ProtocolError)
    rc = worker.wait_exit(worker.exit_wait_s) if not broke else None
    killed_rc = worker.kill()
    rc = rc if rc is not None else (None if broke else killed_rc)
    what = f"broke the protocol ({exc})" if broke else worker.exit_description(rc)
    tail = read_log_tail(worker.log_path, since=log_offset)
    if worker.out_of_memory():
        return CallResult.failure(
            StageMemoryExceeded,
            f"{label} exceeded its memory limit of {limit_mb} MB ({worker.noun} {what})",
            duration_ms=elapsed_ms,
        )
    if rc == -signal.SIGABRT and "std::bad_alloc" in tail:
        # Native code (C++) that cannot allocate aborts instead of raising.
        return CallResult.failure(
            StageMemoryExceeded,
            f"{label} exceeded its memory limit of {limit_mb} MB (std::bad_alloc in native code; "
            f"the plugin process aborted)\n--- worker log (last {LOG_TAIL_BYTES} bytes) ---\n{tail}",
            duration_ms=elapsed_ms,
        )
    message_text = f"{label}: {worker.noun} {what}"
    if tail:
        message_text += f"\n--- worker log (last {LOG_TAIL_BYTES} bytes) ---\n{tail}"
    return CallResult.failure(WorkerCrashed, message_text, duration_ms=elapsed_ms)
