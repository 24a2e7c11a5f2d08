"""repair the published forms of 0001

Revision 0001 was edited in place after it was released (commits dc58f48 and bc23a50), so a
database stamped "0001" can have any of three schemas: the first release (1a22913: 32-bit
ops.seq/sampler_seq and size_bytes columns; no singletons table, no runs.status_reason, no
ops.delivered_at), the second (dc58f48: 64-bit columns, still without the three additions), or the
current one. This revision inspects the database and adds or widens only what is missing, so it is
a no-op on a database created by today's 0001 and brings the older ones to the same schema, rows
kept. Released revisions are never edited again (tests/migrations/test_released_revisions.py).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07 11:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# (table, column) that the first release created as 32-bit INTEGER.
WIDENED = (("ops", "seq"), ("ops", "sampler_seq"), ("checkpoints", "size_bytes"), ("snapshots", "size_bytes"))


def _columns(table: str) -> dict[str, sa.types.TypeEngine[object]]:
    return {c["name"]: c["type"] for c in sa.inspect(op.get_bind()).get_columns(table)}


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if "singletons" not in inspector.get_table_names():
        op.create_table(
            "singletons",
            sa.Column("name", sa.String(length=64), nullable=False),
            sa.Column("holder", sa.String(length=200), nullable=False),
            sa.Column("expires_at", sa.Float(), nullable=False),
            sa.PrimaryKeyConstraint("name", name=op.f("pk_singletons")),
        )
    if "status_reason" not in _columns("runs"):
        with op.batch_alter_table("runs") as batch_op:
            batch_op.add_column(sa.Column("status_reason", sa.String(length=500), nullable=True))
    if "delivered_at" not in _columns("ops"):
        with op.batch_alter_table("ops") as batch_op:
            batch_op.add_column(sa.Column("delivered_at", sa.Float(), nullable=True))
    for table in sorted({t for t, _ in WIDENED}):
        types = _columns(table)
        narrow = [c for t, c in WIDENED if t == table and not isinstance(types[c], sa.BigInteger)]
        if narrow:
            # PostgreSQL: ALTER COLUMN ... TYPE BIGINT. SQLite stores 64-bit integers either way;
            # batch mode recreates the table so the declared type matches the models too.
            with op.batch_alter_table(table) as batch_op:
                for column in narrow:
                    batch_op.alter_column(
                        column, existing_type=sa.Integer(), type_=sa.BigInteger(), existing_nullable=True
                    )


def downgrade() -> None:
    # Nothing to undo: what 0002 adds is part of the schema 0001 creates today.
    pass
