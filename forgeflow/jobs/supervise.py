"""A job as its own process: how the API launches pipelines outside its own process.

``python -m forgeflow.jobs.supervise --job-id ID --spec FILE`` runs one job as one Prefect flow run and
sends its events to the API (``FORGEFLOW_API_URL``, ``FORGEFLOW_INGEST_TOKEN``). Exit codes:
0 succeeded, 1 failed, 2 invalid, 3 cancelled; anything else means it crashed.

SIGTERM cancels: the running stage's worker is killed, a ``cancelled`` message is sent and the
flow run is marked Cancelled. SIGKILL runs nothing at all, so :func:`reconcile_crash` builds the
terminal messages from what the job left behind (its events and its checkpoint) and marks the
flow run Crashed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from forgeflow.events.models import Event, abnormal_end
from forgeflow.events.reduce import replay
from forgeflow.pipeline import outcome
from forgeflow.processes import pid_alive, process_create_time
from forgeflow.settings import Settings, get_settings

log = logging.getLogger(__name__)

EXIT_SUCCEEDED, EXIT_FAILED, EXIT_INVALID, EXIT_CANCELLED = 0, 1, 2, 3
EXIT_STATUS = {EXIT_SUCCEEDED: "succeeded", EXIT_FAILED: "failed", EXIT_INVALID: "failed", EXIT_CANCELLED: "cancelled"}


@dataclass(frozen=True)
class JobSpec:
    job_id: str
    pipeline: dict[str, Any]
    input: dict[str, Any]


class JobCancelled(BaseException):
    """Raised in the job's main thread by SIGTERM: unwinds the stage and the flow run."""


