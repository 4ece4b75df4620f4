"""Where a job runs: the one decision, for every way a job starts.

A ForgeFlow job runs in one of three places:

* ``engine``: this host's long-lived engine (:mod:`forgeflow.host`), where Prefect is imported, its
  client warm, and the plugins' workers and models stay loaded between jobs;
* ``deployment``: a flow run of the Prefect deployment, taken by whichever ``forgeflow worker`` of the
  fleet has room (the API with ``FORGEFLOW_LAUNCH=deployment``);
* ``here``: the process that asked, as Prefect's own engine would run the flow (cold: imports and
  models loaded for this one job).

Who asks, and what they do with the answer:

* the API's launcher (and so every batch, whose files become API jobs): ``deployment`` or ``engine``,
  starting the engine if none runs;
* ``forgeflow run``: ``engine`` (the running one, or one started in the background) or ``here``;
* the process a Prefect worker starts for a flow run (:mod:`forgeflow.jobs.handoff`): ``engine`` when
  this host's engine runs and the events have an API to go to, else ``here``.

A flow run that runs ``here`` still sends its stage calls to the engine's warm workers when one runs
(:func:`stage_calls_on_engine`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from forgeflow.settings import Settings

__all__ = ["JobOrigin", "Placement", "place_job", "stage_calls_on_engine"]

Where = Literal["engine", "deployment", "here"]


class JobOrigin(StrEnum):
    """How a job was started."""

    API = "api"  # POST /v1/jobs, the web page, a batch's files
    CLI = "cli"  # forgeflow run
    FLOW_RUN = "flow_run"  # a flow run a Prefect worker started (the Prefect UI's "Run", a schedule)


@dataclass(frozen=True)
class Placement:
    """Where a job runs, whether the engine may be started for it, and why (said to the user when the
    job runs somewhere they might not expect)."""

    where: Where
    start_engine: bool = False
    reason: str = ""


def place_job(
    settings: Settings,
    origin: JobOrigin,
    *,
    engine_running: bool,
    no_engine: bool = False,
) -> Placement:
    """Where a job started from ``origin`` runs, given whether this host's engine answers now.

    ``no_engine`` is the caller's own refusal (``forgeflow run --no-engine``). The inline runner runs
    stages in the asking process by definition, so its jobs never go to an engine."""
    if origin is JobOrigin.API:
        if settings.launch == "deployment":
            return Placement("deployment", reason=f"a flow run of deployment {settings.deployment!r}")
        return Placement("engine", start_engine=not engine_running)
    if no_engine:
        return Placement("here", reason="--no-engine")
    if not settings.use_engine:
        return Placement("here", reason="FORGEFLOW_USE_ENGINE=false")
    if settings.runner == "inline":
        return Placement("here", reason="the inline runner runs stages in this process")
    if origin is JobOrigin.FLOW_RUN:
        if not settings.api_url:
            return Placement("here", reason="no FORGEFLOW_API_URL for the engine to send the job's events to")
        if not engine_running:
            return Placement("here", reason="no engine runs on this host")
        return Placement("engine")
    if engine_running:
        return Placement("engine")
    if settings.auto_engine:
        return Placement("engine", start_engine=True)
    return Placement("here", reason="no engine runs and FORGEFLOW_AUTO_ENGINE=false")


def stage_calls_on_engine(settings: Settings, *, in_engine: bool) -> bool:
    """Whether a flow run in this process sends its stage calls to this host's engine (when it
    answers): with the process runner, from any process but the engine itself. Other runners call
    their workers from where the flow runs."""
    return settings.use_engine and settings.runner == "process" and not in_engine
