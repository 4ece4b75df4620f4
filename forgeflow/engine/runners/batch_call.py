"""The runner's side of a batch: several jobs' calls of one batchable tool in one warm worker.

:func:`run_batch` takes :class:`BatchPart` objects (a call and where its progress goes), all of
one plugin, tool and config, sends them to one worker of the :class:`~.process.ProcessRunner`'s
pool as one ``batch`` message (see :mod:`.worker_batch`) and resolves each part as its own answer
comes. Isolation stays per job:

* **cancel and timeout**: each part has its own deadline (its ``timeout_s``, pushed on by its own
  progress, up to the host's cap) and is answered ``Cancelled`` or ``TimeoutError`` alone, at once;
  the worker goes on with the others and what it later says of that part is dropped. When no part
  is left waiting, a worker still busy is killed (nobody wants its work);
* **memory**: the batch runs under the sum of its calls' limits (each job brings its own budget),
  enforced by the worker's ``RLIMIT_AS`` and the runner's resident-memory watchdog;
* **crashes**: a worker that dies, breaks the protocol or blows the batch's memory limit fails no
  job by itself: each part still unanswered is **retried alone, once**, as an ordinary call in a
  fresh worker. A poisoned input then fails only its own job (with the error of its own call),
  and the innocent ones cost one more model pass each. Failing them all instead would let one
  job's bad input fail every job that happened to share its batch.

Progress and stage events stay per job: each part's progress goes to its own callback.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from forgeflow.canonical import JsonObject
from forgeflow.engine.runners import LifecycleRecorder, Prepared, prepare, progress_relay, result_from_message
from forgeflow.engine.runners.base import CallResult, ProgressCallback, ToolCall
from forgeflow.engine.runners.call_exchange import MemoryExceeded, RssWatchdog
from forgeflow.engine.runners.protocol import DeadlineExceeded, PeerClosed, ProtocolError, int_field
from forgeflow.engine.runners.worker_process import Worker
from forgeflow.pipeline.outcome import EndReason
from forgeflow.plugins.errors import StageTimeout

if TYPE_CHECKING:
    from forgeflow.plugins.registry import PluginRegistry
    from forgeflow.settings import Settings

__all__ = ["BatchPart", "WorkerPool", "run_batch"]

log = logging.getLogger("forgeflow.runners.batch")

#: How often the batch's parts are checked for a cancel or a passed deadline.
CHECK_PERIOD_S = 0.05


@dataclass(eq=False)
class BatchPart:
    """One job's call in a batch, and its answer once it has one."""

    call: ToolCall
    on_progress: ProgressCallback | None = None
    result: CallResult | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def resolve(self, result: CallResult) -> bool:
        """Answer the part (the first answer wins); False when it had one already."""
        if self.done.is_set():
            return False
        self.result = result
        self.done.set()
        return True


class WorkerPool(Protocol):
    """What a batch needs of the runner whose worker it borrows: the
    :class:`~.process.ProcessRunner` (and the Docker runner, its subclass). Named here as a protocol
    because the runner imports this module."""

    settings: Settings
    registry: PluginRegistry
    lifecycle: LifecycleRecorder

    def run(self, call: ToolCall, on_progress: ProgressCallback | None = None) -> CallResult: ...

    def is_cancelled(self, job_id: str | None) -> bool: ...

    def _worker_key(self, prepared: Prepared, call: ToolCall) -> object: ...

    def _acquire(
        self, plugin: str, job_id: str | None, key: object = None
    ) -> tuple[Worker | None, CallResult | None]: ...

    def _release(self, worker: Worker) -> None: ...

    def _discard(self, worker: Worker) -> None: ...


def run_batch(runner: WorkerPool, parts: list[BatchPart], max_wait_ms: float) -> None:
    """Run ``parts`` (one plugin, tool and config) as one batch in one worker of ``runner``; every
    part is resolved when this returns. Never raises."""
    try:
        _run_batch(runner, parts, max_wait_ms)
    except Exception as exc:  # a bug here must still answer every job
        log.exception("batch of %d calls failed in the runner", len(parts))
        for part in parts:
            part.resolve(CallResult.failure("RunnerError", f"batch runner error: {type(exc).__name__}: {exc}"))


def _run_batch(runner: WorkerPool, parts: list[BatchPart], max_wait_ms: float) -> None:
    live: list[tuple[BatchPart, Prepared]] = []
    for part in parts:
        prepared = prepare(runner.registry, part.call)
        if isinstance(prepared, CallResult):
            part.resolve(prepared)
        else:
            live.append((part, prepared))
    if len(live) <= 1:
        for part, _prepared in live:
            part.resolve(runner.run(part.call, part.on_progress))
        return
    prepared = live[0][1]
    plugin = prepared.plugin
    worker, failure = runner._acquire(plugin, None, runner._worker_key(prepared, live[0][0].call))
    if failure is not None:
        for part, _prepared in live:
            part.resolve(failure)
        runner.lifecycle.finished(plugin, failure)
        return
    assert isinstance(worker, Worker)
    runner.lifecycle.running(plugin)
    retry, reusable = _drive(runner, worker, [part for part, _ in live], prepared, max_wait_ms)
    if reusable:
        runner._release(worker)
    else:
        runner._discard(worker)
    _retry_alone(runner, retry)