class JobProcess:
    """A job running in its own process group, started by :meth:`start` or found by :meth:`attach`."""

    def __init__(
        self, job_id: str, pid: int, popen: subprocess.Popen[bytes] | None = None, create_time: float | None = None
    ) -> None:
        self.job_id = job_id
        self.pid = pid
        self._popen = popen
        self._create_time = create_time
        self._returncode: int | None = None

    @classmethod
    def start(
        cls,
        spec: JobSpec,
        *,
        api_url: str,
        ingest_token: str,
        env: dict[str, str] | None = None,
        settings: Settings | None = None,
    ) -> JobProcess:
        settings = settings or get_settings()
        job_dir = settings.jobs_dir / spec.job_id
        job_dir.mkdir(parents=True, exist_ok=True)
        spec_path = job_dir / "spec.json"
        spec_path.write_text(json.dumps(asdict(spec)), encoding="utf-8")
        child_env = {
            **os.environ,
            **(env or {}),
            "FORGEFLOW_API_URL": api_url,
            "FORGEFLOW_INGEST_TOKEN": ingest_token,
            "FORGEFLOW_HOME": str(settings.home),
        }
        with (job_dir / "job.log").open("ab") as log_file:
            popen = subprocess.Popen(
                [sys.executable, "-m", "forgeflow.jobs.supervise", "--job-id", spec.job_id, "--spec", str(spec_path)],
                env=child_env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return cls(spec.job_id, popen.pid, popen, process_create_time(popen.pid))

    @classmethod
    def attach(cls, job_id: str, pid: int, create_time: float | None = None) -> JobProcess:
        """Watch a job process started by an earlier API process (its exit code is then unknown)."""
        return cls(job_id, pid, None, create_time)

    @property
    def create_time(self) -> float | None:
        return self._create_time

    def poll(self) -> int | None:
        """The exit code, or None while it runs (-1 for an attached process that is gone)."""
        if self._popen is not None:
            return self._popen.poll()
        if self._returncode is None and not self._alive():
            self._returncode = -1
        return self._returncode

    def _alive(self) -> bool:
        return pid_alive(self.pid, self._create_time)

    def wait(self, timeout: float | None = None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(0.05)
        return code

    def cancel(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM the job (it cancels cleanly), SIGKILL its whole group after ``grace_s``."""
        self._signal(signal.SIGTERM)
        code = self.wait(grace_s)
        if code is None:
            self.kill()
            code = self.wait(5.0)
        return code

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def checkpoint_path(settings: Settings, job_id: str) -> Path:
    """Where a job's partial results are kept while it runs (read after a crash)."""
    return settings.jobs_dir / job_id / "checkpoint.json"


def read_checkpoint(settings: Settings, job_id: str) -> dict[str, Any]:
    path = checkpoint_path(settings, job_id)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def reconcile_crash(
    job_id: str,
    *,
    reason: str,
    flow_run_id: str | None,
    pipeline: dict[str, Any],
    events: list[dict[str, Any]],
    settings: Settings | None = None,
) -> list[Event]:
    """Terminal messages for a job whose process died without sending them.

    The running stage (started, never ended) gets a ``pipeline_error``; the job gets a ``crashed``
    status whose envelope holds the partial result of its checkpoint. The Prefect flow run, which
    the server still believes Running, is marked Crashed.
    """
    settings = settings or get_settings()
    from forgeflow.pipeline.validation import parse_definition

    try:
        stages = parse_definition(pipeline).stages
    except Exception:
        stages = []
    reports = replay(outcome.pending_reports(stages), events)
    envelope = outcome.ended_abnormally(
        reports,
        status="crashed",
        error=reason,
        error_type=outcome.EndReason.FLOW_RUN_CRASHED,
        partial_result=read_checkpoint(settings, job_id).get("partial_result", {}),
    )
    out: list[Event] = list(
        abnormal_end(
            job_id, status="crashed", envelope=envelope, stage=outcome.running_stage(reports), flow_run_id=flow_run_id
        )
    )
    if flow_run_id:
        mark_flow_run(flow_run_id, "crashed", reason)
    return out


def mark_flow_run(flow_run_id: str, status: str, message: str) -> None:
    """Force the Prefect flow run into Crashed or Cancelled (best effort: Prefect may be down)."""
    try:
        from prefect.client.schemas.objects import State
        from prefect.states import Cancelled, Crashed

        from forgeflow.jobs.deployment import prefect_client

        state: State[Any] = Crashed(message=message) if status == "crashed" else Cancelled(message=message)
        with prefect_client() as client:
            client.set_flow_run_state(flow_run_id, state, force=True)
    except Exception as exc:  # the job's terminal message matters more than Prefect's bookkeeping
        log.warning("could not mark flow run %s %s: %s", flow_run_id, status, exc)


def run_job(spec: JobSpec, settings: Settings | None = None) -> int:
    """Run one job in this process with an HttpSink; the exit code says how it ended."""
    from forgeflow.jobs.executor import PipelineExecutor
    from forgeflow.jobs.stages import Services

    settings = settings or get_settings()
    services = Services.from_settings(settings)

    def on_sigterm(signum: int, frame: Any) -> None:
        raise JobCancelled()

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        envelope = PipelineExecutor(services).execute(spec.pipeline, spec.input, spec.job_id)
    except JobCancelled:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        flow_run_id = _flow_run_id_of(spec.job_id)
        if flow_run_id:
            mark_flow_run(flow_run_id, "cancelled", "cancelled by the user")
        return EXIT_CANCELLED
    finally:
        services.close()
    if envelope.get("ok"):
        return EXIT_SUCCEEDED
    return EXIT_INVALID if envelope.get("error_type") == "PipelineValidationError" else EXIT_FAILED


def _flow_run_id_of(job_id: str) -> str | None:
    from forgeflow.jobs.flow import last_flow_run_id

    return last_flow_run_id(job_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m forgeflow.jobs.supervise", description=__doc__)
    parser.add_argument("--job-id", required=True)
    parser.add_argument("--spec", required=True, type=Path)
    args = parser.parse_args(argv)
    data = json.loads(args.spec.read_text(encoding="utf-8"))
    spec = JobSpec(job_id=args.job_id, pipeline=data["pipeline"], input=data.get("input") or {})
    return run_job(spec)


if __name__ == "__main__":
    sys.exit(main())
