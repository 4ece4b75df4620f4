"""Cross-job batching: the engine joins concurrent calls of a batchable tool into one worker call.

A tool declared with ``batch=BatchSpec(...)`` (:mod:`forgeflow.plugins.batching`) may be called by
many jobs at once (20 one-image jobs submitted together, say). :class:`BatchingRunner` is the
engine's runner: a batchable call joins the open batch of its **key** (runner, plugin, plugin
version, tool, validated config) or opens one, and waits for its own answer. A batch closes when it
holds ``max_batch`` calls, or when ``max_wait_ms`` has passed since it opened **and** it has a slot
of its device (calls go on joining while the device is busy: that is when batching pays). A batch
that nobody could join skips the wait: its call is the only call in flight and ``alone`` (the
engine) says its job is the host's only one, with no other process calling; a lone job would
otherwise wait ``max_wait_ms`` for nobody at each batchable stage. It then
holds **one** device slot and runs as one call of one warm worker (:mod:`.runners.batch_call`),
which answers each job's part on its own. A batch that closes with one call runs it exactly as an
unbatched call. Calls that cannot batch (tools without ``batch=``, ``FORGEFLOW_BATCHING=false``,
``max_batch`` 1, the Docker and inline runners) go straight on through admission as before.

Limits: the tool's ``BatchSpec`` fields, overridden per tool by ``FORGEFLOW_BATCH_SIZES`` /
``FORGEFLOW_BATCH_WAITS_MS`` (keys ``plugin.tool``), defaulting to ``FORGEFLOW_BATCH_MAX_SIZE`` /
``FORGEFLOW_BATCH_MAX_WAIT_MS``. A call cancelled while its batch gathers or waits for a slot leaves
it at once (answered ``Cancelled``); the rest is :mod:`.runners.batch_call`'s.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypedDict

from forgeflow.engine.admission import AdmittedRunner, Ticket, device_of
from forgeflow.engine.runners.base import CallResult, ProgressCallback, Runner, ToolCall
from forgeflow.engine.runners.batch_call import BatchPart
from forgeflow.pipeline.outcome import EndReason
from forgeflow.plugins.registry import PluginRegistry
from forgeflow.plugins.sdk import Tool
from forgeflow.settings import Settings

__all__ = ["BatchLimits", "BatchPool", "BatchingRunner", "BatchingStatus", "batch_limits"]

log = logging.getLogger("forgeflow.engine.batching")

#: How often a gathering batch looks for cancelled calls.
GATHER_TICK_S = 0.05


#: What makes calls one batch: runner, plugin, plugin version, tool, validated config (as JSON).
BatchKey = tuple[str | None, str, str | None, str, str]


class BatchPool(Runner, Protocol):
    """The pool a :class:`BatchingRunner` runs its batches on (a runner set)."""

    def takes_batches(self, kind: str | None) -> bool:
        """Whether calls to runner ``kind`` may run in batches."""
        ...

    def run_batch(self, parts: list[BatchPart], max_wait_ms: float) -> None:
        """Run the calls of ``parts`` as one worker call, answering each part."""
        ...


class BatchingStatus(TypedDict):
    """:meth:`BatchingRunner.status`: the batches run so far, and those gathering calls now."""

    batches: int
    batched_calls: int
    gathering: list[int]


@dataclass(frozen=True)
class BatchLimits:
    """How big a tool's batches get and how long a call waits for others."""

    max_batch: int
    max_wait_ms: float


def batch_limits(settings: Settings, plugin: str, tool: Tool) -> BatchLimits | None:
    """The batch limits of ``plugin``'s ``tool`` on this host, or None when its calls run alone."""
    spec = getattr(tool, "batch", None)
    if not settings.batching or spec is None:
        return None
    name = f"{plugin}.{tool.name}"
    size = settings.batch_sizes.get(name, spec.max_batch or settings.batch_max_size)
    wait = settings.batch_waits_ms.get(name, spec.max_wait_ms if spec.max_wait_ms is not None else None)
    if wait is None:
        wait = settings.batch_max_wait_ms
    return BatchLimits(int(size), float(wait)) if int(size) > 1 else None


@dataclass(eq=False)
class _Batch:
    key: BatchKey
    limits: BatchLimits
    device: str
    number: int
    #: Whether it waits ``max_wait_ms`` for more calls (not when nobody could join it).
    gathers: bool = True
    opened: float = field(default_factory=time.monotonic)
    parts: list[BatchPart] = field(default_factory=list)
    closed: bool = False


