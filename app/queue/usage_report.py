"""Usage per tenant (GET /api/v1/billing/usage/*, docs/audit-and-usage.md): tokens trained and
sampled, and checkpoints saved, in UTC hour buckets, from the counts stored on each op
(ops.input_tokens / output_tokens, migration 0006); and the checkpoint storage held now.

Only succeeded ops count, bucketed by when they finished. Ops recorded before migration 0006 have
no counts and add nothing. Every query is one tenant's, over one window, grouped in the database.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Integer, cast, func, select
from sqlalchemy.orm import Session as DbSession

from app.db.engine import db_now
from app.db.models import Checkpoint, Op, Run, Sampler, Session

HOUR = 3600


@dataclass(frozen=True)
class Bucket:
    hour: int  # hours since the epoch
    usage: str  # training | sampling_prefill | sampling_sample | checkpoint
    base_model: str | None
    session_id: str | None
    quantity: int


def _hour(s: DbSession) -> Any:
    # Whole hours since the epoch. PostgreSQL's cast rounds, hence floor; SQLite's truncates,
    # which is the floor for the positive times stored here, and it has no floor() everywhere.
    if s.get_bind().dialect.name == "postgresql":
        return cast(func.floor(Op.finished_at / HOUR), Integer)
    return cast(Op.finished_at / HOUR, Integer)


def buckets(s: DbSession, tenant: str, start: float, end: float, limit: int) -> tuple[list[Bucket], bool]:
    """The tenant's usage in [start, end), ordered by hour then largest quantity first, at most
    `limit` of them; and whether there were more."""
    hour = _hour(s).label("hour")
    window = (Op.tenant == tenant, Op.status == "succeeded", Op.finished_at >= start, Op.finished_at < end)
    # A sample's base model and session come from its sampler; a training op's from its run.
    by_run = (Run.base_model, Run.session_id, Run, Op.run_id == Run.run_id)
    by_sampler = (Sampler.base_model, Sampler.session_id, Sampler, Op.sampler_id == Sampler.sampler_id)
    queries: list[tuple[str, Any, Any, tuple[Any, Any, Any, Any]]] = [
        ("training", func.sum(Op.input_tokens), Op.kind == "forward_backward", by_run),
        ("checkpoint", func.count(), Op.kind == "save_weights", by_run),
        ("sampling_prefill", func.sum(Op.input_tokens), Op.kind == "sample", by_sampler),
        ("sampling_sample", func.sum(Op.output_tokens), Op.kind == "sample", by_sampler),
    ]
    found: list[Bucket] = []
    for usage, quantity, kind, (base_model, session_id, owner, join) in queries:
        q = (
            select(hour, base_model, session_id, quantity.label("quantity"))
            .select_from(Op)
            .outerjoin(owner, join)
            .where(*window, kind)
            .group_by(hour, base_model, session_id)
            .order_by(hour, quantity.desc(), base_model, session_id)
            .limit(limit + 1)
        )
        for row in s.execute(q):
            if row.quantity:  # a sum over ops without counts (before migration 0006) is NULL
                found.append(Bucket(int(row.hour), usage, row.base_model, row.session_id, int(row.quantity)))
    found.sort(key=lambda b: (b.hour, -b.quantity, b.usage, b.base_model or "", b.session_id or ""))
    return found[:limit], len(found) > limit


def session_metadata(s: DbSession, tenant: str, session_ids: set[str]) -> dict[str, dict[str, Any]]:
    ids = sorted(session_ids)
    found: dict[str, dict[str, Any]] = {}
    for i in range(0, len(ids), 500):
        rows = s.execute(
            select(Session.session_id, Session.user_metadata).where(
                Session.tenant == tenant, Session.session_id.in_(ids[i : i + 500])
            )
        )
        found.update({r.session_id: r.user_metadata or {} for r in rows})
    return found


def checkpoint_storage(s: DbSession, tenant: str) -> tuple[int, int]:
    """(count, bytes) of the tenant's checkpoints held now: listed ones, not expired."""
    now = db_now(s)
    row = s.execute(
        select(func.count(), func.coalesce(func.sum(Checkpoint.size_bytes), 0)).where(
            Checkpoint.tenant == tenant,
            Checkpoint.ephemeral.is_(False),
            (Checkpoint.expires_at.is_(None)) | (Checkpoint.expires_at >= now),
        )
    ).one()
    return int(row[0]), int(row[1])
