"""What the launcher (:mod:`forgeflow.jobs.launcher`) asks of the job store, and where its jobs send
their events: declared here, below the API, so the launcher works on any store that keeps these
promises (the API's SQLite/PostgreSQL store is the one there is: ``forgeflow.api.launching``).

The store owns every write of a job's launch bookkeeping (``launching`` claims, the engine's pid,
the flow run), and :meth:`LaunchStore.record` stores events exactly as the ingest endpoint does
(deduplicated, sequenced, published to WebSocket clients).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Protocol, TypedDict

from forgeflow.canonical import JsonObject
from forgeflow.pipeline.outcome import JobStatus

if TYPE_CHECKING:
    from forgeflow.events.models import Event
    from forgeflow.settings import Settings

__all__ = ["LaunchStore", "LaunchTarget", "LaunchedJob"]


class LaunchedJob(TypedDict):
    """The columns of a stored job the launcher reads (the store's own rows have more)."""

    id: str
    status: JobStatus
    source: str
    pipeline: JsonObject
    input: JsonObject
    flow_run_id: str | None
    pid: int | None
    pid_create_time: float | None
    launched_at: datetime | None
    cancel_requested: bool
    last_seq: int
    batch_id: str | None


class LaunchStore(Protocol):
    """The job store, as the launcher uses it."""

    def jobs_to_launch(self, limit: int) -> Sequence[LaunchedJob]:
        """Queued jobs to start now, oldest first, at most ``limit`` (and within each batch's bound)."""
        ...

    def launched_active_jobs(self) -> Sequence[LaunchedJob]:
        """Jobs launched and not ended: what a restarted launcher watches again or reconciles."""
        ...

    def claim_launch(self, job_id: str) -> bool:
        """Mark the queued job ``launching``; False when another launch has it (never started twice)."""
        ...

    def set_launched(
        self, job_id: str, pid: int | None, create_time: float | None, *, flow_run_id: str | None = None
    ) -> None:
        """Keep where the job runs: the engine's pid (and its start time), or its flow run."""
        ...

    def reset_launch(self, job_id: str) -> None:
        """Make a job whose launch was cut off queued again."""
        ...

    def silent_jobs(self, job_ids: Iterable[str], silent_s: float) -> Sequence[LaunchedJob]:
        """Those of ``job_ids`` whose host sent no heartbeat for ``silent_s``."""
        ...

    def get_job(self, job_id: str) -> LaunchedJob | None: ...

    def has_terminal(self, job_id: str) -> bool:
        """Whether the job's terminal status is stored."""
        ...

    def set_cancel_requested(self, job_id: str, by: str | None = None) -> None: ...

    def event_dicts(self, job_id: str) -> list[JsonObject]:
        """The job's stored events, in order (what reconciling a crash reads)."""
        ...

    def record(self, events: list[Event]) -> int:
        """Store ``events`` as the ingest endpoint does (and publish them); how many were new."""
        ...

    def batch_flow_run_id(self, batch_id: str) -> str | None:
        """The flow run of the batch ``batch_id`` (its jobs' flow runs are its children), if any."""
        ...


@dataclass(frozen=True)
class LaunchTarget:
    """Where launched jobs run and report: the settings (engine or deployment, limits), the API
    their events go to with its ingest token, and the Prefect server they use."""

    settings: Settings
    api_url: str
    ingest_token: str
    prefect_api_url: str | None
