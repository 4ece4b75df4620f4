"""``python -m forgeflow.jobs.handoff``: what ``forgeflow worker`` starts for a ForgeFlow flow run.

The flow-run command of :mod:`forgeflow.jobs.prefect_worker`. A Prefect process worker starts one
process per flow run; ``python -m prefect.engine`` would import Prefect and
ForgeFlow and load models afresh every time (2–3 s before the first stage, more with models). This
small process instead hands the flow run (``PREFECT__FLOW_RUN_ID``) to the host's engine, where
Prefect is imported, its client warm and the models loaded, and stays as the flow run's process for
the worker: it exits with the run's exit code (:func:`forgeflow.exit_codes.exit_code_for` of the job's
ending), and a SIGTERM (the worker cancelling the run) cancels
the job in the engine. The engine takes only runs of the pipeline flow: a run of another flow of the
deployments (the batch flow, ``forgeflow-batch``) is refused (409) and runs here as what its
deployment names. Without an engine on the host, or without ``FORGEFLOW_API_URL`` for its events,
it becomes ``python -m prefect.engine`` too (the run then runs in this process, cold).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from types import FrameType
from typing import NoReturn

from forgeflow.exit_codes import ExitCode, exit_code_for, is_job_ending

#: How long a cancelled job may take to end in the engine before this process gives up on it.
CANCEL_GRACE_S = 30.0
POLL_S = 0.1


def _cold_start() -> NoReturn:
    """Become ``python -m prefect.engine``: the flow run runs in this process, as Prefect would run it."""
    os.execv(sys.executable, [sys.executable, "-m", "prefect.engine"])


def main() -> ExitCode:
    from forgeflow.engine.client import EngineClient, EngineUnavailable
    from forgeflow.jobs.placement import JobOrigin, place_job
    from forgeflow.redact import install_log_redaction
    from forgeflow.settings import get_settings

    install_log_redaction()
    flow_run_id = os.environ.get("PREFECT__FLOW_RUN_ID")
    settings = get_settings()
    client = EngineClient(settings.engine_socket_path)
    if not flow_run_id:  # not started by a worker for a flow run: nothing to hand over
        _cold_start()
    engine_running = settings.use_engine and client.alive()
    if place_job(settings, JobOrigin.FLOW_RUN, engine_running=engine_running).where != "engine":
        _cold_start()
    api_url = settings.api_url
    assert api_url is not None  # place_job sends a flow run to the engine only with an API for its events
    token = settings.ingest_token.get_secret_value() if settings.ingest_token else None
    try:
        job = client.submit_flow_run(flow_run_id, api_url=api_url, ingest_token=token)
    except EngineUnavailable:  # no engine, or not a pipeline run (409): Prefect's engine runs the flow it names
        _cold_start()
    job_id = job.job_id
    cancel_by: list[float] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if not cancel_by:
            cancel_by.append(time.monotonic() + CANCEL_GRACE_S)
            try:
                client.cancel(job_id)
            except EngineUnavailable:
                pass

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while True:
        try:
            view = client.job(job_id)
        except EngineUnavailable:
            print(f"lost this host's engine while it ran job {job_id}", file=sys.stderr)
            return ExitCode.FAILED
        if is_job_ending(view.status):
            return exit_code_for(view.status)
        if cancel_by and time.monotonic() > cancel_by[0]:  # the engine did not end it in time: cancelled here
            return ExitCode.CANCELLED
        time.sleep(POLL_S)


if __name__ == "__main__":
    sys.exit(main())
