"""The API's tables (SQLAlchemy Core). Alembic migrations in ``forgeflow/api/migrations`` create them.

``jobs``        one row per job: its pipeline and input as submitted, the status derived from its
                stored events, the result envelope once terminal, and the launcher's bookkeeping.
``events``      every realtime message, as the exact JSON text that clients receive; ``seq`` per
                job (1, 2, 3 … no gaps), ``id`` is the global cursor of the all-jobs stream.
``stage_runs``  per job and stage: status, timings, errors (kept up to date on ingest, so the
                pipeline view and template statistics need no JSON queries).
``pipelines``   saved templates, id = slug of the name.
``plugin_observed``  plugin lifecycle as seen from ingested stage events (workers may run elsewhere).
``meta``        small key/value settings of this store (the generated ingest token).
``batches``     a set of jobs made from a folder or a list of media with one pipeline (``batch_files``:
                one row per file, naming the job that stands for it now).
``audit``       who did what that leaves no row of its own: cancels and deletes, by token name.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING)

JSONType = JSON().with_variant(JSONB(), "postgresql")
CursorType = BigInteger().with_variant(Integer(), "sqlite")
TZDateTime = DateTime(timezone=True)

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("source", String(16), nullable=False),  # inline | template | legacy | external
    Column("template_id", String(200), nullable=True),
    Column("pipeline", JSONType, nullable=False),
    Column("input", JSONType, nullable=False),
    Column("request_hash", String(64), nullable=False),
    Column("created_at", TZDateTime, nullable=False),
    Column("updated_at", TZDateTime, nullable=False),
    Column("started_at", TZDateTime, nullable=True),
    Column("finished_at", TZDateTime, nullable=True),
    Column("flow_run_id", String(64), nullable=True),
    Column("pid", Integer, nullable=True),
    Column("pid_create_time", Float, nullable=True),
    Column("launched_at", TZDateTime, nullable=True),
    Column("heartbeat_at", TZDateTime, nullable=True),  # when the job's host last said it runs it
    Column("exit_code", Integer, nullable=True),  # written by versions before JobEnd; kept for their rows
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("envelope", JSONType, nullable=True),
    Column("error", Text, nullable=True),
    Column("error_type", String(200), nullable=True),
    Column("last_seq", Integer, nullable=False, default=0),
    Column("stages_total", Integer, nullable=False, default=0),
    Column("stages_completed", Integer, nullable=False, default=0),
    Column("created_by", String(64), nullable=True),  # the submitting token's name (None: open service)
    Column("cancelled_by", String(64), nullable=True),
    Column("retry_of", String(128), nullable=True),  # the job this one retries (it resumes that one's work)
    Column("batch_id", String(64), nullable=True),  # the batch this job is a file of
    Column("work_key", String(64), nullable=True),  # sha256 of what it computes (forgeflow.api.reuse)
    Column("reused_from", String(128), nullable=True),  # the earlier job whose result it took
    Index("ix_jobs_status_created", "status", "created_at"),
    Index("ix_jobs_created", "created_at"),
    Index("ix_jobs_template", "template_id"),
    Index("ix_jobs_batch", "batch_id"),
    Index("ix_jobs_work_key", "work_key", "status"),
)

batches = Table(
    "batches",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("status", String(16), nullable=False),  # running | succeeded | failed | cancelled
    Column("pipeline", JSONType, nullable=False),
    Column("template_id", String(200), nullable=True),
    Column("source", JSONType, nullable=False),  # {"folder", "pattern"} or {"media": [refs]}
    Column("max_concurrency", Integer, nullable=False),
    Column("force", Boolean, nullable=False),
    Column("created_by", String(64), nullable=True),
    Column("flow_run_id", String(64), nullable=True),  # the batch flow run that registered it, if any
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("created_at", TZDateTime, nullable=False),
    Column("updated_at", TZDateTime, nullable=False),
    Column("finished_at", TZDateTime, nullable=True),
    Column("files_total", Integer, nullable=False),
    Column("counts", JSONType, nullable=False),  # jobs per status, and reused
    Index("ix_batches_created", "created_at"),
)

batch_files = Table(
    "batch_files",
    metadata,
    Column("batch_id", String(64), ForeignKey("batches.id", ondelete="CASCADE"), nullable=False),
    Column("position", Integer, nullable=False),
    Column("name", String(500), nullable=False),
    Column("media", String(200), nullable=True),  # None: the file never reached the media store
    Column("job_id", String(128), nullable=True),  # the job that stands for the file now (its last attempt)
    Column("attempts", Integer, nullable=False, default=0),
    Column("error", Text, nullable=True),  # why the file has no job (it could not be stored)
    Column("error_type", String(200), nullable=True),
    PrimaryKeyConstraint("batch_id", "position", name="pk_batch_files"),
)

events = Table(
    "events",
    metadata,
    Column("id", CursorType, primary_key=True, autoincrement=True),
    Column("job_id", String(128), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("event_id", String(128), nullable=False),
    Column("type", String(32), nullable=False),
    Column("payload", Text, nullable=False),
    Column("received_at", TZDateTime, nullable=False),
    UniqueConstraint("job_id", "seq", name="uq_events_job_seq"),
    UniqueConstraint("event_id", name="uq_events_event_id"),
)

stage_runs = Table(
    "stage_runs",
    metadata,
    Column("job_id", String(128), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("stage_index", Integer, nullable=False),
    Column("plugin", String(200), nullable=False),
    Column("tool", String(200), nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempt", Integer, nullable=False, default=1),
    Column("started_at", String(40), nullable=True),
    Column("ended_at", String(40), nullable=True),
    Column("duration_ms", Float, nullable=True),
    Column("result_size_bytes", BigInteger, nullable=True),
    Column("peak_memory_mb", Float, nullable=True),
    Column("error", Text, nullable=True),
    Column("error_type", String(200), nullable=True),
    Column("progress", JSONType, nullable=True),  # the last pipeline_stage_progress: done, total, fraction, message
    PrimaryKeyConstraint("job_id", "stage_index", name="pk_stage_runs"),
)

pipelines = Table(
    "pipelines",
    metadata,
    Column("id", String(200), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("definition", JSONType, nullable=False),
    Column("created_at", TZDateTime, nullable=False),
    Column("updated_at", TZDateTime, nullable=False),
    Column("created_by", String(64), nullable=True),
    UniqueConstraint("name", name="uq_pipelines_name"),
)

plugin_observed = Table(
    "plugin_observed",
    metadata,
    Column("plugin", String(200), primary_key=True),
    Column("state", String(16), nullable=False),
    Column("last_error", Text, nullable=True),
    Column("last_error_type", String(200), nullable=True),
    Column("calls", Integer, nullable=False, default=0),
    Column("failures", Integer, nullable=False, default=0),
    Column("last_duration_ms", Float, nullable=True),
    Column("updated_at", Float, nullable=False),
)

meta = Table(
    "meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

audit = Table(
    "audit",
    metadata,
    Column("id", CursorType, primary_key=True, autoincrement=True),
    Column("at", TZDateTime, nullable=False),
    Column("actor", String(64), nullable=True),
    Column("action", String(32), nullable=False),  # job.cancel | template.delete
    Column("target", String(200), nullable=False),
)