class BatchingRunner:
    """The engine's runner: batchable calls run in batches, the others through ``admitted`` as before."""

    def __init__(
        self,
        admitted: AdmittedRunner[BatchPool],
        settings: Settings,
        registry: PluginRegistry,
        alone: Callable[[ToolCall], bool] | None = None,
    ) -> None:
        """``alone(call)``: whether ``call`` comes from the only caller of the host (its only job, no
        other process calling), so that no other call could join its batch."""
        self.admitted = admitted
        self.alone = alone
        self.name = admitted.name
        self.settings = settings
        self.registry = registry
        self._cond = threading.Condition()
        self._open: dict[BatchKey, _Batch] = {}
        self._in_flight = 0  # calls in run() now
        self._numbers = itertools.count(1)
        #: Batches run so far and the calls they held (``status``).
        self.batches = 0
        self.batched_calls = 0

    def is_cancelled(self, job_id: str | None) -> bool:
        return self.admitted.is_cancelled(job_id)

    def close(self) -> None:
        self.admitted.close()

    def status(self) -> BatchingStatus:
        with self._cond:
            return {
                "batches": self.batches,
                "batched_calls": self.batched_calls,
                "gathering": [len(b.parts) for b in self._open.values()],
            }

    def run(self, call: ToolCall, on_progress: ProgressCallback | None = None) -> CallResult:
        found = self._key(call)
        if found is None:
            return self.admitted.run(call, on_progress)
        key, limits = found
        part = BatchPart(call, on_progress)
        alone = self.alone is not None and self.alone(call)
        with self._cond:
            self._in_flight += 1
            batch = self._open.get(key)
            if batch is None or batch.closed or len(batch.parts) >= limits.max_batch:
                device = device_of(call.config, self.admitted.slots.gpus)
                gathers = not (alone and self._in_flight == 1)
                batch = self._open[key] = _Batch(key, limits, device, next(self._numbers), gathers)
                threading.Thread(target=self._drive, args=(batch,), name=f"batch-{batch.number}", daemon=True).start()
            batch.parts.append(part)
            self._cond.notify_all()
        try:
            part.done.wait()
        finally:
            with self._cond:
                self._in_flight -= 1
        assert part.result is not None
        return part.result

    # -- what batches together -------------------------------------------------------------------

    def _key(self, call: ToolCall) -> tuple[BatchKey, BatchLimits] | None:
        pool = self.admitted.inner
        takes = getattr(pool, "takes_batches", None)
        if takes is None or not takes(call.runner):
            return None
        try:
            entry, tool = self.registry.tool(call.plugin, call.tool)
            config = tool.parse_config(call.config).model_dump(mode="json")
        except Exception:  # the ordinary path says what is wrong with the call
            return None
        limits = batch_limits(self.settings, entry.name, tool)
        if limits is None:
            return None
        key = (call.runner, entry.name, entry.version, tool.name, json.dumps(config, sort_keys=True))
        return key, limits

    # -- one batch ---------------------------------------------------------------------------------

    def _drop_cancelled(self, batch: _Batch) -> int:
        """Answer and remove the parts whose job was cancelled (lock held); how many are left."""
        for part in list(batch.parts):
            if self.is_cancelled(part.call.job_id):
                part.resolve(CallResult.failure(EndReason.CANCELLED, "cancelled by request"))
                batch.parts.remove(part)
        return len(batch.parts)

    def _close(self, batch: _Batch) -> list[BatchPart]:
        with self._cond:
            batch.closed = True
            if self._open.get(batch.key) is batch:
                del self._open[batch.key]
            self._drop_cancelled(batch)
            return list(batch.parts)

    def _drive(self, batch: _Batch) -> None:
        ticket: Ticket = {
            "job_id": f"batch-{batch.number}",
            "stage_index": None,
            "plugin": batch.key[1],
            "tool": batch.key[3],
        }
        slots = self.admitted.slots
        admitted = False
        try:
            deadline = batch.opened + (batch.limits.max_wait_ms / 1000.0 if batch.gathers else 0.0)
            with self._cond:
                while len(batch.parts) < batch.limits.max_batch and self._drop_cancelled(batch):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(min(remaining, GATHER_TICK_S))

            def gone() -> bool:
                with self._cond:
                    return not self._drop_cancelled(batch)

            def waits(reason: str) -> None:
                if self.admitted.on_wait is not None:
                    with self._cond:
                        calls = [p.call for p in batch.parts]
                    for call in calls:
                        self.admitted.on_wait(call, reason)

            admitted = slots.acquire(batch.device, ticket, cancelled=gone, on_wait=waits)
            parts = self._close(batch)
            if not admitted or not parts:
                return
            with self._cond:
                self.batches += 1
                self.batched_calls += len(parts)
            if len(parts) == 1:
                parts[0].resolve(self.admitted.inner.run(parts[0].call, parts[0].on_progress))
            else:
                log.info("batch %d: %d calls of %s.%s", batch.number, len(parts), batch.key[1], batch.key[3])
                self.admitted.inner.run_batch(parts, batch.limits.max_wait_ms)
        except Exception as exc:
            log.exception("batch %d failed", batch.number)
            for part in batch.parts:
                part.resolve(CallResult.failure("RunnerError", f"batch error: {type(exc).__name__}: {exc}"))
        finally:
            if admitted:
                slots.release(batch.device, ticket)
            self._close(batch)
            for part in batch.parts:  # nothing is left without an answer
                part.resolve(CallResult.failure(EndReason.CANCELLED, "cancelled by request"))
