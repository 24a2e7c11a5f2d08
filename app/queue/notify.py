"""Results push themselves to the waiting long-polls (issue 11): on PostgreSQL the statement that
makes an op terminal also queues `NOTIFY tuft_done, '<request_id>'` (in its RETURNING clause, so no
extra round trip), which PostgreSQL delivers to every listening API only when, and only if, the
transaction commits. SQLite has no NOTIFY: there the worker sends a datagram after its commit
(app/localbell.py). Either way it is a hint; the API's poller still looks on its own every
`future_poll_interval` (app/api/longpoll.py)."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import func
from sqlalchemy.orm import Session as DbSession
from sqlalchemy.sql.dml import Update

from app.db.models import Op

CHANNEL = "tuft_done"

U = TypeVar("U", bound=Update)


def signal_done(s: DbSession, stmt: U) -> Any:
    """`stmt` (an UPDATE of ops rows to a terminal status) with the push added on PostgreSQL. Call
    `.all()` or `len(...)` on the result for the number of rows, not rowcount."""
    if s.get_bind().dialect.name == "postgresql":
        return stmt.returning(func.pg_notify(CHANNEL, Op.request_id))
    return stmt.returning(Op.request_id)
