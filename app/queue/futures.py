"""Reading futures: every result and error is served from the ops table."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session as DbSession

from app.db.engine import db_clock
from app.db.models import Op
from app.domain.errors import NotFound

TERMINAL = ("succeeded", "failed")


@dataclass(frozen=True)
class FutureView:
    request_id: str
    tenant: str
    kind: str
    status: str
    result: bytes | None
    error_message: str | None
    error_category: str | None
    delivered_at: float | None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


_COLUMNS = (
    Op.request_id,
    Op.tenant,
    Op.kind,
    Op.status,
    Op.result,
    Op.error_message,
    Op.error_category,
    Op.delivered_at,
)


# Built once, with bound parameters: these run for every poll and every pushed result, and
# building a statement costs more CPU than running it (issue 11).
_BY_ID = select(*_COLUMNS).where(Op.request_id == bindparam("b_request_id"))
_FINISHED = select(*_COLUMNS).where(
    Op.request_id.in_(bindparam("b_request_ids", expanding=True)), Op.status.in_(TERMINAL)
)
_MARK_DELIVERED = (
    update(Op)
    .where(Op.request_id == bindparam("b_request_id"), Op.delivered_at.is_(None))
    .values(delivered_at=db_clock())
    .execution_options(synchronize_session=False)
)


def get_future(s: DbSession, tenant: str, request_id: str) -> FutureView:
    row = None if "\x00" in request_id else s.execute(_BY_ID, {"b_request_id": request_id}).first()
    # Another tenant's future is reported exactly like an unknown one: ids are never confirmed.
    if row is None or row.tenant != tenant:
        raise NotFound(f"future {request_id!r} not found")
    return FutureView(*row)


def mark_delivered(s: DbSession, request_id: str) -> None:
    """Retention of a result counts from its first delivery (docs/reliability.md)."""
    s.execute(_MARK_DELIVERED, {"b_request_id": request_id})


def finished_futures(s: DbSession, request_ids: list[str]) -> dict[str, FutureView]:
    """One query for every waiter of the long-poll poller (layout-and-style.md §3 item 14)."""
    if not request_ids:
        return {}
    rows = s.execute(_FINISHED, {"b_request_ids": request_ids}).all()
    return {r.request_id: FutureView(*r) for r in rows}
