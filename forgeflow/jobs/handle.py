"""A job the API launched, as the API watches it: the one protocol every place that runs a job
answers (the host's engine, a deployment's flow run), and how a job ended, typed.

A job ends with a status, never an exit code: codes exist only where a process ends
(:mod:`forgeflow.exit_codes`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from forgeflow.exit_codes import JobEnding


@dataclass(frozen=True)
class JobEnd:
    """How a launched job ended, as the place that ran it saw it. ``crashed`` with a ``reason``: it
    ended without a word of its own (its engine died, its host went silent, Prefect crashed its
    run); the launcher then builds its terminal messages (:mod:`forgeflow.jobs.reconcile`)."""

    status: JobEnding
    reason: str | None = None


@runtime_checkable
class JobHandle(Protocol):
    """A launched job, watched until it ends."""

    job_id: str

    def poll(self) -> JobEnd | None:
        """How the job ended, or None while it runs (or while its state cannot be read)."""
        ...

    def cancel(self, grace_s: float = 10.0) -> JobEnd | None:
        """Ask the job to stop; wait up to ``grace_s`` for it to end (None: it has not yet)."""
        ...
