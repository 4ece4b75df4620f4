"""The batch flow (``forgeflow-batch``): one pipeline over every media file of a folder, on the fleet.

A run of this flow (from a schedule, the Prefect UI, or called directly) is the batch's driver in
Prefect: it lists the folder on the host that runs it, uploads the files to the API's media store,
registers the batch with the API (``POST /v1/batches``, its flow run id making that idempotent) and
follows it to the end. The API makes each file its own job, reusing the work of earlier jobs (same
media content, pipeline and plugin versions: a nightly run computes only new or failed files) and
launching the others as child flow runs of the ``pipeline`` deployment, which every worker of every
host takes (or on its engine, in local mode), at most ``max_concurrency`` at once; a file whose host
was lost is retried elsewhere. At the end the run writes the batch's summary as a table artifact
(and, with ``out_dir``, each file's result envelope as JSON plus the summary as CSV and Parquet).
Cancelling the flow run cancels the batch.

It needs the API: ``FORGEFLOW_API_URL`` and ``FORGEFLOW_INGEST_TOKEN`` (``forgeflow up`` and
``forgeflow worker`` give both to the flow runs of their workers).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.context import FlowRunContext
from pydantic import JsonValue

from forgeflow.canonical import JsonArrayField, JsonObject, JsonObjectField
from forgeflow.jobs.batch_client import BatchClient, folder_files

BATCH_FLOW_NAME = "forgeflow-batch"
log = logging.getLogger("forgeflow.jobs.batch")


class BatchNeedsApi(RuntimeError):
    """The batch flow runs where no API is configured."""


def load_pipeline(pipeline: JsonObject | list[JsonValue] | str) -> JsonObject | list[JsonValue]:
    """A pipeline document, or the path of a JSON file holding one (relative paths: to the working
    directory, the deployment's code folder)."""
    if isinstance(pipeline, str):
        document: JsonObject | list[JsonValue] = json.loads(Path(pipeline).read_text(encoding="utf-8"))
        return document
    return pipeline


def _client() -> BatchClient:
    from forgeflow.settings import get_settings

    settings = get_settings()
    if not settings.api_url:
        raise BatchNeedsApi(
            "the batch flow needs the ForgeFlow API: set FORGEFLOW_API_URL and FORGEFLOW_INGEST_TOKEN "
            "(forgeflow up / forgeflow worker set them for their flow runs)"
        )
    token = settings.ingest_token or settings.api_token
    return BatchClient(settings.api_url, token.get_secret_value() if token else None)


def _pipeline_fields(document: JsonObject | list[JsonValue]) -> JsonObject:
    if isinstance(document, dict) and "pipeline_id" in document:
        return {"pipeline_id": document["pipeline_id"]}
    return {"pipeline": document}


def _report(batch: dict[str, Any]) -> None:
    from prefect.artifacts import create_table_artifact

    rows = [
        {k: f.get(k) for k in ("name", "status", "job_id", "reused_from", "attempts", "error_type", "error")}
        for f in batch["files"]
    ]
    counts = batch["counts"]
    create_table_artifact(
        rows,
        key=f"batch-summary-{batch['batch_id']}"[:100].lower(),
        description=(
            f"Batch {batch['name']} ({batch['batch_id']}): {batch['status']}, {counts['succeeded']} of "
            f"{counts['total']} files succeeded ({counts['reused']} reused), {counts['failed']} failed, "
            f"{counts['crashed']} crashed, {counts['cancelled']} cancelled."
        ),
    )


def _write_out_dir(client: BatchClient, batch: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in batch["files"]:
        if f["job_id"]:
            envelope = client.job(f["job_id"]).get("envelope")
        else:
            envelope = {"ok": False, "error": f["error"], "error_type": f["error_type"]}
        (out_dir / f"{f['name']}.json").write_text(json.dumps(envelope, indent=2, sort_keys=True), encoding="utf-8")
    (out_dir / "summary.csv").write_bytes(client.summary(batch["batch_id"], "csv"))
    (out_dir / "summary.parquet").write_bytes(client.summary(batch["batch_id"], "parquet"))


@flow(name=BATCH_FLOW_NAME, persist_result=False, validate_parameters=True)
def batch_flow(
    pipeline: JsonObjectField | JsonArrayField | str,
    folder: str,
    pattern: str = "*",
    out_dir: str | None = None,
    max_files: int = 10_000,
    max_concurrency: int | None = None,
    force: bool = False,
    name: str | None = None,
) -> dict[str, Any]:
    """Run ``pipeline`` on each file in ``folder`` matching ``pattern`` (sorted by name), each file its
    own job on any worker. ``force``: compute every file again (by default a file whose work was done
    before takes that result). Returns ``{"batch_id", "status", "files", "succeeded", "reused",
    "failed": [names], "jobs": {name: job_id}}``."""
    context = FlowRunContext.get()
    run = context.flow_run if context is not None else None
    assert run is not None  # the flow's body runs in its flow run
    document = load_pipeline(pipeline)
    with _client() as client:
        paths = folder_files(Path(folder), pattern, max_files)
        media, refused = client.upload_folder(paths)
        for file_name, reason in refused.items():
            log.warning("%s was not stored: %s", file_name, reason)
        body = {
            **_pipeline_fields(document),
            "name": name or run.name,
            "media": media,
            "max_concurrency": max_concurrency,
            "force": force,
            "flow_run_id": str(run.id),
        }
        batch = client.create(body)
        batch_id = batch["batch_id"]
        log.info("batch %s: %d files (%d reused so far)", batch_id, batch["files_total"], batch["counts"]["reused"])
        try:
            batch = client.wait(batch_id)
        except BaseException:  # the flow run is cancelled or its process stopped: so is the batch
            try:
                client.cancel(batch_id)
            except Exception:
                log.warning("could not cancel batch %s", batch_id)
            raise
        _report(batch)
        if out_dir:
            _write_out_dir(client, batch, Path(out_dir))
    failed = [f["name"] for f in batch["files"] if f["status"] != "succeeded"] + sorted(refused)
    return {
        "batch_id": batch_id,
        "status": batch["status"],
        "files": batch["files_total"] + len(refused),
        "succeeded": batch["counts"]["succeeded"],
        "reused": batch["counts"]["reused"],
        "failed": failed,
        "jobs": {f["name"]: f["job_id"] for f in batch["files"]},
    }
