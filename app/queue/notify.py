"""Results push themselves to the waiting long-polls (issue 11): on PostgreSQL the statement that
makes an op terminal also queues `NOTIFY tuft_done, '<request_id>'` (in its RETURNING clause, so no
extra round trip), which PostgreSQL delivers to every listening API only when, and only if, the
transaction commits. SQLite has no NOTIFY: there the worker sends a datagram after its commit
(app/localbell.py). Either way it is a hint; the API's poller still looks on its own every
`future_poll_interval` (app/api/longpoll.py)."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import func, literal
from sqlalchemy.orm import Session as DbSession
from sqlalchemy.sql.dml import Update

from app.db.models import Op

CHANNEL = "tuft_done"
# A new op of a run that a worker owns: `NOTIFY tuft_work, '<the owner's queue>'` from the submitting
# INSERT, so the owner wakes on the commit without the Celery round (workers/pglisten.py). Ops for
# the shared queue (new runs, samples) are rung through Celery only, which hands each message to
# one worker instead of waking all of them.
WORK_CHANNEL = "tuft_work"

U = TypeVar("U", bound=Update)


def signal_done(s: DbSession, stmt: U) -> Any:
    """`stmt` (an UPDATE of ops rows to a terminal status) with the push added on PostgreSQL. Call
    `.all()` or `len(...)` on the result for the number of rows, not rowcount."""
    return signal_done_on(s.get_bind().dialect.name, stmt)


def signal_done_on(dialect: str, stmt: U) -> Any:
    """signal_done for a statement built once, before any session (by dialect name)."""
    if dialect == "postgresql":
        return stmt.returning(func.pg_notify(CHANNEL, Op.request_id))
    return stmt.returning(Op.request_id)


def signal_work(s: DbSession, queue: str | None) -> list[Any]:
    """Extra RETURNING columns for an ops INSERT that wake `queue`'s worker on commit (PostgreSQL)."""
    if queue is None or s.get_bind().dialect.name != "postgresql":
        return []
    return [func.pg_notify(WORK_CHANNEL, literal(queue))]
