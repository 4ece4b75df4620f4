"""The launcher: hands queued jobs to this host's engine (or a deployment's workers) and watches them.

It works on a :class:`~forgeflow.jobs.launch_store.LaunchStore` (the API's store is the one there
is, wired in ``forgeflow.api.launching``) and sends jobs' events to a
:class:`~forgeflow.jobs.launch_store.LaunchTarget`: it knows neither the API nor its database.

* Queued jobs start, oldest first, up to ``max_concurrent_jobs`` at once, each submitted to the
  engine (:mod:`forgeflow.engine`, started on demand: one long-lived process with warm worker
  pools), which runs it as one Prefect flow run and posts its events to the ingest endpoint. The
  engine's pid is stored with the job before anything else happens to it.
* Each launched job is a :class:`~forgeflow.jobs.handle.JobHandle` (an engine job, or a flow run in
  deployment mode) that says how it ended, as a status.
* A job whose engine dies without a stored terminal status (SIGKILL, OOM killer) gets its terminal
  messages from ``reconcile_crash`` after a short grace period (and after the spool folder is
  imported, in case its last events were spooled rather than delivered).
* Cancelling a queued job stores its ``cancelled`` status at once; a running one is cancelled in
  the engine (the running stage's worker is killed, the flow run ends Cancelled).
* On start-up nothing is lost: spooled events are imported, running jobs whose engine is alive are
  re-attached, the others are reconciled, and queued jobs are launched (on a new engine if the
  old one is gone).

The launcher never stops the engine's running jobs when the API shuts down: the engine finishes
them and then leaves (a restarted API re-adopts it while it still runs).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from anyio import to_thread

from forgeflow.events.models import Event, JobStatusEvent, PipelineError
from forgeflow.jobs.deployment import DeploymentRun
from forgeflow.jobs.engine_jobs import EngineJobHandle, engine_gone_reason
from forgeflow.jobs.flow_runs import mark_flow_run
from forgeflow.jobs.handle import JobEnd, JobHandle
from forgeflow.jobs.launch_store import LaunchedJob, LaunchStore, LaunchTarget
from forgeflow.jobs.placement import JobOrigin, place_job
from forgeflow.jobs.reconcile import reconcile_crash
from forgeflow.jobs.spool_import import import_spool
from forgeflow.pipeline import outcome
from forgeflow.pipeline.definition import raw_stages
from forgeflow.pipeline.outcome import EndReason
from forgeflow.processes import pid_alive, process_create_time

if TYPE_CHECKING:
    from forgeflow.engine.client import EngineClient
    from forgeflow.engine.control import JobView

log = logging.getLogger(__name__)

CANCELLED_BY_USER = "cancelled by the user"
#: Where the launcher runs a job: this host's engine, or a deployment's flow run (each a JobHandle).
HANDLE_KINDS: tuple[type[JobHandle], ...] = (EngineJobHandle, DeploymentRun)
#: How often the launcher's loop looks after the running batches (crash retries, end, progress).
BATCH_CHECK_S = 0.5


class Launcher:
    """Starts queued jobs and watches them to their end. ``every_tick``: called from the loop every
    :data:`BATCH_CHECK_S` while launching is enabled (the API's batches: crash retries, their end)."""

    def __init__(
        self,
        store: LaunchStore,
        target: LaunchTarget,
        *,
        every_tick: Callable[[], None] | None = None,
        exit_grace_s: float = 5.0,
        cancel_grace_s: float = 10.0,
        poll_interval_s: float = 0.25,
    ) -> None:
        self.store = store
        self.target = target
        self.settings = target.settings
        self.every_tick = every_tick
        self.exit_grace_s = exit_grace_s
        self.cancel_grace_s = cancel_grace_s
        self.poll_interval_s = poll_interval_s
        self.procs: dict[str, EngineJobHandle | DeploymentRun] = {}  # the launched jobs being watched
        #: Jobs that ended with no terminal status stored yet: how they ended (None: unknown), and when.
        self.ended: dict[str, tuple[JobEnd | None, float]] = {}
        self.ended_runs: dict[str, DeploymentRun] = {}  # job_id -> its ended flow run, for the reason
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._cancel_tasks: set[asyncio.Task[object]] = set()
        self.enabled = True
        self._engine: EngineClient | None = None  # once an engine was found or started
        self._engine_pid = 0
        self._engine_created: float | None = None
        self._started = time.monotonic()
        self._next_heartbeat_check = 0.0
        self._next_batch_check = 0.0

    # --- life ------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._started = time.monotonic()
        await to_thread.run_sync(self._recover)
        self._task = asyncio.create_task(self._run(), name="forgeflow-launcher")

    async def stop(self) -> None:
        engine = self._engine
        if engine is not None:  # the engine finishes its running jobs, then leaves
            from forgeflow.engine.client import EngineUnavailable

            try:
                await to_thread.run_sync(lambda: engine.shutdown(drain=True))
            except EngineUnavailable:
                pass
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None

    def wake(self) -> None:
        self._wake.set()

    @property
    def deployment_mode(self) -> bool:
        """Whether jobs run as flow runs of a Prefect deployment (on workers) instead of on this host's
        engine (:func:`forgeflow.jobs.placement.place_job` decides, for the API as for the CLI)."""
        placement = place_job(self.settings, JobOrigin.API, engine_running=self._engine is not None)
        return placement.where == "deployment"

    def prestart_engine(self) -> None:
        """Start (or adopt) the engine in the background, so the first job does not wait for it."""
        if self.deployment_mode:
            return

        def start() -> None:
            try:
                self.engine()
            except Exception:
                log.exception("could not start the engine")

        task = asyncio.create_task(to_thread.run_sync(start), name="forgeflow-engine-start")
        self._cancel_tasks.add(task)
        task.add_done_callback(self._cancel_tasks.discard)

    @property
    def running_count(self) -> int:
        return len(self.procs)

    def _recover(self) -> None:
        """Import spooled events, re-attach live job processes, mark the dead ones for reconciliation."""
        try:
            count = self._import_spool()
            if count:
                log.info("imported %d spooled events", count)
        except Exception:
            log.exception("importing the spool failed")
        active = self.store.launched_active_jobs()
        if self.deployment_mode:
            self._recover_flow_runs(active)
            return
        if active:
            try:
                self.engine()  # started now, not on the first job's clock
            except Exception:
                log.exception("could not start the engine")
        for job in active:
            job_id, pid = job["id"], job["pid"]
            if pid is None:
                # Marked launching, but the API died before the pid was stored: the process may
                # or may not exist; if it sent nothing, launch it again, else reconcile.
                if job["last_seq"] <= 1:
                    self.store.set_launched(job_id, None, None)
                    self.store.reset_launch(job_id)
                else:
                    self.ended[job_id] = (None, time.monotonic() - self.exit_grace_s)
                continue
            proc = EngineJobHandle(job_id, self._engine, pid, job.get("pid_create_time"))
            if self._engine is not None and proc.poll() is None:
                log.info("re-attached job %s (pid %s)", job_id, pid)
                self.procs[job_id] = proc
            else:
                self.ended[job_id] = (None, time.monotonic() - self.exit_grace_s + 1.0)

    def _recover_flow_runs(self, active: Sequence[LaunchedJob]) -> None:
        """Deployment mode: watch the flow runs of launched jobs again; launch again those whose
        flow run was never created (the idempotency key makes a second creation the same run)."""
        for job in active:
            if job["flow_run_id"]:
                self.procs[job["id"]] = DeploymentRun(job["id"], job["flow_run_id"], self.settings.flow_run_poll_s)
                log.info("watching flow run %s of job %s again", job["flow_run_id"], job["id"])
            elif job["last_seq"] <= 1:
                self.store.set_launched(job["id"], None, None)
                self.store.reset_launch(job["id"])
            else:
                self.ended[job["id"]] = (None, time.monotonic() - self.exit_grace_s)

    def engine(self) -> EngineClient:
        """This host's engine client: the running engine (adopted), or one started now."""
        from forgeflow.engine.client import EngineUnavailable, ensure_engine

        settings = self.settings
        env = {"PREFECT_API_URL": self.target.prefect_api_url} if self.target.prefect_api_url else {}
        client, status = ensure_engine(settings, env=env, owner_pid=os.getpid())
        wanted = self.target.prefect_api_url
        if wanted and status.get("prefect_api_url") not in (None, wanted) and not status["jobs"]["running"]:
            log.info("the engine uses Prefect at %s, this API %s: restarting it", status.get("prefect_api_url"), wanted)
            try:
                client.shutdown(drain=False)
            except EngineUnavailable:
                pass
            deadline = time.monotonic() + 30
            while client.alive() and time.monotonic() < deadline:
                time.sleep(0.1)
            client, status = ensure_engine(settings, env=env, owner_pid=os.getpid())
        if status.get("owner_pid") != os.getpid():
            client.set_owner(os.getpid())
        self._engine = client
        self._engine_pid = int(status["pid"])
        self._engine_created = process_create_time(self._engine_pid)
        return client

    # --- loop ------------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("launcher tick failed")
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_interval_s)
            except TimeoutError:
                pass
            self._wake.clear()

    async def tick(self) -> None:
        async with self._lock:
            if self.deployment_mode and self.procs:
                await to_thread.run_sync(self._find_lost_hosts)
            ends = await to_thread.run_sync(self._poll_all)  # may ask the engine or Prefect: off the event loop
            for job_id, proc in list(self.procs.items()):
                end = ends.get(job_id)
                if end is None:
                    continue
                del self.procs[job_id]
                self.ended[job_id] = (end, time.monotonic())
                if isinstance(proc, DeploymentRun):
                    self.ended_runs[job_id] = proc
                    if proc.host_lost:  # a dead host sends no late events: no grace to wait out
                        self.ended[job_id] = (end, time.monotonic() - self.exit_grace_s)
            for job_id, (end, since) in list(self.ended.items()):
                if await to_thread.run_sync(self.store.has_terminal, job_id):
                    del self.ended[job_id]
                    continue
                waited = time.monotonic() - since
                if waited < self.exit_grace_s:
                    if waited > 1.0:
                        await to_thread.run_sync(self._import_spool)
                    continue
                del self.ended[job_id]
                await to_thread.run_sync(self._reconcile, job_id, end)
            if not self.enabled:
                return
            if self.every_tick is not None and time.monotonic() >= self._next_batch_check:
                self._next_batch_check = time.monotonic() + BATCH_CHECK_S
                await to_thread.run_sync(self.every_tick)
            free = self.settings.max_concurrent_jobs - len(self.procs)
            if free > 0:
                for job in await to_thread.run_sync(self.store.jobs_to_launch, free):
                    await to_thread.run_sync(self._launch, job)

    def _poll_all(self) -> dict[str, JobEnd | None]:
        """How every watched job ended (None: still running), in one thread hop and, for the jobs on
        this host's engine, one request for all of them (not one per job every tick)."""
        from forgeflow.engine.client import EngineUnavailable

        active: dict[str, JobView] | None = None
        if self._engine is not None and any(isinstance(p, EngineJobHandle) for p in self.procs.values()):
            try:
                active = self._engine.jobs(active_only=True)
            except EngineUnavailable:
                active = None  # each handle finds out for itself
        ends: dict[str, JobEnd | None] = {}
        for job_id, proc in list(self.procs.items()):
            ends[job_id] = proc.poll(active) if isinstance(proc, EngineJobHandle) else proc.poll()
        return ends

    def _find_lost_hosts(self) -> None:
        """Deployment mode: a job whose flow run a worker took and whose host has sent no heartbeat
        for ``heartbeat_timeout_s`` lost its host (killed, powered off, cut off); its flow run is
        marked Crashed. Checked once a second, and only once this service has listened that long
        itself (after a restart every heartbeat looks old)."""
        now = time.monotonic()
        timeout = self.settings.heartbeat_timeout_s
        if now < self._next_heartbeat_check or now - self._started < timeout:
            return
        self._next_heartbeat_check = now + 1.0
        # Only runs a worker has held for that long: one waiting for a worker has no host to lose.
        held = {
            job_id: proc
            for job_id, proc in self.procs.items()
            if isinstance(proc, DeploymentRun) and proc.claimed_for() >= timeout
        }
        for job in self.store.silent_jobs(list(held), timeout):
            proc = held[job["id"]]
            log.warning("job %s: its host sent no heartbeat for %g s", job["id"], timeout)
            proc.lost(f"its host sent no heartbeat for {timeout:g} s")

    def _launch(self, job: LaunchedJob) -> None:
        from forgeflow.engine.client import EngineUnavailable

        job_id = job["id"]
        store = self.store
        if not store.claim_launch(job_id):  # "launching": never started twice
            return
        try:
            if self.deployment_mode:
                self._launch_flow_run(job)
                return
            client = self._running_engine()
            try:
                self._submit(client, job)
            except EngineUnavailable:  # the engine we knew is gone or going: adopt or start one
                client = self.engine()
                self._submit(client, job)
        except Exception as exc:
            log.exception("could not start job %s", job_id)
            if self.deployment_mode:
                error = f"could not create a flow run of deployment {self.settings.deployment!r}: {exc}"
            else:
                error = f"could not hand the job to the engine: {exc}"
            self._store_terminal(
                job_id,
                [
                    PipelineError(
                        job_id=job_id, stage_index=None, plugin=None, error=error, error_type=EndReason.LAUNCH_ERROR
                    ),
                    JobStatusEvent(
                        job_id=job_id,
                        status="failed",
                        envelope=outcome.not_started(
                            outcome.pending_reports(raw_stages(job["pipeline"])),
                            error=error,
                            error_type=EndReason.LAUNCH_ERROR,
                        ).to_dict(),
                    ),
                ],
            )
            return
        pid = self._engine_pid
        proc = EngineJobHandle(job_id, client, pid, self._engine_created)
        store.set_launched(job_id, pid, proc.create_time)
        self.procs[job_id] = proc
        log.info("job %s runs on the engine (pid %s)", job_id, pid)

    def _running_engine(self) -> EngineClient:
        """The engine client of the last launch while its process lives (no status round trip per
        job), else :meth:`engine`."""
        if self._engine is not None and pid_alive(self._engine_pid, self._engine_created):
            return self._engine
        return self.engine()

    def _submit(self, client: EngineClient, job: LaunchedJob) -> None:
        client.submit(
            job["id"],
            job["pipeline"],
            job["input"] or {},
            api_url=self.target.api_url,
            ingest_token=self.target.ingest_token,
        )

    def _launch_flow_run(self, job: LaunchedJob) -> None:
        settings = self.settings
        batch_id = job.get("batch_id")
        parent = self.store.batch_flow_run_id(batch_id) if batch_id else None
        run = DeploymentRun.start(
            settings.deployment,
            job_id=job["id"],
            pipeline=job["pipeline"],
            input_data=job["input"] or {},
            poll_interval_s=settings.flow_run_poll_s,
            parent_flow_run_id=parent,  # a child run of its batch's
        )
        self.store.set_launched(job["id"], None, None, flow_run_id=run.flow_run_id)
        self.procs[job["id"]] = run
        log.info("job %s runs as flow run %s of %s", job["id"], run.flow_run_id, settings.deployment)

    def _store_terminal(self, job_id: str, batch: list[Event]) -> None:
        self.store.record(batch)

    def _import_spool(self) -> int:
        return import_spool(self.settings.spool_dir, self.store.record)

    def _reconcile(self, job_id: str, end: JobEnd | None) -> None:
        store = self.store
        job = store.get_job(job_id)
        if job is None or store.has_terminal(job_id):
            return
        run = self.ended_runs.pop(job_id, None)
        ended_as = run.final_reason() if run is not None else None
        if ended_as is not None:
            reason = f"its flow run {job.get('flow_run_id')} ended without reporting a result: {ended_as}"
        elif end is not None and end.reason:
            reason = end.reason
        elif end is None or end.status == "crashed":
            reason = engine_gone_reason(job.get("pid"))
        else:
            reason = f"the engine ended the job {end.status} without reporting its result"
        batch: list[Event]
        try:
            batch = list(
                reconcile_crash(
                    job_id,
                    reason=reason,
                    flow_run_id=job.get("flow_run_id"),
                    pipeline=job["pipeline"],
                    events=store.event_dicts(job_id),
                    settings=self.settings,
                )
            )
        except Exception as exc:
            log.exception("reconcile_crash failed for %s", job_id)
            batch = [
                PipelineError(
                    job_id=job_id, stage_index=None, plugin=None, error=reason, error_type=EndReason.FLOW_RUN_CRASHED
                ),
                JobStatusEvent(
                    job_id=job_id,
                    status="crashed",
                    flow_run_id=job.get("flow_run_id"),
                    envelope=outcome.failed(
                        outcome.pending_reports(raw_stages(job["pipeline"])),
                        error=f"{reason} ({exc})",
                        error_type=EndReason.FLOW_RUN_CRASHED,
                        stage_failed=None,
                    ).to_dict(),
                ),
            ]
        if job.get("cancel_requested"):
            batch = [self._as_cancelled(e) for e in batch]
            flow_run_id = job.get("flow_run_id")
            if flow_run_id:
                try:
                    mark_flow_run(flow_run_id, "cancelled", CANCELLED_BY_USER)
                except Exception:
                    log.warning("could not mark flow run %s cancelled", flow_run_id)
        log.warning("job %s: %s", job_id, reason)
        self._store_terminal(job_id, batch)

    @staticmethod
    def _as_cancelled(event: Event) -> Event:
        if isinstance(event, JobStatusEvent):
            envelope = outcome.as_cancelled(event.envelope or {}, CANCELLED_BY_USER)
            return event.model_copy(update={"status": "cancelled", "envelope": envelope})
        if isinstance(event, PipelineError):
            return event.model_copy(update={"error": CANCELLED_BY_USER, "error_type": EndReason.CANCELLED.value})
        return event

    # --- cancel ----------------------------------------------------------------------------------
    async def cancel(self, job_id: str, by: str | None = None) -> None:
        """Cancel a job: a queued one at once, a running one in the engine (or its flow run); KeyError
        for a job the store does not have. ``by``: the name of the token that asked (kept as the
        job's ``cancelled_by``)."""
        store = self.store
        async with self._lock:
            job = await to_thread.run_sync(store.get_job, job_id)
            if job is None:
                raise KeyError(job_id)
            if outcome.is_terminal(job["status"]):
                return
            await to_thread.run_sync(store.set_cancel_requested, job_id, by)
            if job["source"] == "external":
                return  # run elsewhere: nothing here to signal
            if job["launched_at"] is None:
                envelope = outcome.not_started(
                    outcome.pending_reports(raw_stages(job["pipeline"])),
                    error="cancelled by the user before it started",
                    error_type=EndReason.CANCELLED,
                ).to_dict()
                ending: list[Event] = [JobStatusEvent(job_id=job_id, status="cancelled", envelope=envelope)]
                await to_thread.run_sync(self._store_terminal, job_id, ending)
            else:
                proc = self.procs.get(job_id)
                if proc is not None:
                    task = asyncio.create_task(to_thread.run_sync(proc.cancel, self.cancel_grace_s))
                    self._cancel_tasks.add(task)
                    task.add_done_callback(self._cancel_done)
                elif job_id not in self.ended:
                    self.ended[job_id] = (None, time.monotonic())

    def _cancel_done(self, task: asyncio.Task[object]) -> None:
        self._cancel_tasks.discard(task)
        self.wake()
