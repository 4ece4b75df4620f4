"""Batches: a set of jobs made from a folder or a list of media with one pipeline, and work reuse.

``batches`` holds each batch (its pipeline, where its files came from, its concurrency bound);
``batch_files`` one row per file (its name, media ref, the job that now stands for it and how many
attempts it took). Jobs gain ``batch_id``, ``work_key`` (what the job computes: media content,
pipeline, plugin versions) and ``reused_from`` (the earlier job whose result it took).

Revision ID: 0006_batches
Revises: 0005_job_retry_of
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0006_batches"
down_revision = "0005_job_retry_of"
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(JSONB(), "postgresql")
TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("pipeline", JSONType, nullable=False),
        sa.Column("template_id", sa.String(200), nullable=True),
        sa.Column("source", JSONType, nullable=False),
        sa.Column("max_concurrency", sa.Integer(), nullable=False),
        sa.Column("force", sa.Boolean(), nullable=False),
        sa.Column("created_by", sa.String(64), nullable=True),
        sa.Column("flow_run_id", sa.String(64), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
        sa.Column("finished_at", TZ, nullable=True),
        sa.Column("files_total", sa.Integer(), nullable=False),
        sa.Column("counts", JSONType, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_batches"),
    )
    op.create_index("ix_batches_created", "batches", ["created_at"])
    op.create_table(
        "batch_files",
        sa.Column("batch_id", sa.String(64), sa.ForeignKey("batches.id", ondelete="CASCADE"), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(500), nullable=False),
        sa.Column("media", sa.String(200), nullable=True),
        sa.Column("job_id", sa.String(128), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("error_type", sa.String(200), nullable=True),
        sa.PrimaryKeyConstraint("batch_id", "position", name="pk_batch_files"),
    )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("batch_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("work_key", sa.String(64), nullable=True))
        batch.add_column(sa.Column("reused_from", sa.String(128), nullable=True))
    op.create_index("ix_jobs_batch", "jobs", ["batch_id"])
    op.create_index("ix_jobs_work_key", "jobs", ["work_key", "status"])


def downgrade() -> None:
    op.drop_index("ix_jobs_work_key", "jobs")
    op.drop_index("ix_jobs_batch", "jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("reused_from")
        batch.drop_column("work_key")
        batch.drop_column("batch_id")
    op.drop_table("batch_files")
    op.drop_index("ix_batches_created", "batches")
    op.drop_table("batches")