def _drive(
    runner: WorkerPool, worker: Worker, parts: list[BatchPart], prepared: Prepared, max_wait_ms: float
) -> tuple[list[BatchPart], bool]:
    """Send the batch and answer its parts; the parts to retry alone and whether the worker may serve again."""
    label = f"{prepared.plugin}.{prepared.tool.name}"
    settings = runner.settings
    limits = [int(p.call.memory_limit_mb or settings.stage_memory_limit_mb) for p in parts]
    request: JsonObject = {
        "type": "batch",
        "tool": prepared.tool.name,
        "config": parts[0].call.config,
        "max_wait_ms": max_wait_ms,
        "memory_limit_mb": sum(limits),
        "items": [
            {
                "inputs": p.call.inputs,
                "memory_limit_mb": limit,
                "job_id": p.call.job_id,
                "stage_index": p.call.stage_index,
                "artifact_budget_bytes": p.call.artifact_budget_bytes,
                "checkpoint_key": p.call.checkpoint_key,
                "resume": p.call.resume,
            }
            for p, limit in zip(parts, limits, strict=True)
        ],
    }
    watchdog = RssWatchdog(worker, sum(limits))
    start = time.monotonic()
    caps = [start + max(p.call.timeout_s, settings.max_stage_timeout_s) for p in parts]
    deadlines = [start + p.call.timeout_s for p in parts]
    furthest = [-1.0] * len(parts)
    relays = [progress_relay(p.on_progress) for p in parts]
    answered = [False] * len(parts)  # the worker's own result for the part came
    worker.calls += 1
    recycle = False
    try:
        worker.send(request)
        while not all(answered):
            now = time.monotonic()
            for index, part in enumerate(parts):
                if part.done.is_set():
                    continue
                if runner.is_cancelled(part.call.job_id):
                    part.resolve(CallResult.failure(EndReason.CANCELLED, "cancelled by request"))
                elif now >= deadlines[index]:
                    part.resolve(
                        CallResult.failure(
                            StageTimeout,
                            f"{label} timed out after {part.call.timeout_s:g} s (its call was one of a batch of "
                            f"{len(parts)}; the others went on)",
                            duration_ms=(now - start) * 1000.0,
                        )
                    )
            if all(part.done.is_set() for part in parts):
                # every job has its answer; what the worker still does is for nobody
                worker.kill()
                return [], False
            if worker.watch_memory:
                watchdog.check()
            try:
                message = worker.reader.read(time.monotonic() + CHECK_PERIOD_S)
            except DeadlineExceeded:
                continue
            item = message.get("item")
            if not isinstance(item, int) or not 0 <= item < len(parts):
                raise ProtocolError(f"a batch answer names no item of the batch: {message.get('type')!r}")
            index = item
            part = parts[index]
            if message.get("type") == "progress":
                done = message.get("done")
                if isinstance(done, (int, float)) and done > furthest[index]:
                    furthest[index] = float(done)
                    deadlines[index] = min(time.monotonic() + part.call.timeout_s, caps[index])
                relay = relays[index]
                if relay is not None and not part.done.is_set():
                    relay(message)
                continue
            if message.get("type") != "result":
                raise ProtocolError(f"unexpected {message.get('type')!r} message in a batch")
            answered[index] = True
            worker.loads = int_field(message, "resource_loads") or worker.loads
            recycle = recycle or bool(message.get("recycle"))
            result = result_from_message(message)
            if result.peak_memory_mb is None and watchdog.peak_rss:
                result.peak_memory_mb = round(watchdog.peak_rss / 2**20, 1)
            if part.resolve(result):
                runner.lifecycle.finished(prepared.plugin, result)
    except (MemoryExceeded, PeerClosed, BrokenPipeError, ConnectionError, ProtocolError, OSError) as exc:
        worker.kill()
        left = [part for part in parts if not part.done.is_set()]
        if left:
            log.warning(
                "%s: the worker of a batch of %d ended (%s: %s): retrying the %d unanswered call(s) alone",
                label,
                len(parts),
                type(exc).__name__,
                exc,
                len(left),
            )
        return left, False
    if recycle:  # the worker leaves by itself after a MemoryError; make sure of it
        worker.wait_exit(2.0)
        worker.kill()
    return [], not recycle


def _retry_alone(runner: WorkerPool, parts: list[BatchPart]) -> None:
    """Each part as an ordinary call of its own (a fresh worker, its own timeout), all at once."""
    if not parts:
        return

    def retry(part: BatchPart) -> None:
        if runner.is_cancelled(part.call.job_id):
            part.resolve(CallResult.failure(EndReason.CANCELLED, "cancelled by request"))
            return
        part.resolve(runner.run(part.call, part.on_progress))

    threads = [threading.Thread(target=retry, args=(part,), name="batch-retry", daemon=True) for part in parts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
