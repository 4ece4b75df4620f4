"""Batches across jobs, on the plugin's side: what a batchable tool declares and how its model calls join.

A tool declares ``batch=BatchSpec(...)`` (see :meth:`forgeflow.plugins.sdk.Plugin.tool`): the engine
may then hand one warm worker the calls of several jobs at once (same plugin, version, tool and
config). The worker runs each job's call as usual, with its own inputs, ``ctx``, progress, cache and
outputs, each in its own thread, and the tool's model passes meet in :meth:`ToolContext.batched
<forgeflow.plugins.sdk.ToolContext.batched>`: the item lists that the calls of the batch ask for with
the same key at about the same time go through one ``fn(groups)`` (one list per call, one model call
for all of them), and each call gets its own results back. So a tool becomes batchable by routing its model call through
``ctx.batched`` and declaring ``batch=``; everything else it does stays per call.

Alone (a call that is not part of a batch: embedded runs, the Docker runner, a batch of one)
``ctx.batched(key, items, fn)`` is ``fn([items])[0]``.

``fn`` sees each call's items as a group of its own, so it can keep results byte-identical to
unbatched calls: a model whose output for an input depends on what else is in its batch (most
convolution kernels do, in the last float bits) runs each group as the pass that call would have
made alone, while a batch-invariant one may join them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["BatchGather", "BatchSpec"]

T = TypeVar("T")
R = TypeVar("R")
#: A batched function: one list of items per call that joined → one list of results per call.
GroupFn = Callable[[list[list[T]]], Sequence[Sequence[R]]]


class BatchSpec(BaseModel):
    """A tool takes batches: the engine may join concurrent calls of it from different jobs.

    ``None`` fields take the host's settings (``FORGEFLOW_BATCH_MAX_SIZE``,
    ``FORGEFLOW_BATCH_MAX_WAIT_MS``); the host's per-tool settings (``FORGEFLOW_BATCH_SIZES``,
    ``FORGEFLOW_BATCH_WAITS_MS``) override both.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_batch: int | None = Field(None, ge=1, le=256, description="Most calls in one batch (1: never batched).")
    max_wait_ms: float | None = Field(
        None, ge=0, le=10_000, description="Longest a call waits for others to join it (and a model pass for the rest)."
    )


@dataclass(eq=False)
class _Request(Generic[T, R]):
    items: list[T]
    results: list[R] | None = None
    error: BaseException | None = None
    done: bool = False


@dataclass(eq=False)
class _Group(Generic[T, R]):
    started: float
    requests: list[_Request[T, R]] = field(default_factory=list)


class BatchGather:
    """Where the concurrent calls of one batch (one thread each, in one worker) meet for their model passes.

    A group of requests with one key runs when every call still running waits on the gather (with
    any key), or when its first request has waited ``max_wait_s``: a call busy elsewhere (decoding
    a frame) delays the others by at most that. The thread that finds a group ready runs its ``fn``
    over all its items; when ``fn`` raises for a group of several calls, each call runs ``fn`` on
    its own items alone, so one bad input fails only its call.
    """

    def __init__(self, calls: int, max_wait_s: float) -> None:
        self.max_wait_s = max(0.0, max_wait_s)
        self._live = calls
        self._cond = threading.Condition()
        self._groups: dict[Hashable, _Group[Any, Any]] = {}  # each key's items and results: its own types
        #: Calls (groups) per ``fn`` run, in order (what the batch really joined; for tests and logs).
        self.runs: list[int] = []

    @staticmethod
    def alone(items: Sequence[T], fn: GroupFn[T, R]) -> list[R]:
        """``fn([items])[0]`` for a call that is not part of a batch (checked: one result per item)."""
        return _answers(fn([list(items)]), [len(items)])[0]

    def leave(self) -> None:
        """A call of the batch has ended: the others no longer wait for it."""
        with self._cond:
            self._live -= 1
            self._cond.notify_all()

    def call(self, key: Hashable, items: Sequence[T], fn: GroupFn[T, R]) -> list[R]:
        request: _Request[T, R] = _Request(list(items))
        with self._cond:
            found: _Group[T, R] | None = self._groups.get(key)
            if found is None:
                found = self._groups[key] = _Group(time.monotonic())
            group = found
            group.requests.append(request)
            self._cond.notify_all()
            while True:
                if request.done:
                    return self._outcome(request)
                if self._groups.get(key) is not group:  # another thread runs our group
                    self._cond.wait()
                    continue
                waiting = sum(len(g.requests) for g in self._groups.values())
                remaining = group.started + self.max_wait_s - time.monotonic()
                if waiting >= self._live or remaining <= 0:
                    del self._groups[key]
                    break
                self._cond.wait(remaining)
        self._run(group, fn)
        return self._outcome(request)

    def _run(self, group: _Group[T, R], fn: GroupFn[T, R]) -> None:
        requests = group.requests
        try:
            answers = _answers(fn([request.items for request in requests]), [len(r.items) for r in requests])
            self.runs.append(len(requests))
            for request, results in zip(requests, answers, strict=True):
                request.results = results
        except BaseException as exc:
            if len(requests) == 1:
                requests[0].error = exc
            else:  # find the one that fails: each alone
                for request in requests:
                    try:
                        request.results = self.alone(request.items, fn)
                        self.runs.append(1)
                    except BaseException as alone:
                        request.error = alone
        finally:
            with self._cond:
                for request in requests:
                    request.done = True
                self._cond.notify_all()

    @staticmethod
    def _outcome(request: _Request[T, R]) -> list[R]:
        if request.error is not None:
            raise request.error
        assert request.results is not None
        return request.results


def _answers(answers: Iterable[Iterable[R]], sizes: list[int]) -> list[list[R]]:
    """``fn``'s answer checked: one result list per group, one result per item."""
    out = [list(group) for group in answers]
    if [len(group) for group in out] != sizes:
        raise ValueError(f"a batched function returned {[len(g) for g in out]} results for groups of {sizes} items")
    return out
