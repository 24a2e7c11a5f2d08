"""The audit log (GET /api/v1/audit, docs/audit-and-usage.md): who did what and when, read from
the durable rows themselves (sessions, runs, checkpoints, ops). Nothing is written for it.

One tenant's rows only, one time window, in a stable order: (timestamp, source, id). A page is
read with keyset pagination: each source returns at most `limit + 1` rows after the cursor, so a
page costs the same whatever page it is and however much the tenant did that day.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, select
from sqlalchemy.orm import InstrumentedAttribute
from sqlalchemy.orm import Session as DbSession

from app.db.models import Checkpoint, Op, Run, Session

# Checkpoint kinds and their tinker:// path segments.
_SEGMENT = {"training": "weights", "sampler": "sampler_weights", "external": "external_weights"}
# Op kinds that concern checkpoints (event_type=checkpoints).
_CHECKPOINT_OPS = ("save_weights", "load_weights")


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


@dataclass(frozen=True)
class Cursor:
    """Where a page ended: the sort key of its last entry."""

    timestamp: float
    source: int
    key: str


@dataclass(frozen=True)
class Entry:
    timestamp: float
    source: int
    key: str
    event: str
    details: dict[str, Any]
    model_id: str | None = None
    tinker_path: str | None = None


@dataclass(frozen=True)
class _Source:
    rank: int
    ts: InstrumentedAttribute[Any]
    key: InstrumentedAttribute[Any]
    rows: Callable[[DbSession, str, list[ColumnElement[bool]], int], list[Entry]]


def _after(src: _Source, cursor: Cursor | None) -> list[ColumnElement[bool]]:
    """Rows of this source that sort after the cursor: (ts, rank, key) > (c.ts, c.rank, c.key)."""
    if cursor is None:
        return []
    if src.rank > cursor.source:
        return [src.ts >= cursor.timestamp]
    if src.rank < cursor.source:
        return [src.ts > cursor.timestamp]
    key: Any = int(cursor.key) if src.rank == 3 else cursor.key  # checkpoints.id is an integer
    return [or_(src.ts > cursor.timestamp, and_(src.ts == cursor.timestamp, src.key > key))]


def _sessions_created(s: DbSession, tenant: str, where: list[ColumnElement[bool]], n: int) -> list[Entry]:
    rows = s.execute(
        select(Session)
        .where(Session.tenant == tenant, *where)
        .order_by(Session.created_at, Session.session_id)
        .limit(n)
    ).scalars()
    return [
        Entry(
            r.created_at,
            0,
            r.session_id,
            "session_create",
            {"tenant": tenant, "session_id": r.session_id, "sdk_version": r.sdk_version, "tags": r.tags},
        )
        for r in rows
    ]


def _sessions_finished(s: DbSession, tenant: str, where: list[ColumnElement[bool]], n: int) -> list[Entry]:
    rows = s.execute(
        select(Session)
        .where(Session.tenant == tenant, Session.finished_at.is_not(None), *where)
        .order_by(Session.finished_at, Session.session_id)
        .limit(n)
    ).scalars()
    return [
        Entry(
            r.finished_at or 0.0,
            1,
            r.session_id,
            "session_finish",
            {"tenant": tenant, "session_id": r.session_id, "reason": r.finish_reason},
        )
        for r in rows
    ]


def _runs(s: DbSession, tenant: str, where: list[ColumnElement[bool]], n: int) -> list[Entry]:
    rows = s.execute(select(Run).where(Run.tenant == tenant, *where).order_by(Run.created_at, Run.run_id).limit(n))
    return [
        Entry(
            r.created_at,
            2,
            r.run_id,
            "training_run_create",
            {
                "tenant": tenant,
                "model_id": r.run_id,
                "session_id": r.session_id,
                "base_model": r.base_model,
                "lora_rank": r.lora_config.get("rank"),
                "status": r.status,
            },
            model_id=r.run_id,
        )
        for r in rows.scalars()
    ]


def _checkpoints(s: DbSession, tenant: str, where: list[ColumnElement[bool]], n: int) -> list[Entry]:
    rows = s.execute(
        select(Checkpoint)
        .where(Checkpoint.tenant == tenant, Checkpoint.ephemeral.is_(False), *where)
        .order_by(Checkpoint.created_at, Checkpoint.id)
        .limit(n)
    ).scalars()
    entries = []
    for r in rows:
        path = f"tinker://{r.run_id}/{_SEGMENT.get(r.kind, r.kind)}/{r.name}"
        details = {
            "tenant": tenant,
            "model_id": r.run_id,
            "tinker_path": path,
            "checkpoint_type": r.kind,
            "size_bytes": r.size_bytes,
            "public": r.public,
            "request_id": r.created_by_op,
        }
        entries.append(Entry(r.created_at, 3, str(r.id), "checkpoint_create", details, r.run_id, path))
    return entries


def _ops(kinds: tuple[str, ...] | None) -> Callable[[DbSession, str, list[ColumnElement[bool]], int], list[Entry]]:
    def rows(s: DbSession, tenant: str, where: list[ColumnElement[bool]], n: int) -> list[Entry]:
        # Columns only: never the payload or result blobs.
        cols = (
            Op.request_id,
            Op.kind,
            Op.run_id,
            Op.seq,
            Op.sampler_id,
            Op.status,
            Op.error_category,
            Op.attempt,
            Op.created_at,
            Op.started_at,
            Op.finished_at,
            Op.input_tokens,
            Op.output_tokens,
        )
        query = select(*cols).where(Op.tenant == tenant, *where)
        if kinds is not None:
            query = query.where(Op.kind.in_(kinds))
        found = s.execute(query.order_by(Op.created_at, Op.request_id).limit(n)).all()
        return [
            Entry(
                r.created_at,
                4,
                r.request_id,
                f"op_{r.kind}",
                {
                    "tenant": tenant,
                    "request_id": r.request_id,
                    "op": r.kind,
                    "model_id": r.run_id,
                    "seq_id": r.seq,
                    "sampler_id": r.sampler_id,
                    "status": r.status,
                    "error_category": r.error_category,
                    "attempts": r.attempt,
                    "started_at": _iso(r.started_at),
                    "finished_at": _iso(r.finished_at),
                    "input_tokens": r.input_tokens,
                    "output_tokens": r.output_tokens,
                },
                model_id=r.run_id,
            )
            for r in found
        ]

    return rows


_ALL = (
    _Source(0, Session.created_at, Session.session_id, _sessions_created),
    _Source(1, Session.finished_at, Session.session_id, _sessions_finished),
    _Source(2, Run.created_at, Run.run_id, _runs),
    _Source(3, Checkpoint.created_at, Checkpoint.id, _checkpoints),
    _Source(4, Op.created_at, Op.request_id, _ops(None)),
)
# event_type -> sources. TuFT has no projects, teams or organizations to audit: those are empty.
SOURCES: dict[str, tuple[_Source, ...]] = {
    "all": _ALL,
    "checkpoints": (_ALL[3], _Source(4, Op.created_at, Op.request_id, _ops(_CHECKPOINT_OPS))),
    "projects": (),
    "teams": (),
    "organizations": (),
}


def read_page(
    s: DbSession, tenant: str, event_type: str, start: float, end: float, limit: int, cursor: Cursor | None
) -> tuple[list[Entry], Cursor | None]:
    """Up to `limit` entries of [start, end) after `cursor`, and the cursor of the next page
    (None when this is the last)."""
    found: list[Entry] = []
    for src in SOURCES[event_type]:
        window = [src.ts >= start, src.ts < end, *_after(src, cursor)]
        found.extend(src.rows(s, tenant, window, limit + 1))
    found.sort(key=lambda e: (e.timestamp, e.source, int(e.key) if e.source == 3 else e.key))
    page = found[:limit]
    more = len(found) > limit
    last = page[-1] if page else None
    return page, Cursor(last.timestamp, last.source, last.key) if more and last else None
