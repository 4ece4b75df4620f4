"""The end of a job that died without saying so: its terminal messages, built from what it left
behind (its events and its checkpoint), and its Prefect flow run marked as it ended."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydantic import JsonValue

from forgeflow.events.models import Event, abnormal_end
from forgeflow.events.reduce import replay
from forgeflow.jobs.checkpoints import read_checkpoint
from forgeflow.jobs.flow_runs import mark_flow_run
from forgeflow.pipeline import outcome
from forgeflow.settings import Settings, get_settings


def reconcile_crash(
    job_id: str,
    *,
    reason: str,
    flow_run_id: str | None,
    pipeline: JsonValue,
    events: Sequence[Mapping[str, JsonValue]],
    settings: Settings | None = None,
) -> list[Event]:
    """Terminal messages for a job whose engine, host or process died without sending them.

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
        partial_result=partial
        if isinstance(partial := read_checkpoint(settings, job_id).get("partial_result", {}), dict)
        else {},
    )
    out: list[Event] = list(
        abnormal_end(
            job_id, status="crashed", envelope=envelope, stage=outcome.running_stage(reports), flow_run_id=flow_run_id
        )
    )
    if flow_run_id:
        mark_flow_run(flow_run_id, "crashed", reason)
    return out
