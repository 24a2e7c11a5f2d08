"""ops.input_tokens / ops.output_tokens and the indexes the audit and usage routes read

Usage (GET /api/v1/billing/usage/events) counts tokens per tenant from the ops rows, but payloads
and results are pruned after retention, so the counts are stored with the op: input tokens when it
is submitted (forward_backward's data, a sample's prompt), output tokens when a sample commits
(docs/audit-and-usage.md). Nullable: ops of older releases have no count and are reported as
such. The two indexes serve the per-tenant time windows of the audit log (created_at) and the
usage buckets (finished_at), so neither scans other tenants' ops.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 18:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable columns with no default: SQLite adds them in place, PostgreSQL without a rewrite.
    with op.batch_alter_table("ops") as batch_op:
        batch_op.add_column(sa.Column("input_tokens", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("output_tokens", sa.BigInteger(), nullable=True))
    op.create_index("ix_ops_tenant_created_at", "ops", ["tenant", "created_at"])
    op.create_index("ix_ops_tenant_finished_at", "ops", ["tenant", "finished_at"])


def downgrade() -> None:
    op.drop_index("ix_ops_tenant_finished_at", table_name="ops")
    op.drop_index("ix_ops_tenant_created_at", table_name="ops")
    with op.batch_alter_table("ops") as batch_op:
        batch_op.drop_column("output_tokens")
        batch_op.drop_column("input_tokens")
