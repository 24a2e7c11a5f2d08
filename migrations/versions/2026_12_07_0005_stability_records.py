"""stability_records: what StableReinforce needs of each sequence sampled with record_stability_info

One row per sampled sequence (its prompt length, tokens and the sampler's logprobs), written with
the sample's result and read by forward_backward(loss_fn="stable_reinforce") through the datums'
provenance spans. Rows live one day after sampling or after the last training request that used
them (Tinker's docs); the sweeper deletes expired rows through ix_stability_records_expires_at.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 18:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stability_records",
        sa.Column("sequence_id", sa.String(length=120), nullable=False),
        sa.Column("tenant", sa.String(length=200), nullable=False),
        sa.Column("session_id", sa.String(length=100), nullable=False),
        sa.Column("prompt_len", sa.Integer(), nullable=False),
        sa.Column("tokens", sa.LargeBinary(), nullable=False),
        sa.Column("logprobs", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("sequence_id", name=op.f("pk_stability_records")),
    )
    with op.batch_alter_table("stability_records") as batch_op:
        batch_op.create_index(batch_op.f("ix_stability_records_expires_at"), ["expires_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("stability_records") as batch_op:
        batch_op.drop_index(batch_op.f("ix_stability_records_expires_at"))
    op.drop_table("stability_records")
