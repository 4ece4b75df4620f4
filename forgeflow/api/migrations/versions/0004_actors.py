"""Who did what: the token name that created a job or a template, that cancelled a job, and an
audit trail of cancels and deletes (a deleted template leaves no row of its own).

Revision ID: 0004_actors
Revises: 0003_job_heartbeat
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_actors"
down_revision = "0003_job_heartbeat"
branch_labels = None
depends_on = None

CursorType = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("created_by", sa.String(64), nullable=True))
        batch.add_column(sa.Column("cancelled_by", sa.String(64), nullable=True))
    with op.batch_alter_table("pipelines") as batch:
        batch.add_column(sa.Column("created_by", sa.String(64), nullable=True))
    op.create_table(
        "audit",
        sa.Column("id", CursorType, autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(64), nullable=True),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("target", sa.String(200), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit"),
    )


def downgrade() -> None:
    op.drop_table("audit")
    with op.batch_alter_table("pipelines") as batch:
        batch.drop_column("created_by")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("cancelled_by")
        batch.drop_column("created_by")
