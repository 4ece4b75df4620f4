"""Scheduled batch work: run one pipeline over every media file of a folder.

Each file becomes its own job (and its own child flow run of ``forgeflow-pipeline``), so one bad
video fails its job only; the batch run reports how many succeeded. Files are copied into the
content-addressed media store, so a file already analysed is stored once.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.context import get_run_context

from forgeflow.jobs.flow import flow_parameters, pipeline_flow
from forgeflow.jobs.stages import PipelineFailed, current_services
from forgeflow.pipeline import outcome
from forgeflow.pipeline.definition import raw_stages
from forgeflow.plugins.errors import MediaError
from forgeflow.plugins.media import MediaStore

BATCH_FLOW_NAME = "forgeflow-batch"


def load_pipeline(pipeline: dict[str, Any] | list[Any] | str) -> dict[str, Any] | list[Any]:
    """A pipeline document, or the path of a JSON file holding one."""
    if isinstance(pipeline, str):
        document: dict[str, Any] | list[Any] = json.loads(Path(pipeline).read_text(encoding="utf-8"))
        return document
    return pipeline


@flow(name=BATCH_FLOW_NAME, persist_result=False, validate_parameters=True)
def batch_flow(
    pipeline: dict[str, Any] | list[Any] | str,
    folder: str,
    pattern: str = "*",
    out_dir: str | None = None,
    max_files: int = 1000,
) -> dict[str, Any]:
    """Run ``pipeline`` on each file in ``folder`` matching ``pattern`` (sorted by name).

    Writes ``<out_dir>/<file name>.json`` (the result envelope) for each file when ``out_dir``
    is given. Returns ``{"files": N, "succeeded": K, "failed": [names], "jobs": {name: job_id}}``.
    """
    services = current_services()
    document = load_pipeline(pipeline)
    store = MediaStore(services.settings.media_root)
    run_id = str(get_run_context().flow_run.id)[:8]  # type: ignore[union-attr]
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and fnmatch.fnmatch(p.name, pattern))[:max_files]
    summary: dict[str, Any] = {"files": len(files), "succeeded": 0, "failed": [], "jobs": {}}
    for path in files:
        job_id = f"batch-{run_id}-{path.stem}"[:120]
        summary["jobs"][path.name] = job_id
        try:
            ref = store.put_file(path, max_bytes=services.settings.max_media_bytes).ref
        except MediaError as exc:
            summary["failed"].append(path.name)
            envelope: dict[str, Any] = outcome.not_started(
                outcome.pending_reports(raw_stages(document)), error=exc.message, error_type=exc.error_type
            ).to_dict()
        else:
            parameters = flow_parameters(document, {"media": ref}, job_id, services.settings.jobs_dir / job_id)
            state = pipeline_flow(**parameters, return_state=True)
            result = state.result(raise_on_failure=False)
            if isinstance(result, PipelineFailed):
                envelope = result.envelope.to_dict()
            elif isinstance(result, BaseException):
                envelope = outcome.failed(
                    outcome.pending_reports(raw_stages(document)),
                    error=str(result),
                    error_type=type(result).__name__,
                    stage_failed=None,
                ).to_dict()
            else:
                envelope = result
            if envelope.get("ok"):
                summary["succeeded"] += 1
            else:
                summary["failed"].append(path.name)
        if out_dir:
            target = Path(out_dir) / f"{path.name}.json"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(envelope, indent=2, sort_keys=True), encoding="utf-8")
    return summary
