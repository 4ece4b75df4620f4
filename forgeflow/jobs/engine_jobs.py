"""A job the launcher handed to this host's engine, watched through the engine's socket."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from forgeflow.exit_codes import is_job_ending
from forgeflow.jobs.handle import JobEnd
from forgeflow.processes import pid_alive

if TYPE_CHECKING:
    from forgeflow.engine.client import EngineClient
    from forgeflow.engine.control import JobView

log = logging.getLogger("forgeflow.jobs.launcher")

__all__ = ["EngineJobHandle", "engine_gone_reason"]


def engine_gone_reason(pid: int | None) -> str:
    """Why a job on the engine with ``pid`` crashed when the engine left without its result."""
    return f"the engine running the job (pid {pid}) ended without reporting its result"


class EngineJobHandle:
    """A job running in the engine with pid ``pid`` (a :class:`~forgeflow.jobs.handle.JobHandle`):
    :meth:`poll` gives the status the engine ended it with, or ``crashed`` once the engine is gone
    or no longer knows the job (the launcher then reconciles it from its events)."""

    def __init__(self, job_id: str, client: EngineClient | None, pid: int, create_time: float | None = None) -> None:
        self.job_id = job_id
        self.client = client
        self.pid = pid
        self.create_time = create_time

    def _gone(self) -> JobEnd:
        return JobEnd("crashed", engine_gone_reason(self.pid))

    def poll(self, active: dict[str, JobView] | None = None) -> JobEnd | None:
        """How the job ended, or None while it runs. ``active``: the engine's queued and running
        jobs, asked once for all of a tick's handles (a job among them is still running; only one
        that is not costs a request of its own)."""
        from forgeflow.engine.client import EngineUnavailable

        if self.client is None or not pid_alive(self.pid, self.create_time):
            return self._gone()
        if active is not None and self.job_id in active:
            return None
        try:
            view = self.client.job(self.job_id)
        except EngineUnavailable as exc:
            if exc.status_code == 404:  # an engine that restarted under the same pid, or forgot it
                return JobEnd("crashed", f"the engine (pid {self.pid}) no longer knows the job")
            return None
        return JobEnd(view.status) if is_job_ending(view.status) else None

    def cancel(self, grace_s: float = 10.0) -> JobEnd | None:
        """Cancel the job in the engine (its stage's worker is killed); the engine itself stays."""
        from forgeflow.engine.client import EngineUnavailable

        if self.client is not None:
            try:
                self.client.cancel(self.job_id)
            except EngineUnavailable as exc:
                log.warning("could not cancel job %s in the engine: %s", self.job_id, exc)
        deadline = time.monotonic() + grace_s
        while (end := self.poll()) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return end
