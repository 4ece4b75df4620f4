"""A retried job names the job it retries (``POST /v1/jobs/{id}/retry`` makes a linked job that resumes it).

Revision ID: 0005_job_retry_of
Revises: 0004_actors
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_job_retry_of"
down_revision = "0004_actors"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("retry_of", sa.String(128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("retry_of")
