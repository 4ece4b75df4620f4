"""A job the local launcher handed to this host's engine, watched like a job process."""

from __future__ import annotations

import logging
from typing import Any

from forgeflow.jobs.supervise import JobProcess

log = logging.getLogger("forgeflow.api.launcher")

__all__ = ["EngineJobHandle"]


class EngineJobHandle(JobProcess):
    """A job running in the engine with pid ``pid``, watched like a job process: ``poll`` gives its
    exit code (0 succeeded, 1 failed, 2 invalid, 3 cancelled), ``-1`` when the engine is gone or has
    lost it; ``kill`` SIGKILLs the engine (every job it runs ends ``crashed``: for drills and clean-up)."""

    def __init__(self, job_id: str, client: Any, pid: int, create_time: float | None = None) -> None:
        super().__init__(job_id, pid, None, create_time)
        self.client = client

    def poll(self, active: dict[str, dict[str, Any]] | None = None) -> int | None:
        """The job's exit code, or None while it runs. ``active``: the engine's queued and running
        jobs, asked once for all of a tick's handles (a job among them is still running; only one
        that is not costs a request of its own)."""
        from forgeflow.engine.client import EngineUnavailable

        if not self._alive():
            return -1
        if active is not None and self.job_id in active:
            return None
        try:
            view = self.client.job(self.job_id)
        except EngineUnavailable as exc:
            return -1 if exc.status_code == 404 else None
        code = view.get("exit_code")
        return int(code) if code is not None else None

    def cancel(self, grace_s: float = 10.0) -> int | None:
        """Cancel the job in the engine (its stage's worker is killed); the engine itself stays."""
        from forgeflow.engine.client import EngineUnavailable

        try:
            self.client.cancel(self.job_id)
        except EngineUnavailable as exc:
            log.warning("could not cancel job %s in the engine: %s", self.job_id, exc)
        return self.wait(grace_s)
