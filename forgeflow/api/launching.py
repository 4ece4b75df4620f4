"""The API's launcher: :class:`~forgeflow.jobs.launcher.Launcher` wired to the API's store, its
event hub (what the launcher records reaches WebSocket clients) and its batches."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from forgeflow.api.batches import batch_service
from forgeflow.api.deps import ApiState
from forgeflow.api.store.rows import JobRow
from forgeflow.canonical import JsonObject
from forgeflow.events.models import Event
from forgeflow.jobs.launch_store import LaunchTarget
from forgeflow.jobs.launcher import Launcher

__all__ = ["ApiLaunchStore", "launcher_for"]


class ApiLaunchStore:
    """The API's store as a :class:`~forgeflow.jobs.launch_store.LaunchStore`: events are recorded
    exactly as the ingest endpoint stores them, and published."""

    def __init__(self, state: ApiState) -> None:
        self.state = state
        self.store = state.store

    def jobs_to_launch(self, limit: int) -> Sequence[JobRow]:
        return self.store.jobs_to_launch(limit)

    def launched_active_jobs(self) -> Sequence[JobRow]:
        return self.store.launched_active_jobs()

    def claim_launch(self, job_id: str) -> bool:
        return self.store.claim_launch(job_id)

    def set_launched(
        self, job_id: str, pid: int | None, create_time: float | None, *, flow_run_id: str | None = None
    ) -> None:
        self.store.set_launched(job_id, pid, create_time, flow_run_id=flow_run_id)

    def reset_launch(self, job_id: str) -> None:
        self.store.reset_launch(job_id)

    def silent_jobs(self, job_ids: Iterable[str], silent_s: float) -> Sequence[JobRow]:
        return self.store.silent_jobs(job_ids, silent_s)

    def get_job(self, job_id: str) -> JobRow | None:
        return self.store.get_job(job_id)

    def has_terminal(self, job_id: str) -> bool:
        return self.store.has_terminal(job_id)

    def set_cancel_requested(self, job_id: str, by: str | None = None) -> None:
        self.store.set_cancel_requested(job_id, by)

    def event_dicts(self, job_id: str) -> list[JsonObject]:
        return self.store.event_dicts(job_id)

    def record(self, events: list[Event]) -> int:
        return len(self.store.ingest(events, publish=self.state.publish, resolve_plugin=self.state.resolve_plugin))

    def batch_flow_run_id(self, batch_id: str) -> str | None:
        batch = self.store.batches.get(batch_id)
        return batch["flow_run_id"] if batch else None


def launcher_for(state: ApiState) -> Launcher:
    """The launcher of the API whose state is ``state`` (not started)."""
    target = LaunchTarget(
        settings=state.settings,
        api_url=state.api_url,
        ingest_token=state.auth.ingest_token,
        prefect_api_url=state.prefect_api_url,
    )
    return Launcher(ApiLaunchStore(state), target, every_tick=lambda: batch_service(state).supervise())
