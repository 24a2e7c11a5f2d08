"""Session states and the session search (docs/sessions.md).

A session is `finished` once its client says so, `expired` once nothing has been heard from it
(heartbeat, training request or sample request) for `session_timeout_seconds`, and `active`
otherwise. Expiry is computed when asked, never written: it takes nothing away (runs, checkpoints
and futures stay usable), and the next heartbeat or request of a returning client makes the
session active again without any extra write.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from sqlalchemy import ColumnElement, Select, and_, case, func, or_, select
from sqlalchemy.orm import Session as DbSession

from app.db.engine import db_now
from app.db.models import Checkpoint, Op, Run, Sampler, Session
from app.domain.errors import InvalidInput

State = Literal["active", "expired", "finished"]
_SCAN_BATCH = 500


def last_active_expr() -> ColumnElement[float]:
    """The latest of the session's heartbeat, its runs' last requests and its samplers' last
    sample request (CASE, not GREATEST: SQLite has no GREATEST)."""
    runs = select(func.max(Run.last_request_at)).where(Run.session_id == Session.session_id).scalar_subquery()
    samples = (
        select(func.max(Op.created_at))
        .join(Sampler, Sampler.sampler_id == Op.sampler_id)
        .where(Sampler.session_id == Session.session_id)
        .scalar_subquery()
    )
    with_runs = case((runs > Session.last_heartbeat_at, runs), else_=Session.last_heartbeat_at)
    return case((samples > with_runs, samples), else_=with_runs)


def state_of(finished_at: float | None, last_active: float, now: float, timeout: float) -> State:
    if finished_at is not None:
        return "finished"
    return "active" if last_active >= now - timeout else "expired"


def session_state(s: DbSession, session_id: str, timeout: float) -> tuple[State, float]:
    """(state, time of the last sign of life) of a session the caller has already looked up."""
    finished_at, last_active = s.execute(
        select(Session.finished_at, last_active_expr()).where(Session.session_id == session_id)
    ).one()
    return state_of(finished_at, float(last_active), db_now(s), timeout), float(last_active)


# Search


@dataclass(frozen=True)
class StatusQuery:
    """`active`, `expired`, `client_finished` (optionally with finish reasons), or the SDK's
    `cancelled` and `failed`, which TuFT never sets and so match nothing."""

    type: str
    reasons: tuple[str, ...] | None = None


@dataclass(frozen=True)
class SearchFilters:
    session_id: str | None = None
    # Every word must appear in the display name, case-insensitively. With session_id, either may match.
    display_name: str | None = None
    user_metadata: dict[str, str] = field(default_factory=dict)
    statuses: tuple[StatusQuery, ...] | None = None
    limit: int = 50
    # (created_at in whole microseconds, session_id) of the last session of the previous page.
    after: tuple[int, str] | None = None


@dataclass(frozen=True)
class SessionView:
    session_id: str
    tenant: str
    created_us: int
    display_name: str | None
    user_metadata: dict[str, str]
    finish_reason: str | None
    state: State
    last_active: float
    checkpoints_count: int
    checkpoint_bytes: int


def _created_us() -> ColumnElement[float]:
    # Sort and page on whole microseconds: the SDK's cursor is a datetime, which holds no more, so
    # the page boundary is exactly what the client hands back.
    return func.round(Session.created_at * 1_000_000)


def _no_nul(label: str, value: str | None) -> None:
    if value is not None and "\x00" in value:
        raise InvalidInput(f"{label} must not contain NUL characters")


def _status_matches(queries: tuple[StatusQuery, ...] | None, finish_reason: str | None, state: State) -> bool:
    if queries is None:
        return True
    for q in queries:
        if q.type == state:
            return True
        reason_ok = q.reasons is None or (finish_reason or "success") in q.reasons
        if q.type == "client_finished" and state == "finished" and reason_ok:
            return True
    return False


def _query(tenant: str, f: SearchFilters) -> Select[Session, float, float]:
    created_us = _created_us()
    q = select(Session, created_us, last_active_expr()).where(Session.tenant == tenant)
    either: list[ColumnElement[bool]] = []
    if f.session_id is not None:
        either.append(Session.session_id == f.session_id)
    if f.display_name is not None:
        words = f.display_name.lower().split()
        either.append(and_(*(func.lower(Session.display_name).contains(w, autoescape=True) for w in words)))
    if either:
        q = q.where(or_(*either))
    if f.after is not None:
        us, session_id = f.after
        q = q.where(or_(created_us < us, and_(created_us == us, Session.session_id < session_id)))
    return q.order_by(created_us.desc(), Session.session_id.desc())


def _scan(s: DbSession, q: Select[Session, float, float]) -> Iterator[tuple[Session, int, float]]:
    """Rows in page order, fetched in batches: user_metadata and the state are matched here, in
    Python (JSON matching differs between SQLite and PostgreSQL; the state needs the clock)."""
    offset = 0
    while True:
        rows = s.execute(q.limit(_SCAN_BATCH).offset(offset)).all()
        for row, created_us, last_active in rows:
            yield row, int(created_us), float(last_active)
        if len(rows) < _SCAN_BATCH:
            return
        offset += len(rows)


def search(s: DbSession, tenant: str, f: SearchFilters, timeout: float) -> tuple[list[SessionView], bool]:
    """One page of the tenant's sessions, newest first; True when another page follows."""
    _no_nul("session_id", f.session_id)
    _no_nul("display_name", f.display_name)
    if f.after is not None:
        _no_nul("cursor.last_session_id", f.after[1])
    if f.display_name is not None and not f.display_name.split():
        raise InvalidInput("display_name must contain at least one word")
    now = db_now(s)
    page: list[tuple[Session, int, float, State]] = []
    for row, created_us, last_active in _scan(s, _query(tenant, f)):
        meta = {k: str(v) for k, v in (row.user_metadata or {}).items()}
        state = state_of(row.finished_at, last_active, now, timeout)
        if any(meta.get(k) != v for k, v in f.user_metadata.items()):
            continue
        if not _status_matches(f.statuses, row.finish_reason, state):
            continue
        if len(page) == f.limit:
            return _views(s, page, now), True
        page.append((row, created_us, last_active, state))
    return _views(s, page, now), False


def _views(s: DbSession, page: list[tuple[Session, int, float, State]], now: float) -> list[SessionView]:
    usage: dict[str, tuple[int, int]] = {}
    if page:
        rows = s.execute(
            select(Run.session_id, func.count(Checkpoint.id), func.coalesce(func.sum(Checkpoint.size_bytes), 0))
            .join(Run, Run.run_id == Checkpoint.run_id)
            .where(
                Run.session_id.in_([row.session_id for row, *_ in page]),
                Checkpoint.ephemeral.is_(False),
                or_(Checkpoint.expires_at.is_(None), Checkpoint.expires_at >= now),
            )
            .group_by(Run.session_id)
        ).all()
        usage = {session_id: (int(count), int(size)) for session_id, count, size in rows}
    return [
        SessionView(
            session_id=row.session_id,
            tenant=row.tenant,
            created_us=created_us,
            display_name=row.display_name,
            user_metadata={k: str(v) for k, v in (row.user_metadata or {}).items()},
            finish_reason=row.finish_reason,
            state=state,
            last_active=last_active,
            checkpoints_count=usage.get(row.session_id, (0, 0))[0],
            checkpoint_bytes=usage.get(row.session_id, (0, 0))[1],
        )
        for row, created_us, last_active, state in page
    ]
