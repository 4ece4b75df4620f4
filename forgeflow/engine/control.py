"""The engine's control protocol: the bodies its socket takes and answers, one model each.

Both sides use these models: the host daemon (:mod:`forgeflow.host.server`) validates every request
body with them and builds its answers from them; :class:`~forgeflow.engine.client.EngineClient` builds
its requests from them and validates the answers. A change of the protocol is a change here, seen by
mypy on both sides. Streamed answers are NDJSON: one :class:`JobStreamLine` or :class:`CallStreamLine`
a line.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, TypeAdapter

from forgeflow.canonical import JsonObject
from forgeflow.engine.runners.base import CallResult, Progress

#: What a job is doing: waiting for a job slot, running, or how it ended.
JobState = Literal["queued", "running", "succeeded", "failed", "invalid", "cancelled", "crashed"]

#: Routes of the control socket (the paths a client asks and the daemon answers).
STATUS = "/status"
JOBS = "/jobs"
ACTIVE_JOBS = "/jobs?active=1"
CALLS = "/calls"
CALLS_WITH_PROGRESS = "/calls?progress=1"
WARM = "/warm"
OWNER = "/owner"
IDLE_STOP = "/idle-stop"
SHUTDOWN = "/shutdown"


def job_path(job_id: str) -> str:
    """``GET`` one job."""
    return f"{JOBS}/{job_id}"


def cancel_path(job_id: str) -> str:
    """``POST`` to cancel one job."""
    return f"{JOBS}/{job_id}/cancel"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SinkTarget(_Body):
    """Where a job's events go: an API's ingest endpoint."""

    api_url: str
    ingest_token: str | None = None


class SubmitJob(_Body):
    """``POST /jobs``: run a pipeline as a new job; its events go to ``sink``, or (``stream``) back
    on the answer as :class:`JobStreamLine` s."""

    job_id: str
    pipeline: JsonValue  # a pipeline as its JSON (the job's flow validates it)
    input: JsonObject = Field(default_factory=dict)
    sink: SinkTarget | None = None
    stream: bool = False


class HandOverFlowRun(_Body):
    """``POST /jobs``: run a flow run of the ``pipeline`` deployment that a Prefect worker started,
    as it is; it is cancelled when process ``handed_by`` dies."""

    flow_run_id: str
    handed_by: int | None = None
    sink: SinkTarget


#: The two bodies ``POST /jobs`` takes (told apart by ``flow_run_id``).
JOB_REQUEST: TypeAdapter[HandOverFlowRun | SubmitJob] = TypeAdapter(HandOverFlowRun | SubmitJob)


class JobView(BaseModel):
    """One job as the engine reports it (``GET /jobs/{id}``, the answer of a submit or a cancel)."""

    job_id: str
    status: JobState
    submitted_at: float
    started_at: float | None = None
    finished_at: float | None = None
    waiting_for: str | None = None


#: ``GET /jobs`` (``?active=1``: the queued and running ones): the jobs by id.
JOBS_ANSWER: TypeAdapter[dict[str, JobView]] = TypeAdapter(dict[str, JobView])


class JobCounts(BaseModel):
    running: list[JobView]
    queued: list[JobView]
    finished: int


class EngineStatus(BaseModel):
    """``GET /status``: the engine, its jobs and its life rules. The pool's own fields (``workers``,
    ``pools``, ``memory`` ...) depend on the runner and come as extra fields."""

    model_config = ConfigDict(extra="allow")

    pid: int
    started_at: float
    uptime_s: float
    idle_s: float
    runner: str
    prefect_api_url: str | None
    max_concurrent_jobs: int
    jobs: JobCounts
    devices: JsonObject  # DeviceSlots.status(): each device's slots, running and waiting tickets
    batching: JsonObject  # BatchingRunner.status()
    # the daemon's life (EngineService.life)
    started_by: str | None = None
    owner_pid: int | None = None
    idle_stop_s: float = 0.0
    idle_stop_in_s: float | None = None
    draining: bool = False
    stopping: bool = False


class JobStreamLine(BaseModel):
    """A line of a streamed job: an event as it happens, then one last line with the envelope."""

    event: JsonObject | None = None
    envelope: JsonObject | None = None
    status: JobState | None = None


class CallStreamLine(BaseModel):
    """A line of ``/calls?progress=1``: progress while the tool runs, then its result."""

    progress: Progress | None = None
    result: CallResult | None = None


class WarmRequest(_Body):
    """``POST /warm``: start a worker for each plugin ahead of its first call."""

    plugins: list[str] = Field(default_factory=list)


class WarmAnswer(BaseModel):
    started: list[str]


class OwnerRequest(_Body):
    """``POST /owner``: the engine leaves once process ``pid`` is gone and no job runs."""

    pid: int | None = None


class OwnerAnswer(BaseModel):
    owner_pid: int | None


class IdleStopRequest(_Body):
    """``POST /idle-stop``: leave after ``seconds`` without a job or call (0: never)."""

    seconds: float = Field(ge=0)


class ShutdownRequest(_Body):
    """``POST /shutdown``: leave once the running jobs end (``drain``), else now."""

    drain: bool = False


class ShutdownAnswer(BaseModel):
    draining: bool = False
    stopping: bool = False
    active_jobs: int | None = None


class ErrorAnswer(BaseModel):
    """Any refusal (4xx) or engine bug (500)."""

    error: str
