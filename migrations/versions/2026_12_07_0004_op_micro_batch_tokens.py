"""ops.micro_batch_tokens: the split a forward_backward ran with

A forward_backward is run as micro-batches under a token budget that, on a GPU, comes from the free
device memory of the moment (workers/engine/microbatch.py). The split decides the float rounding of
the accumulated gradients, so a replay after a crash reproduces the op only if it splits it the
same way: the worker records the budget with the op's outcome and recovery passes it back
(docs/reliability.md, "GPU replay"). Nullable: ops of older releases replay with today's budget.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 16:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A nullable column with no default: SQLite adds it in place (no table rebuild), PostgreSQL
    # without rewriting the table.
    with op.batch_alter_table("ops") as batch_op:
        batch_op.add_column(sa.Column("micro_batch_tokens", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ops") as batch_op:
        batch_op.drop_column("micro_batch_tokens")
