"""Deployment mode: a job is a flow run of the ``pipeline`` deployment that a Prefect worker runs.

The API creates the flow run with :func:`prefect.deployments.run_deployment` (the job id, pipeline
and input as parameters; the job id as idempotency key, so a relaunch never makes a second run) and
watches it as a :class:`~forgeflow.jobs.handle.JobHandle`: :meth:`DeploymentRun.poll` says how the
job ended once Prefect says its flow run has, with the state's message as the reason (why a worker
crashed it, say).
The flow run itself sends the job's messages to the API's ingest endpoint, from whichever host runs it.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING
from uuid import UUID

from forgeflow.canonical import JsonObject
from forgeflow.exit_codes import JobEnding
from forgeflow.jobs.flow_runs import mark_flow_run, prefect_client
from forgeflow.jobs.handle import JobEnd

if TYPE_CHECKING:
    from prefect.client.schemas.objects import State

log = logging.getLogger("forgeflow.jobs.deployment")

#: How a job ended, by its flow run's final state type.
ENDING_OF_STATE: dict[str, JobEnding] = {
    "COMPLETED": "succeeded",
    "FAILED": "failed",
    "CRASHED": "crashed",
    "CANCELLED": "cancelled",
}


class DeploymentRun:
    """One job's flow run of a deployment, watched through the Prefect API."""

    def __init__(self, job_id: str, flow_run_id: str, poll_interval_s: float = 1.0) -> None:
        self.job_id = job_id
        self.flow_run_id = flow_run_id
        self.poll_interval_s = poll_interval_s
        self._end: JobEnd | None = None
        self._next_read = 0.0
        self._claimed_at: float | None = None  # when a worker first took the run (left Scheduled)
        self.host_lost = False  # ended by :meth:`lost`: nothing more will come from its host

    @classmethod
    def start(
        cls,
        deployment: str,
        *,
        job_id: str,
        pipeline: JsonObject,
        input_data: JsonObject,
        poll_interval_s: float = 1.0,
        parent_flow_run_id: str | None = None,
    ) -> DeploymentRun:
        """Create the job's flow run (Scheduled now; a worker of the deployment's pool picks it up).
        With ``parent_flow_run_id`` (a batch's flow run) it is a child run of that one: the Prefect
        UI shows it under the batch, as ``run_deployment(as_subflow=True)`` inside it would."""
        from prefect.client.schemas.objects import FlowRun
        from prefect.deployments import run_deployment

        parameters: JsonObject = {"pipeline": pipeline, "input": input_data, "job_id": job_id}
        if parent_flow_run_id is not None:
            return cls(job_id, _child_flow_run(deployment, parameters, job_id, parent_flow_run_id), poll_interval_s)
        with prefect_client():  # run_deployment makes its own client, with these settings
            flow_run = run_deployment(
                deployment,
                parameters=parameters,
                flow_run_name=f"job-{job_id}",
                timeout=0,
                as_subflow=False,
                idempotency_key=f"forgeflow-job-{job_id}",
                tags=["forgeflow"],
            )
        assert isinstance(flow_run, FlowRun)  # run_deployment called from sync code returns the flow run
        return cls(job_id, str(flow_run.id), poll_interval_s)

    def poll(self) -> JobEnd | None:
        """How the job ended, by its flow run's final state (reason: the state and its message), or
        None while it has not (read from Prefect at most every ``poll_interval_s``; None too while
        Prefect cannot answer)."""
        if self._end is not None or time.monotonic() < self._next_read:
            return self._end
        self._next_read = time.monotonic() + self.poll_interval_s
        try:
            with prefect_client() as client:
                state = client.read_flow_run(UUID(self.flow_run_id)).state
        except Exception as exc:
            log.warning("could not read flow run %s of job %s: %s", self.flow_run_id, self.job_id, exc)
            return None
        if state is not None and self._claimed_at is None and not state.is_scheduled():
            self._claimed_at = time.monotonic()
        if state is None or not state.is_final():
            return None
        self._end = JobEnd(ENDING_OF_STATE.get(state.type.value, "crashed"), self._describe(state))
        return self._end

    def claimed_for(self) -> float:
        """Seconds since a worker took the run (0 while it waits for one: no host to lose yet)."""
        return 0.0 if self._claimed_at is None else time.monotonic() - self._claimed_at

    def final_reason(self) -> str | None:
        """How the flow run ended, read again (a moment after :meth:`poll` saw it end, the host may
        have had the last word, a Crashed after a Failed, say)."""
        try:
            with prefect_client() as client:
                state = client.read_flow_run(UUID(self.flow_run_id)).state
        except Exception:
            return self._reason()
        return self._describe(state) if state is not None and state.is_final() else self._reason()

    def _reason(self) -> str | None:
        return None if self._end is None else self._end.reason

    @staticmethod
    def _describe(state: State[object]) -> str:
        return f"{state.name} ({state.message})" if state.message else str(state.name)

    def lost(self, reason: str) -> None:
        """The job's host stopped answering (no heartbeat): nobody will finish the flow run, so it is
        marked Crashed with ``reason`` and counts as ended."""
        mark_flow_run(self.flow_run_id, "crashed", reason)
        self.host_lost = True
        self._end = JobEnd("crashed", f"Crashed ({reason})")

    def cancel(self, grace_s: float = 10.0) -> JobEnd | None:
        """Ask Prefect to cancel the flow run (its worker stops it; the flow's cancellation hook ends
        the job), then wait up to ``grace_s`` for it to end."""
        from prefect.states import Cancelled, Cancelling

        try:
            with prefect_client() as client:
                state = client.read_flow_run(UUID(self.flow_run_id)).state
                # A run no worker has started yet has nothing to stop: it is cancelled at once.
                running = state is not None and state.is_running()
                ending = Cancelling if running else Cancelled
                client.set_flow_run_state(self.flow_run_id, ending(message="cancelled by request"), force=True)
        except Exception as exc:
            log.warning("could not cancel flow run %s of job %s: %s", self.flow_run_id, self.job_id, exc)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            self._next_read = 0.0
            if (end := self.poll()) is not None:
                return end
            time.sleep(min(self.poll_interval_s, 0.5))
        return None


def _child_flow_run(deployment: str, parameters: JsonObject, job_id: str, parent_flow_run_id: str) -> str:
    """Create the job's flow run of ``deployment`` as a child of flow run ``parent_flow_run_id``: a
    task run in the parent stands for it (what ``run_deployment(as_subflow=True)`` makes)."""
    from prefect import Task
    from prefect.states import Pending, Scheduled

    with prefect_client() as client:
        found = client.read_deployment_by_name(deployment)
        stand_in: Task[[], None] = Task(name=f"job-{job_id}", fn=lambda: None)
        task_run = client.create_task_run(
            task=stand_in, flow_run_id=UUID(parent_flow_run_id), dynamic_key=job_id, state=Pending()
        )
        flow_run = client.create_flow_run_from_deployment(
            found.id,
            parameters=parameters,
            state=Scheduled(),
            name=f"job-{job_id}",
            tags=["forgeflow", "forgeflow-batch"],
            idempotency_key=f"forgeflow-job-{job_id}",
            parent_task_run_id=task_run.id,
        )
    return str(flow_run.id)
