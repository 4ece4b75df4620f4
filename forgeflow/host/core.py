"""The engine daemon's core: one long-lived process per host that runs jobs on warm, shared worker pools.

Every job is still one Prefect flow run with one task run per stage (``pipeline_flow``), and every
stage still runs in a sandboxed worker with its hard timeout and memory limit. What the engine adds
is that all of it lives on between jobs:

* **pools** — one :class:`~forgeflow.engine.runners.process.ProcessRunner` shared by every job of
  the host (the API's, ``forgeflow run``'s, and stage calls of flow runs that a Prefect worker
  started), so models stay loaded; a crash or timeout costs only its own worker;
* **admission** — at most ``max_concurrent_jobs`` jobs run at once (the rest queue in order) and at
  most N stages per device (:mod:`forgeflow.engine.admission`);
* **cheaper Prefect** — flow runs start in a process where Prefect is already imported and its
  client warm, without the per-run heartbeat thread whose exit costs a sync flow about a second
  (the engine reconciles lost jobs itself);
* **reuse** — each job has its own ``ctx.cache`` (removed when the job ends);
* **batches** — concurrent calls of a batchable tool from different jobs run as one call of one
  warm worker (:mod:`forgeflow.engine.batching`).

Jobs are submitted with where their events go: an API's ingest endpoint (``HttpSink``, spooled
while the API is away) or a stream back to the caller (``forgeflow run``).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from pydantic import JsonValue

from forgeflow.canonical import JsonObject
from forgeflow.engine.admission import AdmittedRunner, DeviceSlots
from forgeflow.engine.batching import BatchingRunner
from forgeflow.engine.control import EngineStatus, JobState, JobView
from forgeflow.engine.runners import get_runner
from forgeflow.engine.runners.base import CallResult, ProgressCallback, ToolCall
from forgeflow.events.models import Event, JobStatusEvent, PipelineError
from forgeflow.events.sinks import EventSink, HttpSink
from forgeflow.host.job import EngineJob, NotAPipelineRun, StreamSink, TerminalWatch
from forgeflow.host.prefect_runs import PREFECT_BUSY_WAIT_S, PrefectRuns, prefect_busy
from forgeflow.jobs.job_run import start_first_stage
from forgeflow.jobs.media_sync import MediaSync
from forgeflow.jobs.stages import Services
from forgeflow.pipeline import outcome
from forgeflow.pipeline.definition import raw_stages
from forgeflow.pipeline.outcome import EndReason
from forgeflow.plugins.lifecycle import LifecycleStore
from forgeflow.plugins.media import MediaStore
from forgeflow.plugins.registry import PluginRegistry
from forgeflow.settings import Settings

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

log = logging.getLogger("forgeflow.engine")  # the engine's log lines keep their name

#: Finished jobs the engine remembers (for status and for an API that re-attaches).
FINISHED_KEPT = 2000

__all__ = ["FINISHED_KEPT", "Engine", "EngineJob", "NotAPipelineRun", "StreamSink"]


class Engine:
    """Warm pools, admission and job threads of one host (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: PluginRegistry | None = None,
        prefect_ready: Callable[[], object] | None = None,
    ) -> None:
        """``prefect_ready`` blocks until the Prefect server the jobs use answers (raising when it
        cannot start): the engine takes jobs while its own server is still starting, warms their
        workers meanwhile, and a job's flow run begins once the server is up."""
        self.settings = settings
        self.registry = registry or PluginRegistry.discover(LifecycleStore(settings.lifecycle_db))
        self.pool = get_runner(settings, self.registry)
        self.slots = DeviceSlots(settings.device_slots)
        self.runner = BatchingRunner(
            AdmittedRunner(self.pool, self.slots, on_wait=self._stage_waits), settings, self.registry, self._alone
        )
        self.started_at = time.time()
        self.prefect_api_url = os.environ.get("PREFECT_API_URL")
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, EngineJob] = OrderedDict()
        self._queue: list[EngineJob] = []
        self._running = 0
        self._sinks: dict[tuple[str, str | None], HttpSink] = {}
        self._prefect_ready = prefect_ready
        self._closed = False
        self._flow_names: dict[str, str] = {}  # flow id -> name, of the flow runs handed over
        #: Stage calls of other processes in flight, and when the engine last had work (monotonic).
        self._calls = 0
        self._last_active = time.monotonic()
        # Job threads live on between jobs (daemon threads: a running job never holds the process's exit).
        self._ready: queue.SimpleQueue[EngineJob] = queue.SimpleQueue()
        self._job_threads = 0
        self._prefect_runs = PrefectRuns()  # Prefect's settings and TLS context of every job's flow run

    # --- jobs ------------------------------------------------------------------------------------

    def submit_flow_run(self, flow_run_id: str, sink: EventSink, handed_by: int | None = None) -> EngineJob:
        """Queue a flow run of the ``pipeline`` deployment that a Prefect worker handed over
        (``python -m forgeflow.jobs.handoff``, process ``handed_by``): it runs here, on the warm
        pools, as that flow run; it is cancelled when that process dies (the worker lost it)."""
        from uuid import UUID

        from forgeflow.jobs.flow import FLOW_NAME
        from forgeflow.jobs.flow_runs import prefect_client

        with prefect_client() as client:
            flow_run = client.read_flow_run(UUID(flow_run_id))
            flow_name = self._flow_names.get(str(flow_run.flow_id))
            if flow_name is None:
                flow_name = self._flow_names[str(flow_run.flow_id)] = client.read_flow(flow_run.flow_id).name
        if flow_name != FLOW_NAME:
            # Another flow's run (the batch flow): the handoff runs it as what it is.
            raise NotAPipelineRun(f"flow run {flow_run_id} is a run of flow {flow_name!r}, not {FLOW_NAME!r}")
        parameters = flow_run.parameters or {}
        job_id = str(parameters.get("job_id") or flow_run_id)
        job = self.submit(job_id, parameters.get("pipeline"), parameters.get("input") or {}, sink, flow_run=flow_run)
        if isinstance(sink, HttpSink):
            sink.track(job_id)  # waiting for a job slot is no silence: the API hears of it
        if handed_by is not None:
            threading.Thread(
                target=self._cancel_when_gone, args=(job, handed_by), name=f"watch-{job_id}"[:60], daemon=True
            ).start()
        return job

    def _cancel_when_gone(self, job: EngineJob, pid: int) -> None:
        from forgeflow.processes import pid_alive, process_create_time

        created = process_create_time(pid)
        while not job.done.wait(0.5):
            if not pid_alive(pid, created):
                # Prefect's worker saw its flow run's process die and marks the run Crashed; the API
                # ends the job with that reason. The engine stops the work and says nothing more.
                log.warning("job %s: the process that handed it over (pid %s) is gone: stopping it", job.job_id, pid)
                job.lost = f"its flow run's process (pid {pid}) died"
                if job.flow_run is not None:  # Crashed before the cancel could end it Failed
                    from forgeflow.jobs.flow_runs import mark_flow_run

                    mark_flow_run(str(job.flow_run.id), "crashed", job.lost)
                if job.watch is not None:
                    job.watch.muted = True
                if isinstance(job.sink, HttpSink):
                    job.sink.forget(job.job_id)
                self.cancel(job.job_id)
                return

    def submit(
        self,
        job_id: str,
        pipeline: JsonValue,
        input_data: JsonObject,
        sink: EventSink,
        *,
        flow_run: FlowRun | None = None,
    ) -> EngineJob:
        """Queue a job; it starts when one of ``max_concurrent_jobs`` is free. A job id the engine
        already runs is not started twice (the running one is returned)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is shutting down")
            existing = self._jobs.get(job_id)
            if existing is not None and existing.status in ("queued", "running"):
                return existing
            job = EngineJob(job_id, pipeline, dict(input_data or {}), sink, flow_run=flow_run)
            self._last_active = time.monotonic()
            self._jobs[job_id] = job
            self._jobs.move_to_end(job_id)
            while len(self._jobs) > FINISHED_KEPT:
                oldest = next(iter(self._jobs.values()))
                if oldest.status in ("queued", "running"):
                    break
                self._jobs.popitem(last=False)
            self._queue.append(job)
        self._warm_for(job)
        self._start_queued()
        return job

    def _warm_for(self, job: EngineJob) -> None:
        """Start, in stage order and in the background, a worker for each plugin of the job that has
        none yet: a cold engine loads the models while its Prefect server starts and the flow run
        is created, so the first stage begins as soon as its worker is ready."""
        plugins = [str(stage.get("plugin")) for stage in raw_stages(job.pipeline) if isinstance(stage, dict)]
        if plugins:
            threading.Thread(target=self.warm, args=(plugins,), name=f"warm-{job.job_id}"[:60], daemon=True).start()

    def http_sink(self, api_url: str, token: str | None) -> HttpSink:
        """One delivering sink per API (events of all its jobs, in order)."""
        key = (api_url.rstrip("/"), token)
        with self._lock:
            if key not in self._sinks:
                self._sinks[key] = HttpSink(
                    key[0],
                    token,
                    self.settings.spool_dir,
                    heartbeat_s=self.settings.heartbeat_interval_s,
                    linger_s=self.settings.event_linger_ms / 1000,
                )
            return self._sinks[key]

    def _start_queued(self) -> None:
        with self._lock:
            starting = []
            while self._queue and self._running < self.settings.max_concurrent_jobs:
                job = self._queue.pop(0)
                self._running += 1
                job.status, job.started_at = "running", time.time()
                starting.append(job)
            # One thread per running job at most: a thread that just ended a job takes the next.
            spawn = max(0, self._running - self._job_threads)
            self._job_threads += spawn
        for job in starting:
            self._ready.put(job)
        for _ in range(spawn):
            threading.Thread(target=self._job_thread, name="forgeflow-job", daemon=True).start()

    def _job_thread(self) -> None:
        """Run ready jobs one after the other; wait for the next while the engine runs."""
        while True:
            job = self._ready.get()
            try:
                self._run_job(job)
            except BaseException:  # _run_job ends every job itself: this is a bug of ours
                log.exception("job thread failed on %s", job.job_id)

    def _execute(self, job: EngineJob, services: Services, sink: TerminalWatch) -> JsonObject:
        """The job's flow run, to its envelope. A Prefect server too busy to create the run (503
        from SQLite's write lock when many runs start at once, or not reachable) is asked again,
        with backoff, for up to :data:`PREFECT_BUSY_WAIT_S`: nothing of the job ran yet (it said
        nothing), and it stays queued meanwhile instead of failing for a moment's congestion."""
        from forgeflow.jobs.executor import PipelineExecutor

        deadline, delay = time.monotonic() + PREFECT_BUSY_WAIT_S, 1.0
        while True:
            try:
                with self._prefect_runs.settings(), self._prefect_runs.client():
                    executor = PipelineExecutor(services)
                    if job.flow_run is not None:
                        return executor.execute_flow_run(job.flow_run)
                    # the flow validates the JSON that came: anything but an object or a list of stages
                    # ends the job invalid there
                    pipeline = job.pipeline if isinstance(job.pipeline, (dict, list)) else None
                    return executor.execute(pipeline, job.input, job.job_id)
            except Exception as exc:
                first_try_of_a_new_run = job.flow_run is None and sink.emitted == 0 and not job.lost
                if not (first_try_of_a_new_run and prefect_busy(exc) and time.monotonic() + delay < deadline):
                    raise
                if services.is_cancelled(job.job_id):
                    raise
                log.warning(
                    "job %s: Prefect could not create its flow run (%s); again in %.0f s", job.job_id, exc, delay
                )
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _run_job(self, job: EngineJob) -> None:
        from forgeflow.jobs.flow import last_flow_run_id
        from forgeflow.jobs.flow_runs import mark_flow_run

        threading.current_thread().name = f"job-{job.job_id}"[:60]
        sink = job.watch = TerminalWatch(job.sink)
        if job.lost:
            sink.muted = True
        services = Services(self.settings, self.registry, self.runner, sink)
        if job.flow_run is not None and isinstance(job.sink, HttpSink):
            # A worker host's flow run: its media come from and go to the API it reports to.
            services.media_sync = MediaSync(
                job.sink.api_url,
                MediaStore(self.settings.media_root),
                job.sink.token,
                max_bytes=self.settings.max_media_bytes,
            )
        status: JobState = "failed"
        try:
            if job.flow_run is None:  # its first stage's call runs while its flow run is made
                services.head_start = start_first_stage(services, job.job_id, job.pipeline, job.input)
            if self._prefect_ready is not None:
                self._prefect_ready()  # the engine's own server may still be starting
            envelope = self._execute(job, services, sink)
            job.envelope = envelope
            if envelope.get("error_type") == EndReason.VALIDATION:
                status = "invalid"
            else:
                status = outcome.job_status_of(envelope)
            if status == "cancelled" and not job.lost:
                flow_run_id = last_flow_run_id(job.job_id)
                if flow_run_id:
                    mark_flow_run(flow_run_id, "cancelled", "cancelled by request")
        except BaseException as exc:
            log.exception("job %s failed inside the engine", job.job_id)
            # A handed-over run cancelled through Prefect can be aborted by Prefect itself (its worker
            # marks it Cancelled while it ends): the API ends that job from its stored messages.
            aborted = job.flow_run is not None and services.is_cancelled(job.job_id)
            if aborted:
                status = "cancelled"
            elif not sink.terminal_sent and not job.lost:
                # the flow run could not even start (Prefect down, say): say why
                error = f"the engine could not run the job's flow: {type(exc).__name__}: {exc}"[:4000]
                job.envelope = outcome.not_started(
                    outcome.pending_reports(raw_stages(job.pipeline)), error=error, error_type=EndReason.FLOW_RUN_ERROR
                ).to_dict()
                sink.emit(
                    PipelineError(
                        job_id=job.job_id,
                        stage_index=None,
                        plugin=None,
                        error=error,
                        error_type=EndReason.FLOW_RUN_ERROR,
                    )
                )
                sink.emit(JobStatusEvent(job_id=job.job_id, status="failed", envelope=job.envelope))
                sink.flush(timeout=5.0)
        finally:
            if job.lost and job.flow_run is not None:  # the stopped run may have said Failed since
                mark_flow_run(str(job.flow_run.id), "crashed", job.lost)
            if services.head_start is not None:  # not taken over: stopped with the job
                services.head_start.settle(getattr(self.pool, "cancel_job", None))
            if services.media_sync is not None:
                services.media_sync.close()
            self._pool_forget(job.job_id)
            with self._lock:
                job.status, job.finished_at, job.waiting_for = status, time.time(), None
                self._running -= 1
                self._last_active = time.monotonic()
            if isinstance(job.sink, StreamSink):
                job.sink.close()
            job.done.set()
            self._start_queued()

    @staticmethod
    def _end_unstarted(job: EngineJob) -> None:
        """A queued job that will not run: cancelled, and its stream (if any) ends."""
        if isinstance(job.sink, HttpSink):
            job.sink.forget(job.job_id)
        job.status, job.finished_at = "cancelled", time.time()
        job.envelope = outcome.not_started(
            outcome.pending_reports(raw_stages(job.pipeline)),
            error="cancelled by request before it started",
            error_type=EndReason.CANCELLED,
        ).to_dict()
        if isinstance(job.sink, StreamSink):
            job.sink.close()
        job.done.set()

    def _pool_forget(self, job_id: str) -> None:
        forget = getattr(self.pool, "forget_job", None)
        if forget is not None:
            forget(job_id)

    def cancel(self, job_id: str) -> EngineJob | None:
        """Stop a job: a queued one never starts; a running one's stage is killed and the job ends
        ``cancelled`` (its flow run Cancelled)."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            if job in self._queue:
                self._queue.remove(job)
                self._end_unstarted(job)
                return job
        cancel = getattr(self.pool, "cancel_job", None)
        if cancel is not None:
            cancel(job_id)
        self.slots.wake()
        return job

    def job(self, job_id: str) -> EngineJob | None:
        with self._lock:
            return self._jobs.get(job_id)

    def jobs(self, *, active_only: bool = False) -> dict[str, JobView]:
        """Every job the engine remembers, or (``active_only``) those queued or running."""
        with self._lock:
            return {
                job_id: job.view()
                for job_id, job in self._jobs.items()
                if not active_only or job.status in ("queued", "running")
            }

    @property
    def active_jobs(self) -> int:
        with self._lock:
            return self._running + len(self._queue)

    def _alone(self, call: ToolCall) -> bool:
        """Whether ``call`` is of the engine's only job while no other process calls: nothing could
        join its batch, so it does not wait for company (:mod:`forgeflow.engine.batching`)."""
        with self._lock:
            return self._running + len(self._queue) == 1 and not self._calls and call.job_id in self._jobs

    def _stage_waits(self, call: ToolCall, reason: str) -> None:
        """A stage waits for a device slot: the job says so (a ``running`` status with ``waiting_for``)."""
        job = self.job(call.job_id or "")
        if job is None:
            return
        job.waiting_for = f"stage {call.stage_index}: {reason}"
        job.sink.emit(JobStatusEvent(job_id=job.job_id, status="running", waiting_for=job.waiting_for))

    # --- single calls (flow runs in other processes of this host) ---------------------------------

    def call(self, call: ToolCall, on_progress: ProgressCallback | None = None) -> CallResult:
        with self._lock:
            self._calls += 1
        try:
            return self.runner.run(call, on_progress)
        finally:
            with self._lock:
                self._calls -= 1
                self._last_active = time.monotonic()

    def warm(self, plugins: list[str]) -> list[str]:
        """Start a worker for each plugin (in order) that has none yet, ahead of its first call; the
        ones started. Unknown plugins are skipped (a job's validation names them)."""
        started = []
        warm = getattr(self.pool, "warm", None)
        for name in dict.fromkeys(plugins):
            try:
                canonical = self.registry.resolve(name).name
            except Exception:
                continue
            if warm is not None and warm(canonical, if_none=True):
                started.append(canonical)
        return started

    # --- status and life --------------------------------------------------------------------------

    def idle_s(self) -> float:
        """Seconds since the engine last had a job or a stage call (0 while it has one)."""
        with self._lock:
            if self._running or self._queue or self._calls:
                return 0.0
            return time.monotonic() - self._last_active

    def close_if_idle(self, idle_s: float) -> bool:
        """Refuse new jobs from now on if the engine has been idle for ``idle_s``; whether it was.
        Checked and decided under one lock, so a job is either refused or counted, never lost."""
        with self._lock:
            busy = self._running or self._queue or self._calls
            if busy or time.monotonic() - self._last_active < idle_s:
                return False
            self._closed = True
            return True

    @property
    def closed(self) -> bool:
        return self._closed

    def status(self) -> EngineStatus:
        pools = self.pool.status()
        with self._lock:
            running = [j.view() for j in self._jobs.values() if j.status == "running"]
            queued = [j.view() for j in self._queue]
            finished = sum(1 for j in self._jobs.values() if j.finished_at is not None)
        return EngineStatus.model_validate(
            {
                "pid": os.getpid(),
                "started_at": self.started_at,
                "uptime_s": round(time.time() - self.started_at, 1),
                "idle_s": round(self.idle_s(), 1),
                "runner": self.settings.runner,
                "prefect_api_url": self.prefect_api_url,
                "max_concurrent_jobs": self.settings.max_concurrent_jobs,
                "jobs": {"running": running, "queued": queued, "finished": finished},
                "devices": self.slots.status(),
                "batching": self.runner.status(),
                **pools,
            }
        )

    def close(self, wait_s: float = 0.0) -> None:
        with self._lock:
            self._closed = True
            queued, self._queue = self._queue, []
        for job in queued:
            self._end_unstarted(job)
        deadline = time.monotonic() + wait_s
        while self.active_jobs and time.monotonic() < deadline:
            time.sleep(0.1)
        self.pool.close()
        for sink in list(self._sinks.values()):
            sink.flush(timeout=5.0)
            sink.close()

    def stream(self, job: EngineJob) -> Iterator[Event | None]:
        """Events of a job submitted with a :class:`StreamSink`, ending with None."""
        assert isinstance(job.sink, StreamSink)
        while True:
            event = job.sink.queue.get()
            yield event
            if event is None:
                return
