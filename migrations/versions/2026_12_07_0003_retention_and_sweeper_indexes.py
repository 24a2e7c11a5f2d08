"""retention columns and the indexes the sweeper reads

Op payload and finished-run retention (app/queue/retention.py, issue 7 item 5): ops.payload_pruned_at,
runs.payloads_pruned_seq, runs.retired_at. Indexes for what every sweeper pass reads, so no pass
scans the ops table: ix_ops_result_delivered (rows still holding a result, by delivery time),
ix_ops_sample_unpruned (sample ops whose payload is still there), ix_checkpoints_expires_at. The two
ops indexes are partial (PostgreSQL and SQLite both support it): they hold only the rows that are
still work, so they stay small however many ops the table keeps. docs/deployment.md has the plans.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07 11:55:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch_op:
        batch_op.add_column(sa.Column("payloads_pruned_seq", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("retired_at", sa.Float(), nullable=True))
    with op.batch_alter_table("ops") as batch_op:
        batch_op.add_column(sa.Column("payload_pruned_at", sa.Float(), nullable=True))
    # Created outside batch mode: on SQLite a batch would recreate the whole ops table for them.
    op.create_index(
        "ix_ops_result_delivered",
        "ops",
        ["delivered_at"],
        postgresql_where=sa.text("result IS NOT NULL"),
        sqlite_where=sa.text("result IS NOT NULL"),
    )
    op.create_index(
        "ix_ops_sample_unpruned",
        "ops",
        ["delivered_at"],
        postgresql_where=sa.text("run_id IS NULL AND payload_pruned_at IS NULL"),
        sqlite_where=sa.text("run_id IS NULL AND payload_pruned_at IS NULL"),
    )
    op.create_index(op.f("ix_checkpoints_expires_at"), "checkpoints", ["expires_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_checkpoints_expires_at"), table_name="checkpoints")
    op.drop_index("ix_ops_sample_unpruned", table_name="ops")
    op.drop_index("ix_ops_result_delivered", table_name="ops")
    with op.batch_alter_table("ops") as batch_op:
        batch_op.drop_column("payload_pruned_at")
    with op.batch_alter_table("runs") as batch_op:
        batch_op.drop_column("retired_at")
        batch_op.drop_column("payloads_pruned_seq")
