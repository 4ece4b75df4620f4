"""The process runner (default): each call runs in a worker process of its plugin.

Warm workers (``settings.reuse_workers=True``, the default) stay alive between calls, so a model a
tool loads through :func:`forgeflow.plugins.sdk.resource` is loaded once per worker, not per call.
With ``reuse_workers=False`` every call gets a fresh process (see ``bench/results/runners.md``
for what each costs).

Isolation, per call:

* **timeout**: the worker runs in its own session / process group; the parent waits on the protocol
  pipe with a deadline and, when it passes, SIGKILLs the whole group, reaps the worker and answers
  ``TimeoutError`` (within the timeout plus a few tens of milliseconds);
* **memory**: the worker caps its own address space (``RLIMIT_AS`` = current size + the limit) so an
  allocation past the limit raises ``MemoryError`` inside the plugin; a parent-side watchdog samples
  the resident memory of the worker and its children every 50 ms and kills the group when it grows
  by more than the limit (``MemoryError`` too). A worker that hit its limit is replaced;
* **crashes**: EOF on the pipe means the worker died: ``WorkerCrashed`` with the signal or exit code
  and the last 2 KB of the worker's log (``logs_dir/workers/<plugin>.log``, where everything
  the plugin prints goes). The next call starts a fresh worker.

Pools: each plugin has at most ``pool_size`` workers (``settings.pool_sizes`` per plugin); a call
takes an idle worker, starts another while the pool has room, or waits for one. Idle workers whose
resident memory adds up to more than ``idle_worker_memory_mb`` are stopped, least recently used
first. ``cancel_job(job_id)`` kills the worker serving that job (its call answers ``Cancelled``)
and stops the job's calls that still wait for a worker. Thread-safe.

Workers of a plugin with ``preload`` modules (torch) are forked from a server that imported them
once (:mod:`.worker_fork`). This module is the pool; a worker process is :mod:`.worker_process`, one call's exchange with it
(timeout, memory watchdog, crash diagnosis) :mod:`.call_exchange`, its log :mod:`.worker_log`.

The docker runner (:mod:`.docker`) is this runner with containers as its workers: it overrides how a
worker starts (:meth:`ProcessRunner._launch`), what a worker must match to serve a call
(:meth:`ProcessRunner._worker_key`: its memory limit and GPU request) and how a worker dies
(:class:`Worker`'s ``kill``, ``exit_description``, ``out_of_memory``).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from forgeflow.engine.runners import LifecycleRecorder, Prepared, prepare
from forgeflow.engine.runners.base import CallResult, PoolStatus, ProgressCallback, ToolCall, WorkerRow
from forgeflow.engine.runners.batch_call import BatchPart, run_batch
from forgeflow.engine.runners.call_exchange import CallLimits, exchange
from forgeflow.engine.runners.protocol import DeadlineExceeded, PeerClosed, ProtocolError, text_field
from forgeflow.engine.runners.worker_fork import ForkServers
from forgeflow.engine.runners.worker_log import LOG_TAIL_BYTES, file_size, read_log_tail, trim_log, worker_log_path
from forgeflow.engine.runners.worker_process import Worker
from forgeflow.pipeline.outcome import EndReason
from forgeflow.plugins.errors import PluginUnavailable, StageTimeout, WorkerCrashed

if TYPE_CHECKING:
    from forgeflow.plugins.registry import PluginRegistry
    from forgeflow.settings import Settings

__all__ = ["ProcessRunner"]

log = logging.getLogger("forgeflow.runners.process")


class ProcessRunner:
    """Runs each call in a sandboxed worker process (warm pool per plugin, or fresh per call)."""

    name = "process"

    def __init__(self, settings: Settings, registry: PluginRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.reuse_workers: bool = bool(settings.reuse_workers)
        self.lifecycle = LifecycleRecorder(registry)
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._idle: dict[str, list[Worker]] = {}
        self._all: set[Worker] = set()
        self._starting: dict[str, int] = {}
        self._waiting: dict[str, int] = {}
        self._warming: dict[str, int] = {}  # workers started ahead of their first call (warm), still starting
        self._stopping: set[Worker] = set()
        self._cancelled: dict[str, float] = {}  # job id -> when it was cancelled
        self._evicted = 0
        self._closed = False
        # Workers are spawned from one long-lived thread: PR_SET_PDEATHSIG fires when the *thread*
        # that forked the worker ends, so spawning from short-lived caller threads (Prefect task
        # threads, thread pools) would kill warm workers with them.
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forgeflow-spawner")
        self._env = self._worker_env()
        self._fork_servers = ForkServers(
            self._env,
            worker_log_path(settings.logs_dir, "fork-server"),
            settings.worker_startup_timeout_s,
            enabled=settings.worker_fork_server,
        )

    # -- public -------------------------------------------------------------------------------

    def run(self, call: ToolCall, on_progress: ProgressCallback | None = None) -> CallResult:
        try:
            return self._run(call, on_progress)
        except Exception as exc:  # a bug here must still not crash the caller
            log.exception("process runner failed on %s.%s", call.plugin, call.tool)
            return CallResult.failure(
                "RunnerError", f"{call.plugin}.{call.tool}: runner error: {type(exc).__name__}: {exc}"
            )

    def run_batch(self, parts: list[BatchPart], max_wait_ms: float) -> None:
        """Run the calls of ``parts`` (one plugin, tool and config) as one batch in one worker, each
        part answered as its own call ends (see :mod:`.batch_call`)."""
        run_batch(self, parts, max_wait_ms)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            workers = list(self._all | self._stopping)
            self._all.clear()
            self._stopping.clear()
            self._idle.clear()
        for worker in workers:
            worker.kill()
        self._fork_servers.close()  # before the spawning thread ends: they die with it
        self._spawner.shutdown(wait=False)

    def __enter__(self) -> ProcessRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def worker_pids(self, plugin: str | None = None) -> list[int]:
        """Pids of live workers (all, or of one plugin): for health checks and tests."""
        with self._lock:
            return sorted(w.pid for w in self._all if plugin is None or w.plugin == plugin)

    def cancel_job(self, job_id: str) -> int:
        """Stop ``job_id``'s calls: kill the workers serving it, wake its waiting calls; how many were killed."""
        now = time.monotonic()
        with self._cond:
            self._cancelled[job_id] = now
            for old, since in list(self._cancelled.items()):
                if now - since > 3600:
                    del self._cancelled[old]
            serving = [w for w in self._all if w.job_id == job_id]
            self._cond.notify_all()
        log.info("cancel %s: stopping %d worker(s) serving it", job_id, len(serving))
        for worker in serving:
            worker.kill()
        return len(serving)

    def forget_job(self, job_id: str) -> None:
        """The job has ended: drop its cancel mark."""
        with self._lock:
            self._cancelled.pop(job_id, None)

    def is_cancelled(self, job_id: str | None) -> bool:
        return job_id is not None and job_id in self._cancelled

    def warm(self, plugin: str, *, if_none: bool = False) -> bool:
        """Start an idle worker for ``plugin`` ahead of its first call (when its pool has room; with
        ``if_none``, only when the plugin has no worker at all). A call that comes while it starts
        waits for it rather than starting a second one."""
        with self._lock:
            count = self._count(plugin)
            if self._closed or self._idle.get(plugin) or count >= self.settings.pool_size_of(plugin):
                return False
            if if_none and count:
                return False
            self._starting[plugin] = self._starting.get(plugin, 0) + 1
            self._warming[plugin] = self._warming.get(plugin, 0) + 1
        try:
            worker, _failure = self._start(plugin, self._default_key(plugin))
            if worker is None:
                return False
            self._release(worker)
            return True
        finally:
            with self._cond:
                _count_down(self._warming, plugin)
                self._cond.notify_all()

    def status(self) -> PoolStatus:
        """Pools as plain data: every worker (pid, plugin, busy job, calls, model loads, memory)."""
        with self._lock:
            workers = list(self._all)
            idle = {id(w) for ws in self._idle.values() for w in ws}
            waiting = dict(self._waiting)
            starting = dict(self._starting)
            evicted = self._evicted
        now = time.monotonic()
        rows: list[WorkerRow] = []
        for w in sorted(workers, key=lambda w: (w.plugin, w.pid)):
            rows.append(
                {
                    "plugin": w.plugin,
                    "pid": w.pid,
                    "state": "idle" if id(w) in idle else "busy",
                    "job_id": w.job_id,
                    "calls": w.calls,
                    "model_loads": w.loads,
                    "rss_mb": round(w.group_rss() / 2**20, 1),
                    "idle_s": round(now - w.last_used, 1) if id(w) in idle else None,
                }
            )
        plugins = sorted({r["plugin"] for r in rows} | set(waiting) | set(starting))
        return {
            "workers": rows,
            "pools": [
                {
                    "plugin": p,
                    "size": self.settings.pool_size_of(p),
                    "busy": sum(1 for r in rows if r["plugin"] == p and r["state"] == "busy"),
                    "idle": sum(1 for r in rows if r["plugin"] == p and r["state"] == "idle"),
                    "starting": starting.get(p, 0),
                    "waiting_calls": waiting.get(p, 0),
                }
                for p in plugins
            ],
            "idle_memory_mb": round(sum(r["rss_mb"] for r in rows if r["state"] == "idle"), 1),
            "idle_memory_budget_mb": self.settings.idle_worker_memory_mb,
            "evicted": evicted,
        }

    # -- one call -----------------------------------------------------------------------------

    def _run(self, call: ToolCall, on_progress: ProgressCallback | None) -> CallResult:
        prepared = prepare(self.registry, call)
        if isinstance(prepared, CallResult):
            return prepared
        plugin = prepared.plugin
        key = self._worker_key(prepared, call)
        if isinstance(key, CallResult):  # the call cannot run here (e.g. no GPU): nothing was started
            return key
        worker, failure = self._acquire(plugin, call.job_id, key)
        if failure is not None:
            self.lifecycle.finished(plugin, failure)
            return failure
        assert worker is not None
        with self._cond:  # a cancel either sees the worker serving the job, or the job sees the cancel
            cancelled = self.is_cancelled(call.job_id)
            worker.job_id = None if cancelled else call.job_id
        if cancelled:
            self._release(worker)
            return CallResult.failure(EndReason.CANCELLED, "cancelled by request")
        self.lifecycle.running(plugin)
        result, reusable = self._call(worker, prepared, call, on_progress)
        if reusable:
            self._release(worker)
        else:
            self._discard(worker)
        self.lifecycle.finished(plugin, result)
        return result

    def _call(
        self, worker: Worker, prepared: Prepared, call: ToolCall, on_progress: ProgressCallback | None
    ) -> tuple[CallResult, bool]:
        """Run ``call`` in ``worker`` (:func:`.call_exchange.exchange`): its result and whether the
        worker may serve again."""
        limits = CallLimits(
            memory_limit_mb=int(call.memory_limit_mb or self.settings.stage_memory_limit_mb),
            timeout_s=call.timeout_s,
            max_stage_timeout_s=self.settings.max_stage_timeout_s,
        )
        return exchange(worker, prepared, call, limits, on_progress, self.is_cancelled)

    def _worker_key(self, prepared: Prepared, call: ToolCall) -> object:
        """What a worker must have been started with to serve ``call`` besides its plugin (a worker
        serves only calls of its own key), or a failed result when the call cannot run at all.
        Process workers serve every call of their plugin: None."""
        return None

    def _default_key(self, plugin: str) -> object:
        """The key of a worker started ahead of its first call (:meth:`warm`)."""
        return None

    # -- pool ---------------------------------------------------------------------------------

    def _count(self, plugin: str) -> int:
        """Workers of ``plugin`` alive or starting (call with the lock held)."""
        return sum(1 for w in self._all if w.plugin == plugin) + self._starting.get(plugin, 0)

    def _acquire(self, plugin: str, job_id: str | None, key: object = None) -> tuple[Worker | None, CallResult | None]:
        """An idle worker (of ``key``), a new one while the pool has room, or the next one released.
        When the pool is full and an idle worker of another key waits, that one is stopped to make
        room."""
        size = self.settings.pool_size_of(plugin)
        with self._cond:
            self._waiting[plugin] = self._waiting.get(plugin, 0) + 1
            try:
                while True:
                    if self.is_cancelled(job_id):
                        return None, CallResult.failure(EndReason.CANCELLED, "cancelled by request")
                    if self._closed:
                        return None, CallResult.failure("RunnerError", f"{plugin}: the runner is closed")
                    idle = self._idle.get(plugin, [])
                    while self.reuse_workers:
                        # the most recently used of its key: its caches are the warmest
                        worker = next((w for w in reversed(idle) if w.key == key), None)
                        if worker is None:
                            break
                        idle.remove(worker)
                        if worker.alive():
                            return worker, None
                        self._all.discard(worker)
                        worker.kill()
                    # a worker started ahead of its first call (warm) is this call's: no second one
                    warming_for_me = self._warming.get(plugin, 0) >= self._waiting[plugin]
                    if self._count(plugin) < size and not warming_for_me:
                        self._starting[plugin] = self._starting.get(plugin, 0) + 1
                        break
                    if idle and not warming_for_me:  # full, idle workers of another key: retire the LRU one
                        self._discard(idle.pop(0))
                        continue
                    self._cond.wait(0.5)
            finally:
                self._waiting[plugin] -= 1
                if not self._waiting[plugin]:
                    del self._waiting[plugin]
        return self._start(plugin, key)

    def _release(self, worker: Worker) -> None:
        self._trim_log(worker.log_path)
        worker.job_id = None
        worker.last_used = time.monotonic()
        if self.reuse_workers and worker.alive():
            with self._cond:
                if not self._closed:
                    self._idle.setdefault(worker.plugin, []).append(worker)
                    self._cond.notify_all()
                    evict = self._over_budget()
                    if worker not in evict:
                        for old in evict:
                            self._discard(old)
                        return
        self._discard(worker)

    def _over_budget(self) -> list[Worker]:
        """Idle workers to stop so the idle ones fit ``idle_worker_memory_mb``, LRU first (lock held)."""
        budget = int(self.settings.idle_worker_memory_mb) * 2**20
        idle = sorted((w for ws in self._idle.values() for w in ws), key=lambda w: w.last_used)
        sizes = {id(w): w.group_rss() for w in idle}
        total = sum(sizes.values())
        evict = []
        for worker in idle:
            if total <= budget:
                break
            total -= sizes[id(worker)]
            evict.append(worker)
        for worker in evict:
            self._idle[worker.plugin].remove(worker)
            self._evicted += 1
            log.info(
                "stopping idle %s worker pid %s: idle workers over %s MB",
                worker.plugin,
                worker.pid,
                self.settings.idle_worker_memory_mb,
            )
        return evict

    def _discard(self, worker: Worker) -> None:
        """Retire a worker. A live one is asked to leave and reaped in the background: its
        interpreter shutdown (~0.1-0.2 s) is not the caller's wait."""
        with self._cond:
            self._all.discard(worker)
            self._cond.notify_all()
            if worker.alive():
                self._stopping.add(worker)
                dead = None
            else:
                dead = worker
        if dead is not None:
            dead.kill()  # reap it and close its pipes
            return

        def reap() -> None:
            try:
                worker.stop()
            finally:
                with self._lock:
                    self._stopping.discard(worker)

        threading.Thread(target=reap, name="forgeflow-reaper", daemon=True).start()

    def _worker_env(self) -> dict[str, str]:
        return {**os.environ, **self.settings.to_env(), "PYTHONUNBUFFERED": "1"}

    def _trim_log(self, path: Path) -> None:
        trim_log(path)

    def _start(self, plugin: str, key: object = None) -> tuple[Worker | None, CallResult | None]:
        """Start a worker whose place in the pool the caller reserved (``_starting``)."""
        try:
            return self._spawn_worker(plugin, key)
        finally:
            with self._cond:
                _count_down(self._starting, plugin)
                self._cond.notify_all()

    def _log_path(self, plugin: str) -> Path:
        return worker_log_path(self.settings.logs_dir, plugin)

    def _launch(self, plugin: str, key: object, log_path: Path) -> Worker:
        """Start the worker process of ``plugin`` (stderr appended to ``log_path``); raises when it
        cannot be started. The ``ready`` handshake is :meth:`_spawn_worker`'s."""
        cmd = [
            sys.executable,
            "-m",
            "forgeflow.engine.runners.worker",
            "--plugin",
            plugin,
            "--parent-pid",
            str(os.getpid()),
        ]

        entry = self.registry.entries.get(plugin)  # its Plugin(preload=...): forked from their fork server
        preload = tuple(entry.plugin.preload) if entry is not None and entry.plugin is not None else ()

        def spawn() -> subprocess.Popen[bytes]:
            with log_path.open("ab") as log_file:
                return subprocess.Popen(
                    cmd,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log_file,
                    start_new_session=True,
                    close_fds=True,
                    env=self._env,
                )

        forked = self._fork_servers.fork(preload, plugin, log_path, self._spawner) if preload else None
        return Worker(plugin, forked or self._spawner.submit(spawn).result(), log_path, key)

    def _spawn_worker(self, plugin: str, key: object = None) -> tuple[Worker | None, CallResult | None]:
        log_path = self._log_path(plugin)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._trim_log(log_path)
        log_offset = file_size(log_path)
        start = time.monotonic()
        try:
            worker = self._launch(plugin, key, log_path)
        except Exception as exc:
            return None, CallResult.failure("RunnerError", f"{plugin}: cannot start a worker: {exc}")
        with self._lock:
            self._all.add(worker)
        budget = float(self.settings.worker_startup_timeout_s)
        try:
            message = worker.reader.read(start + budget)
        except DeadlineExceeded:
            self._forget(worker)
            worker.kill()
            return None, CallResult.failure(
                StageTimeout,
                f"{plugin}: worker did not become ready within {budget:g} s (worker_startup_timeout_s); killed",
                duration_ms=(time.monotonic() - start) * 1000.0,
            )
        except (PeerClosed, ProtocolError, OSError) as exc:
            self._forget(worker)
            rc = worker.wait_exit(worker.exit_wait_s) if not isinstance(exc, ProtocolError) else None
            worker.kill()
            tail = read_log_tail(log_path, since=log_offset)
            text = f"{plugin}: {worker.noun} {worker.exit_description(rc)} while starting"
            if tail:
                text += f"\n--- worker log (last {LOG_TAIL_BYTES} bytes) ---\n{tail}"
            return None, CallResult.failure(WorkerCrashed, text, duration_ms=(time.monotonic() - start) * 1000.0)
        if message.get("type") == "unavailable":
            self._forget(worker)
            worker.stop()
            return None, CallResult.failure(
                PluginUnavailable, f"plugin {plugin!r} is unavailable: {message.get('reason')}"
            )
        if message.get("type") != "ready":
            self._forget(worker)
            worker.kill()
            return None, CallResult.failure(
                WorkerCrashed, f"{plugin}: worker sent {message.get('type')!r} instead of 'ready'"
            )
        worker.version = text_field(message, "version")
        self.lifecycle.initialized(plugin)
        return worker, None

    def _forget(self, worker: Worker) -> None:
        with self._lock:
            self._all.discard(worker)


def _count_down(counts: dict[str, int], plugin: str) -> None:
    """One fewer of ``plugin`` in ``counts`` (a plugin at none is dropped)."""
    counts[plugin] -= 1
    if not counts[plugin]:
        del counts[plugin]
