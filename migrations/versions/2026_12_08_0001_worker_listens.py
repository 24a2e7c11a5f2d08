"""workers.listens: the worker hears `NOTIFY tuft_work` (its wake-up check passed)

An op for a run whose owner listens is woken by the NOTIFY its submitting INSERT returns alone;
the Celery message the API also sent (about 10 Redis commands, a worker loop pass and a millisecond
of CPU on each side per op, issue 11) is left out. Workers set it after proving the round trip on
their listen connection, and clear it when that connection is lost (workers/pglisten.py). False by
default, so workers of an older release are still rung through Celery.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08 01:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("workers") as batch_op:
        batch_op.add_column(sa.Column("listens", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch_op:
        batch_op.drop_column("listens")
