"""The runner :func:`~forgeflow.engine.runners.get_runner` gives: each call to the runner it asks for.

A call's ``runner`` (``ToolCall.runner``: the stage's ``runner``, else its pipeline's) picks
``process``, ``docker`` or ``inline``; a call that names none goes to the host's default
(``settings.runner``, ``FORGEFLOW_RUNNER``). Each concrete runner is created on the first call that
needs it and lives as long as this one (so its warm workers or containers serve every later job),
and :meth:`RunnerSet.close` closes them all.

``inline`` runs plugin code in the caller's process with no isolation (plugin unit tests only): a
call may ask for it only where the host's own runner is ``inline``; elsewhere it fails with
``RunnerError`` before anything runs.

Cancelling a job reaches every runner, including one created after the cancel.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from forgeflow.engine.runners.base import CallResult, PoolStatus, ProgressCallback, Runner, ToolCall
from forgeflow.pipeline.outcome import EndReason

if TYPE_CHECKING:
    from forgeflow.engine.runners.batch_call import BatchPart
    from forgeflow.plugins.registry import PluginRegistry
    from forgeflow.settings import Settings

#: How long a cancel mark is kept for a job that never says it ended.
CANCEL_MARK_S = 3600.0


def new_runner(kind: str, settings: Settings, registry: PluginRegistry) -> Runner:
    """A new concrete runner of ``kind`` (``process``, ``docker`` or ``inline``)."""
    if kind == "process":
        from forgeflow.engine.runners.process import ProcessRunner

        return ProcessRunner(settings, registry)
    if kind == "docker":
        from forgeflow.engine.runners.docker import DockerRunner

        return DockerRunner(settings, registry)
    if kind == "inline":
        from forgeflow.engine.runners.inline import InlineRunner

        return InlineRunner(settings, registry)
    raise ValueError(f"unknown runner {kind!r}: expected process, docker or inline")


class RunnerSet:
    """Dispatches each call to the runner it asks for, else the host's default (see the module docstring)."""

    def __init__(self, settings: Settings, registry: PluginRegistry) -> None:
        if settings.runner not in ("process", "docker", "inline"):
            raise ValueError(f"unknown runner {settings.runner!r}: expected process, docker or inline")
        self.settings = settings
        self.registry = registry
        self.default: str = settings.runner
        self.name: str = self.default
        self._runners: dict[str, Runner] = {}
        self._lock = threading.Lock()
        self._cancelled: dict[str, float] = {}
        self._closed = False

    # -- runners ----------------------------------------------------------------------------------

    def runner(self, kind: str | None = None) -> Runner:
        """The runner of ``kind`` (default: the host's), created on first use."""
        kind = kind or self.default
        with self._lock:
            if self._closed:
                raise RuntimeError("the runner is closed")
            runner = self._runners.get(kind)
            if runner is None:
                runner = self._runners[kind] = new_runner(kind, self.settings, self.registry)
                cancel = getattr(runner, "cancel_job", None)
                if cancel is not None:
                    for job_id in self._cancelled:  # a job cancelled before this runner existed stays cancelled
                        cancel(job_id)
            return runner

    def runners(self) -> dict[str, Runner]:
        """The runners created so far, by kind."""
        with self._lock:
            return dict(self._runners)

    # -- Runner -----------------------------------------------------------------------------------

    def run(self, call: ToolCall, on_progress: ProgressCallback | None = None) -> CallResult:
        kind = call.runner or self.default
        label = f"{call.plugin}.{call.tool}"
        if kind == "inline" and self.default != "inline":
            return CallResult.failure(
                "RunnerError",
                f"{label}: the inline runner (no isolation; plugin unit tests only) may not be chosen by a "
                f"pipeline on a host whose runner is {self.default!r}",
            )
        if self.is_cancelled(call.job_id):
            return CallResult.failure(EndReason.CANCELLED, "cancelled by request")
        try:
            runner = self.runner(kind)
        except Exception as exc:
            return CallResult.failure("RunnerError", f"{label}: cannot create the {kind} runner: {exc}")
        return runner.run(call, on_progress)

    def run_batch(self, parts: list[BatchPart], max_wait_ms: float) -> None:
        """Run a batch of calls (one plugin, tool, config and runner) in the runner they ask for;
        a runner that takes no batches runs each call alone. Every part is answered on return."""
        try:
            runner = self.runner(parts[0].call.runner or self.default)
        except Exception as exc:
            for part in parts:
                part.resolve(CallResult.failure("RunnerError", f"cannot create the runner: {exc}"))
            return
        batch = getattr(runner, "run_batch", None)
        if batch is not None:
            batch(parts, max_wait_ms)
        for part in parts:
            if not part.done.is_set():
                part.resolve(self.run(part.call, part.on_progress))

    def takes_batches(self, kind: str | None) -> bool:
        """Whether calls for the runner of ``kind`` (default: the host's) may be batched: the process
        runner's only (a container or the caller's own process runs each call as today)."""
        return (kind or self.default) == "process"

    def close(self) -> None:
        with self._lock:
            self._closed = True
            runners = list(self._runners.values())
        for runner in runners:
            runner.close()

    def __enter__(self) -> RunnerSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what the engine and the CLI ask of the pools -------------------------------------------

    def cancel_job(self, job_id: str) -> int:
        """Stop ``job_id``'s calls in every runner; how many workers were killed."""
        now = time.monotonic()
        with self._lock:
            self._cancelled[job_id] = now
            for old, since in list(self._cancelled.items()):
                if now - since > CANCEL_MARK_S:
                    del self._cancelled[old]
            runners = list(self._runners.values())
        killed = 0
        for runner in runners:
            cancel = getattr(runner, "cancel_job", None)
            if cancel is not None:
                killed += int(cancel(job_id))
        return killed

    def forget_job(self, job_id: str) -> None:
        with self._lock:
            self._cancelled.pop(job_id, None)
            runners = list(self._runners.values())
        for runner in runners:
            forget = getattr(runner, "forget_job", None)
            if forget is not None:
                forget(job_id)

    def is_cancelled(self, job_id: str | None) -> bool:
        if job_id is None:
            return False
        with self._lock:
            if job_id in self._cancelled:
                return True
            runners = list(self._runners.values())
        return any(getattr(r, "is_cancelled", lambda _: False)(job_id) for r in runners)

    def warm(self, plugin: str, kind: str | None = None, *, if_none: bool = False) -> bool:
        """Start an idle worker of ``plugin`` in the runner of ``kind`` (default: the host's)."""
        warm = getattr(self.runner(kind), "warm", None)
        return bool(warm is not None and warm(plugin, if_none=if_none))

    def worker_pids(self, plugin: str | None = None) -> list[int]:
        """Pids of the live workers of every runner (a docker worker's: its attach process)."""
        pids: list[int] = []
        for runner in self.runners().values():
            of = getattr(runner, "worker_pids", None)
            if of is not None:
                pids.extend(of(plugin))
        return sorted(pids)

    def status(self) -> PoolStatus:
        """Every runner's pools and workers together; each row says its ``runner``."""
        merged: PoolStatus = {
            "runners": sorted(self.runners()),
            "workers": [],
            "pools": [],
            "idle_memory_mb": 0.0,
            "idle_memory_budget_mb": self.settings.idle_worker_memory_mb,
            "evicted": 0,
        }
        for kind, runner in sorted(self.runners().items()):
            of = getattr(runner, "status", None)
            if of is None:
                continue
            status: PoolStatus = of()
            merged["workers"] += [{**row, "runner": kind} for row in status.get("workers", [])]
            merged["pools"] += [{**row, "runner": kind} for row in status.get("pools", [])]
            merged["idle_memory_mb"] = round(merged["idle_memory_mb"] + status.get("idle_memory_mb", 0.0), 1)
            merged["evicted"] += status.get("evicted", 0)
        return merged
