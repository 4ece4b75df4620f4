"""Deployment mode: a job is a flow run of the ``pipeline`` deployment that a Prefect worker runs.

The API creates the flow run with :func:`prefect.deployments.run_deployment` (the job id, pipeline
and input as parameters; the job id as idempotency key, so a relaunch never makes a second run) and
watches it like a job process: :meth:`DeploymentRun.poll` gives an exit code once Prefect says the
flow run has ended, :attr:`DeploymentRun.reason` the state's message (why a worker crashed it).
The flow run itself sends the job's messages to the API's ingest endpoint, from whichever host runs it.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

log = logging.getLogger("forgeflow.jobs.deployment")

#: Exit codes a flow run's final state stands for (as a job process's would).
EXIT_CODES = {"COMPLETED": 0, "FAILED": 1, "CRASHED": -1, "CANCELLED": -2}


@cache
def prefect_tls_context() -> ssl.SSLContext:
    """The process's TLS context for the Prefect API, as Prefect's client would make it from its
    settings (``PREFECT_API_TLS_INSECURE_SKIP_VERIFY``, ``PREFECT_API_SSL_CERT_FILE``, else certifi),
    made once: loading the CA bundle is tens of ms of CPU, seconds on a busy host."""
    import certifi
    from prefect.settings import PREFECT_API_SSL_CERT_FILE, PREFECT_API_TLS_INSECURE_SKIP_VERIFY

    if PREFECT_API_TLS_INSECURE_SKIP_VERIFY.value():
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=PREFECT_API_SSL_CERT_FILE.value() or certifi.where())


@contextmanager
def prefect_client() -> Iterator[Any]:
    """A synchronous Prefect client for ``PREFECT_API_URL`` as it is now (the service may set it
    after Prefect froze its settings at import).

    Made directly, with the process's one TLS context: ``get_client`` under ``temporary_settings``
    rebuilds Prefect's settings and loads the CA bundle, ~0.1 s of CPU per client, which a launcher
    reading each job's flow run every second paid per read (0.5 ms now). Still one client per use:
    one kept between uses met connections the server had closed while idle."""
    from prefect.client.orchestration import SyncPrefectClient, get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY

    url = os.environ.get("PREFECT_API_URL")
    if not url:  # Prefect's own choice (its settings' URL, or an ephemeral server)
        with get_client(sync_client=True) as client:
            yield client
        return
    with SyncPrefectClient(
        url,
        auth_string=PREFECT_API_AUTH_STRING.value(),
        api_key=PREFECT_API_KEY.value(),
        httpx_settings={"verify": prefect_tls_context()},
    ) as client:
        yield client


class DeploymentRun:
    """One job's flow run of a deployment, watched through the Prefect API."""

    def __init__(self, job_id: str, flow_run_id: str, poll_interval_s: float = 1.0) -> None:
        self.job_id = job_id
        self.flow_run_id = flow_run_id
        self.poll_interval_s = poll_interval_s
        self.reason: str | None = None  # the final state's message
        self._code: int | None = None
        self._next_read = 0.0
        self._claimed_at: float | None = None  # when a worker first took the run (left Scheduled)
        self.host_lost = False  # ended by :meth:`lost`: nothing more will come from its host
        self.create_time = None  # no process on this host

    @classmethod
    def start(
        cls,
        deployment: str,
        *,
        job_id: str,
        pipeline: dict[str, Any],
        input_data: dict[str, Any],
        poll_interval_s: float = 1.0,
        parent_flow_run_id: str | None = None,
    ) -> DeploymentRun:
        """Create the job's flow run (Scheduled now; a worker of the deployment's pool picks it up).
        With ``parent_flow_run_id`` (a batch's flow run) it is a child run of that one: the Prefect
        UI shows it under the batch, as ``run_deployment(as_subflow=True)`` inside it would."""
        from prefect.deployments import run_deployment

        parameters = {"pipeline": pipeline, "input": input_data, "job_id": job_id}
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
        return cls(job_id, str(flow_run.id), poll_interval_s)  # type: ignore[union-attr]  # sync: a FlowRun

    def poll(self) -> int | None:
        """The exit code the flow run's final state stands for, or None while it has not ended
        (read from Prefect at most every ``poll_interval_s``; None too while Prefect cannot answer)."""
        if self._code is not None or time.monotonic() < self._next_read:
            return self._code
        self._next_read = time.monotonic() + self.poll_interval_s
        try:
            with prefect_client() as client:
                state = client.read_flow_run(self.flow_run_id).state
        except Exception as exc:
            log.warning("could not read flow run %s of job %s: %s", self.flow_run_id, self.job_id, exc)
            return None
        if state is not None and self._claimed_at is None and not state.is_scheduled():
            self._claimed_at = time.monotonic()
        if state is None or not state.is_final():
            return None
        self.reason = self._describe(state)
        self._code = EXIT_CODES.get(state.type.value, -1)
        return self._code

    def claimed_for(self) -> float:
        """Seconds since a worker took the run (0 while it waits for one: no host to lose yet)."""
        return 0.0 if self._claimed_at is None else time.monotonic() - self._claimed_at

    def final_reason(self) -> str | None:
        """How the flow run ended, read again (a moment after :meth:`poll` saw it end, the host may
        have had the last word, a Crashed after a Failed, say)."""
        try:
            with prefect_client() as client:
                state = client.read_flow_run(self.flow_run_id).state
        except Exception:
            return self.reason
        return self._describe(state) if state is not None and state.is_final() else self.reason

    @staticmethod
    def _describe(state: Any) -> str:
        return f"{state.name} ({state.message})" if state.message else str(state.name)

    def lost(self, reason: str) -> None:
        """The job's host stopped answering (no heartbeat): nobody will finish the flow run, so it is
        marked Crashed with ``reason`` and counts as ended."""
        from forgeflow.jobs.supervise import mark_flow_run

        mark_flow_run(self.flow_run_id, "crashed", reason)
        self.host_lost = True
        self.reason = f"Crashed ({reason})"
        self._code = EXIT_CODES["CRASHED"]

    def cancel(self, grace_s: float = 10.0) -> int | None:
        """Ask Prefect to cancel the flow run (its worker stops it; the flow's cancellation hook ends
        the job), then wait up to ``grace_s`` for it to end."""
        from prefect.states import Cancelled, Cancelling

        try:
            with prefect_client() as client:
                state = client.read_flow_run(self.flow_run_id).state
                # A run no worker has started yet has nothing to stop: it is cancelled at once.
                running = state is not None and state.is_running()
                ending = Cancelling if running else Cancelled
                client.set_flow_run_state(self.flow_run_id, ending(message="cancelled by request"), force=True)
        except Exception as exc:
            log.warning("could not cancel flow run %s of job %s: %s", self.flow_run_id, self.job_id, exc)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            self._next_read = 0.0
            if self.poll() is not None:
                return self._code
            time.sleep(min(self.poll_interval_s, 0.5))
        return None


def _child_flow_run(deployment: str, parameters: dict[str, Any], job_id: str, parent_flow_run_id: str) -> str:
    """Create the job's flow run of ``deployment`` as a child of flow run ``parent_flow_run_id``: a
    task run in the parent stands for it (what ``run_deployment(as_subflow=True)`` makes)."""
    from uuid import UUID

    from prefect import Task
    from prefect.states import Pending, Scheduled

    with prefect_client() as client:
        found = client.read_deployment_by_name(deployment)
        stand_in: Task[Any, None] = Task(name=f"job-{job_id}", fn=lambda: None)
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
