"""The local launcher: runs queued jobs as job processes and watches them.

* Queued jobs start, oldest first, up to ``max_concurrent_jobs`` at once, each as
  ``python -m forgeflow.flows.job`` (its own process group: one Prefect flow run) that posts its
  events to the ingest endpoint. The pid is stored before anything else happens to the job.
* A process that ends without a stored terminal status (SIGKILL, OOM killer, interpreter crash)
  gets its terminal messages from ``reconcile_crash`` after a short grace period (and after the
  spool folder is imported, in case its last events were spooled rather than delivered).
* Cancelling a queued job stores its ``cancelled`` status at once; a running one is sent SIGTERM
  (the job cancels its flow run and kills the running stage), then SIGKILL after a grace period.
* On start-up nothing is lost: spooled events are imported, running jobs whose process is alive
  are re-attached by pid, the others are reconciled, and queued jobs are launched.

The launcher never stops job processes when the API shuts down: a restarted API re-attaches them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from anyio import to_thread

from forgeflow.api.deps import ApiState
from forgeflow.flows.events import Event, JobStatusEvent, PipelineError, parse_event

log = logging.getLogger(__name__)

_SPOOL_NAME = re.compile(r"^(\d+)-[0-9a-f]+\.jsonl(?:\.claimed-(\d+))?$")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        import psutil

        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE
    except Exception:
        return False


def import_spool(state: ApiState, *, skip_live_writers: bool = True) -> int:
    """Store the events of spool files whose writer is gone, deleting each file once stored."""
    spool = state.settings.spool_dir
    if not spool.is_dir():
        return 0
    stored = 0
    me = os.getpid()
    for path in sorted(spool.iterdir(), key=lambda p: p.stat().st_mtime if p.exists() else 0):
        match = _SPOOL_NAME.match(path.name)
        if not match:
            continue
        writer = int(match.group(1))
        claimer = int(match.group(2)) if match.group(2) else None
        if claimer is not None and claimer != me and _pid_alive(claimer):
            continue  # another process is delivering it right now
        if claimer is None and skip_live_writers and writer != me and _pid_alive(writer):
            continue  # its writer is alive and delivers it itself
        claimed = path if claimer == me else path.with_name(path.name.split(".claimed-")[0] + f".claimed-{me}")
        try:
            if claimed != path:
                path.rename(claimed)
        except OSError:
            continue
        stored += _import_file(state, claimed)
    return stored


def _import_file(state: ApiState, path: Path) -> int:
    from forgeflow.flows.sinks import read_spool

    good: list[Event] = []
    bad: list[str] = []
    for data in read_spool(path):
        try:
            good.append(parse_event(data))
        except Exception as exc:
            bad.append(f"{exc}: {data!r}"[:2000])
    stored = 0
    for i in range(0, len(good), 200):
        stored += len(
            state.store.ingest(good[i : i + 200], publish=state.publish, resolve_plugin=state.resolve_plugin)
        )
    if bad:
        log.error("spool file %s had %d unreadable events; kept in %s.bad", path.name, len(bad), path.name)
        path.with_name(path.name + ".bad").write_text("\n".join(bad), encoding="utf-8")
    path.unlink(missing_ok=True)
    return stored


class Launcher:
    def __init__(self, state: ApiState, *, exit_grace_s: float = 5.0, cancel_grace_s: float = 10.0,
                 poll_interval_s: float = 0.25) -> None:
        self.state = state
        self.exit_grace_s = exit_grace_s
        self.cancel_grace_s = cancel_grace_s
        self.poll_interval_s = poll_interval_s
        self.procs: dict[str, Any] = {}  # job_id -> JobProcess
        self.ended: dict[str, tuple[int | None, float]] = {}  # job_id -> (exit code, monotonic time)
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._cancel_tasks: set[asyncio.Task[Any]] = set()
        self.enabled = True

    # --- life ------------------------------------------------------------------------------------
    async def start(self) -> None:
        await to_thread.run_sync(self._recover)
        self._task = asyncio.create_task(self._run(), name="forgeflow-launcher")

    async def stop(self) -> None:
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
    def running_count(self) -> int:
        return len(self.procs)

    def _recover(self) -> None:
        """Import spooled events, re-attach live job processes, mark the dead ones for reconciliation."""
        try:
            count = import_spool(self.state)
            if count:
                log.info("imported %d spooled events", count)
        except Exception:
            log.exception("importing the spool failed")
        from forgeflow.flows.job import JobProcess

        for job in self.state.store.launched_active_jobs():
            job_id, pid = job["id"], job["pid"]
            if pid is None:
                # Marked launching, but the API died before the pid was stored: the process may
                # or may not exist; if it sent nothing, launch it again, else reconcile.
                if job["last_seq"] <= 1:
                    self.state.store.set_launched(job_id, None, None)
                    self._reset_launch(job_id)
                else:
                    self.ended[job_id] = (None, time.monotonic() - self.exit_grace_s)
                continue
            proc = JobProcess.attach(job_id, pid, job.get("pid_create_time"))
            if proc.poll() is None:
                log.info("re-attached job %s (pid %s)", job_id, pid)
                self.procs[job_id] = proc
            else:
                self.ended[job_id] = (None, time.monotonic() - self.exit_grace_s + 1.0)

    def _reset_launch(self, job_id: str) -> None:
        from sqlalchemy import update

        from forgeflow.api.store.tables import jobs

        with self.state.store.engine.begin() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(launched_at=None, pid=None))

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
            for job_id, proc in list(self.procs.items()):
                code = proc.poll()
                if code is None:
                    continue
                del self.procs[job_id]
                self.ended[job_id] = (code, time.monotonic())
                await to_thread.run_sync(self.state.store.set_exit_code, job_id, code)
            for job_id, (code, since) in list(self.ended.items()):
                if await to_thread.run_sync(self.state.store.has_terminal, job_id):
                    del self.ended[job_id]
                    continue
                waited = time.monotonic() - since
                if waited < self.exit_grace_s:
                    if waited > 1.0:
                        await to_thread.run_sync(import_spool, self.state)
                    continue
                del self.ended[job_id]
                await to_thread.run_sync(self._reconcile, job_id, code)
            if not self.enabled:
                return
            free = self.state.settings.max_concurrent_jobs - len(self.procs)
            if free > 0:
                for job in await to_thread.run_sync(self.state.store.jobs_to_launch, free):
                    await to_thread.run_sync(self._launch, job)

    def _launch(self, job: dict[str, Any]) -> None:
        from forgeflow.flows.job import JobProcess, JobSpec

        job_id = job["id"]
        store = self.state.store
        if not store.claim_launch(job_id):  # "launching": never started twice
            return
        env = {"PREFECT_API_URL": self.state.prefect_api_url} if self.state.prefect_api_url else {}
        try:
            proc = JobProcess.start(
                JobSpec(job_id=job_id, pipeline=job["pipeline"], input=job["input"] or {}),
                api_url=self.state.api_url,
                ingest_token=self.state.auth.ingest_token,
                env=env,
                settings=self.state.settings,
            )
        except Exception as exc:
            log.exception("could not start job %s", job_id)
            self._store_terminal(
                job_id,
                [
                    PipelineError(job_id=job_id, stage_index=None, plugin=None,
                                  error=f"could not start the job process: {exc}", error_type="LaunchError"),
                    JobStatusEvent(job_id=job_id, status="failed", envelope={
                        "ok": False, "error": f"could not start the job process: {exc}", "error_type": "LaunchError",
                        "stage_failed": None, "partial_result": {}, "stages_executed": 0,
                    }),
                ],
            )
            return
        store.set_launched(job_id, proc.pid, proc.create_time)
        self.procs[job_id] = proc
        log.info("launched job %s as pid %s", job_id, proc.pid)

    def _store_terminal(self, job_id: str, batch: list[Event]) -> None:
        self.state.store.ingest(batch, publish=self.state.publish, resolve_plugin=self.state.resolve_plugin)

    def _reconcile(self, job_id: str, code: int | None) -> None:
        store = self.state.store
        job = store.get_job(job_id)
        if job is None or store.has_terminal(job_id):
            return
        if code is None or code < 0:
            reason = (
                f"the job process (pid {job.get('pid')}) ended without reporting a result"
                + (f" (killed by signal {-code})" if code is not None and code < -1 else "")
            )
        else:
            reason = f"the job process exited with code {code} without reporting a result"
        batch: list[Event]
        try:
            from forgeflow.flows.job import reconcile_crash

            batch = list(
                reconcile_crash(
                    job_id,
                    reason=reason,
                    flow_run_id=job.get("flow_run_id"),
                    pipeline=job["pipeline"],
                    events=store.event_dicts(job_id),
                    settings=self.state.settings,
                )
            )
        except Exception as exc:
            log.exception("reconcile_crash failed for %s", job_id)
            batch = [
                PipelineError(job_id=job_id, stage_index=None, plugin=None, error=reason, error_type="FlowRunCrashed"),
                JobStatusEvent(job_id=job_id, status="crashed", flow_run_id=job.get("flow_run_id"), envelope={
                    "ok": False, "error": f"{reason} ({exc})", "error_type": "FlowRunCrashed", "stage_failed": None,
                    "partial_result": {}, "stages_executed": job.get("stages_completed") or 0,
                }),
            ]
        if job.get("cancel_requested"):
            batch = [self._as_cancelled(e) for e in batch]
            if job.get("flow_run_id"):
                try:
                    from forgeflow.flows.job import mark_flow_run

                    mark_flow_run(job["flow_run_id"], "cancelled", "cancelled by the user")
                except Exception:
                    log.warning("could not mark flow run %s cancelled", job["flow_run_id"])
        log.warning("job %s: %s", job_id, reason)
        self._store_terminal(job_id, batch)

    @staticmethod
    def _as_cancelled(event: Event) -> Event:
        if isinstance(event, JobStatusEvent):
            envelope = dict(event.envelope or {})
            envelope.update(ok=False, error="cancelled by the user", error_type="Cancelled")
            return event.model_copy(update={"status": "cancelled", "envelope": envelope})
        if isinstance(event, PipelineError):
            return event.model_copy(update={"error": "cancelled by the user", "error_type": "Cancelled"})
        return event

    # --- cancel ----------------------------------------------------------------------------------
    async def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a job: a queued one at once, a running one by signalling its process."""
        store = self.state.store
        async with self._lock:
            job = await to_thread.run_sync(store.get_job, job_id)
            if job is None:
                raise KeyError(job_id)
            from forgeflow.flows.events import TERMINAL_STATUSES

            if job["status"] in TERMINAL_STATUSES:
                return job
            await to_thread.run_sync(store.set_cancel_requested, job_id)
            if job["source"] == "external":
                return {**job, "cancel_requested": True}  # run elsewhere: nothing here to signal
            if job["launched_at"] is None:
                stages = (job["pipeline"] or {}).get("stages", [])
                envelope = {
                    "ok": False, "error": "cancelled by the user before it started", "error_type": "Cancelled",
                    "stage_failed": None, "partial_result": {}, "stages_executed": 0,
                    "stages": [
                        {"index": i, "plugin": s.get("plugin", ""), "tool": s.get("tool", ""), "status": "skipped"}
                        for i, s in enumerate(stages)
                    ],
                }
                await to_thread.run_sync(
                    self._store_terminal, job_id, [JobStatusEvent(job_id=job_id, status="cancelled", envelope=envelope)]
                )
            else:
                proc = self.procs.get(job_id)
                if proc is not None:
                    task = asyncio.create_task(to_thread.run_sync(proc.cancel, self.cancel_grace_s))
                    self._cancel_tasks.add(task)
                    task.add_done_callback(self._cancel_done)
                elif job_id not in self.ended:
                    self.ended[job_id] = (None, time.monotonic())
        return await to_thread.run_sync(store.get_job, job_id)  # type: ignore[return-value]

    def _cancel_done(self, task: asyncio.Task[Any]) -> None:
        self._cancel_tasks.discard(task)
        self.wake()
