"""Batches: one pipeline over a set of files, each file its own job, run by the fleet.

The API owns a batch the way it owns a job: :meth:`BatchService.create` stores the batch and makes
one job per file (``batch_id`` set, the file's ``media`` as input), and the launcher starts them like
any job: on this host's engine (local mode) or as flow runs of the ``pipeline`` deployment that
every worker of every host takes (deployment mode), at most ``max_concurrency`` of the batch at
once (:meth:`~forgeflow.api.store.Store.jobs_to_launch`). A file whose work was done before (same
``work_key``: media content, pipeline, plugin versions) takes that job's result unless the batch
says ``force``. :meth:`BatchService.supervise`, called by the launcher's loop, retries a file whose
job crashed (its host or engine lost) as a linked job that resumes it, up to ``batch_max_attempts``
(a file that failed for its own reason is not retried), ends the batch once every file's job ended,
and sends ``batch_progress`` on the all-jobs stream when the counts change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from typing import TypedDict

from forgeflow.api.batch_models import BatchSummaryItem, BatchView
from forgeflow.api.batch_summary import file_view
from forgeflow.api.deps import ApiState
from forgeflow.api.hub import Notice
from forgeflow.api.reuse import work_key
from forgeflow.api.store import iso, utcnow
from forgeflow.api.store.batches import BatchRepo, FileState, NewFile
from forgeflow.api.store.rows import BatchRow
from forgeflow.canonical import JsonObject, canonical_json
from forgeflow.pipeline.outcome import TERMINAL_STATUSES
from forgeflow.plugins.errors import MediaError

log = logging.getLogger(__name__)

#: The statuses of a file whose work may be tried again by a retry of the batch.
RETRYABLE = frozenset({"failed", "crashed", "cancelled"})


class _SummaryFields(TypedDict):
    """The fields of a :class:`~forgeflow.api.batch_models.BatchSummaryItem` but ``counts``."""

    batch_id: str
    name: str
    status: str
    pipeline_id: str | None
    source: JsonObject
    max_concurrency: int
    force: bool
    created_by: str | None
    flow_run_id: str | None
    cancel_requested: bool
    created_at: str | None
    updated_at: str | None
    finished_at: str | None
    files_total: int
    links: dict[str, str]


def new_batch_id() -> str:
    return f"batch-{uuid.uuid4().hex[:16]}"


def batch_job_id(batch_id: str, position: int, attempt: int) -> str:
    base = f"{batch_id}-{position:05d}"
    return base if attempt == 1 else f"{base}-a{attempt}"


def counts_of(files: list[FileState]) -> dict[str, int]:
    counts = {"total": len(files), "done": 0, "reused": 0}
    for f in files:
        status = file_status(f)
        counts[status] = counts.get(status, 0) + 1
        if status in TERMINAL_STATUSES:
            counts["done"] += 1
        if status == "succeeded" and f.reused_from:
            counts["reused"] += 1
    return counts


def file_status(f: FileState) -> str:
    """The file's status: its job's, ``failed`` when it has none because it could not be stored,
    ``queued`` while its job is being made."""
    if f.status is not None:
        return f.status
    return "failed" if f.file["media"] is None else "queued"


def rate(batch: BatchRow, counts: dict[str, int]) -> tuple[float | None, float | None]:
    """Files ended per second since the batch started, and the seconds left at that rate."""
    end = batch["finished_at"] or utcnow()
    start = batch["created_at"]
    if start.tzinfo is None:
        start = start.replace(tzinfo=end.tzinfo)
    if end.tzinfo is None:
        end = end.replace(tzinfo=start.tzinfo)
    elapsed = max((end - start).total_seconds(), 1e-3)
    done, left = counts.get("done", 0), counts["total"] - counts.get("done", 0)
    if done == 0:
        return None, None if left else 0.0
    per_s = done / elapsed
    return round(per_s, 4), round(left / per_s, 1)


class BatchService:
    """Makes, watches, cancels and retries the batches of one API (see the module's docstring)."""

    def __init__(self, state: ApiState) -> None:
        self.state = state
        self._last_sent: dict[str, str] = {}

    @property
    def repo(self) -> BatchRepo:
        return self.state.store.batches

    # --- create ----------------------------------------------------------------------------------
    def create(
        self,
        *,
        name: str | None,
        pipeline: JsonObject,
        template_id: str | None,
        source: JsonObject,
        files: list[NewFile],
        extra_input: JsonObject,
        max_concurrency: int | None,
        force: bool,
        created_by: str | None,
        flow_run_id: str | None,
    ) -> BatchRow:
        """Store the batch and make each storable file's job (taking earlier work unless ``force``)."""
        batch_id = new_batch_id()
        batch = self.repo.create(
            batch_id=batch_id,
            name=name or batch_id,
            pipeline=pipeline,
            template_id=template_id,
            source={**source, "input": extra_input} if extra_input else source,
            max_concurrency=max_concurrency or self.state.settings.batch_max_concurrency,
            force=force,
            created_by=created_by,
            flow_run_id=flow_run_id,
            files=files,
        )
        for state in self.repo.files(batch_id):
            if state.file["media"] is not None:
                self._new_attempt(batch, state, attempt=1, retry_of=None, created_by=created_by)
        self.supervise_one(batch_id)
        return self.repo.get(batch_id) or batch

    def _file_input(self, batch: BatchRow, media: str) -> JsonObject:
        extra = batch["source"].get("input") or {}
        return {**(extra if isinstance(extra, dict) else {}), "media": media}

    def _new_attempt(
        self, batch: BatchRow, state: FileState, *, attempt: int, retry_of: str | None, created_by: str | None
    ) -> str:
        """Make the file's ``attempt``-th job (a retry resumes the job it follows) and point the file at it."""
        media = state.file["media"]
        assert media is not None
        input_data = self._file_input(batch, media)
        pipeline: JsonObject = batch["pipeline"] if retry_of is None else {**batch["pipeline"], "resume": True}
        try:
            key: str | None = work_key(
                batch["pipeline"],
                input_data,
                self.state.registry,
                self.state.media,
                self.state.settings.media_input_roots,
            )
        except (MediaError, OSError, KeyError):
            key = None
        job_id = batch_job_id(batch["id"], state.file["position"], attempt)
        request_hash = hashlib.sha256(
            canonical_json({"batch": batch["id"], "position": state.file["position"], "attempt": attempt}).encode()
        ).hexdigest()
        self.state.store.create_job(
            job_id=job_id,
            pipeline=pipeline,
            input_data=input_data,
            request_hash=request_hash,
            source="batch",
            template_id=batch["template_id"],
            created_by=created_by,
            retry_of=retry_of,
            batch_id=batch["id"],
            work_key=key,
            reuse=not batch["force"],
            publish=self.state.publish,
        )
        self.repo.point_file(batch["id"], state.file["position"], job_id, attempt)
        if self.state.launcher is not None:
            self.state.launcher.wake()
        return job_id

    # --- watch -----------------------------------------------------------------------------------
    def supervise(self) -> None:
        """One pass over every running batch (the launcher's loop calls it)."""
        for batch_id in self.repo.active_ids():
            try:
                self.supervise_one(batch_id)
            except Exception:
                log.exception("supervising batch %s failed", batch_id)

    def supervise_one(self, batch_id: str) -> None:
        batch = self.repo.get(batch_id)
        if batch is None:
            return
        files = self.repo.files(batch_id)
        if batch["status"] == "running" and not batch["cancel_requested"]:
            retried = False
            for state in files:
                if state.status == "crashed" and state.file["attempts"] < self.state.settings.batch_max_attempts:
                    job_id = self._new_attempt(
                        batch,
                        state,
                        attempt=state.file["attempts"] + 1,
                        retry_of=state.file["job_id"],
                        created_by=batch["created_by"],
                    )
                    log.warning("batch %s: %s crashed, retried as %s", batch_id, state.file["job_id"], job_id)
                    retried = True
            if retried:
                files = self.repo.files(batch_id)
        counts = counts_of(files)
        values: dict[str, object] = {}
        if counts != batch["counts"]:
            values["counts"] = counts
        if batch["status"] == "running" and counts["done"] == counts["total"]:
            if batch["cancel_requested"]:
                status = "cancelled"
            elif counts.get("succeeded", 0) == counts["total"]:
                status = "succeeded"
            else:
                status = "failed"
            values.update(status=status, finished_at=utcnow())
        if values:
            self.repo.update(batch_id, **values)
            batch = self.repo.get(batch_id) or batch
        self.announce(batch)

    def announce(self, batch: BatchRow) -> None:
        """Send ``batch_progress`` on the all-jobs stream when the batch's status or counts changed."""
        per_s, eta = rate(batch, batch["counts"] or {"total": batch["files_total"]})
        message = {
            "type": "batch_progress",
            "batch_id": batch["id"],
            "status": batch["status"],
            "counts": self.full_counts(batch),
            "files_per_s": per_s,
            "eta_s": eta,
        }
        key = json.dumps([message["status"], message["counts"]], sort_keys=True)
        if self._last_sent.get(batch["id"]) == key:
            return
        self._last_sent[batch["id"]] = key
        if batch["status"] != "running":
            self._last_sent.pop(batch["id"], None)
        text = json.dumps({**message, "timestamp": iso(utcnow())}, separators=(",", ":"))
        self.state.hub.notify_threadsafe(Notice(text))

    @staticmethod
    def full_counts(batch: BatchRow) -> dict[str, int]:
        base = dict.fromkeys(("queued", "running", "succeeded", "failed", "crashed", "cancelled", "reused", "done"), 0)
        return {**base, "total": batch["files_total"], **(batch["counts"] or {})}

    # --- cancel, retry ---------------------------------------------------------------------------
    def request_cancel(self, batch_id: str) -> list[str]:
        """Mark the batch cancelled (no file gets a new job from now on); the ids of its jobs that
        have not ended, for the caller to cancel."""
        self.repo.update(batch_id, cancel_requested=True)
        return [
            s.file["job_id"]
            for s in self.repo.files(batch_id)
            if s.file["job_id"] and s.status is not None and s.status not in TERMINAL_STATUSES
        ]

    def retry(self, batch_id: str, created_by: str | None) -> list[str]:
        """A new job for each file that failed, crashed or was cancelled (it resumes the job before);
        the batch runs again. The names of those files."""
        batch = self.repo.get(batch_id)
        assert batch is not None
        again = [s for s in self.repo.files(batch_id) if s.file["media"] is not None and s.status in RETRYABLE]
        if not again:
            return []
        self.repo.update(batch_id, status="running", cancel_requested=False, finished_at=None)
        batch = self.repo.get(batch_id) or batch
        for state in again:
            self._new_attempt(
                batch, state, attempt=state.file["attempts"] + 1, retry_of=state.file["job_id"], created_by=created_by
            )
        self.supervise_one(batch_id)
        return [s.file["name"] for s in again]

    # --- views -----------------------------------------------------------------------------------
    def summary_item(self, batch: BatchRow) -> BatchSummaryItem:
        return BatchSummaryItem(**self._summary_fields(batch), counts=self.full_counts(batch))

    def _summary_fields(self, batch: BatchRow) -> _SummaryFields:
        base = f"/v1/batches/{batch['id']}"
        return {
            "batch_id": batch["id"],
            "name": batch["name"],
            "status": batch["status"],
            "pipeline_id": batch["template_id"],
            "source": {k: v for k, v in batch["source"].items() if k != "input"},
            "max_concurrency": batch["max_concurrency"],
            "force": batch["force"],
            "created_by": batch["created_by"],
            "flow_run_id": batch["flow_run_id"],
            "cancel_requested": batch["cancel_requested"],
            "created_at": iso(batch["created_at"]),
            "updated_at": iso(batch["updated_at"]),
            "finished_at": iso(batch["finished_at"]),
            "files_total": batch["files_total"],
            "links": {
                "self": base,
                "cancel": f"{base}/cancel",
                "retry": f"{base}/retry",
                "summary_parquet": f"{base}/summary.parquet",
                "summary_csv": f"{base}/summary.csv",
            },
        }

    def view(self, batch: BatchRow) -> BatchView:
        files = self.repo.files(batch["id"])
        counts = counts_of(files)
        per_s, eta = rate(batch, counts)
        return BatchView(
            **self._summary_fields(batch),
            counts={**self.full_counts(batch), **counts},
            pipeline=batch["pipeline"],
            files_per_s=per_s,
            eta_s=eta,
            files=[file_view(f, file_status(f)) for f in files],
        )


def batch_service(state: ApiState) -> BatchService:
    """The API's one :class:`BatchService` (made on first use)."""
    service = state.extra.get("batches")
    if not isinstance(service, BatchService):
        service = state.extra["batches"] = BatchService(state)
    return service
