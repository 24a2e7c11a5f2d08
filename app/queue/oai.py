"""The queue side of the OpenAI-compatible endpoint (app/domain/oai.py says why it is a sample op)."""

from __future__ import annotations

from sqlalchemy import or_, select
from sqlalchemy.orm import Session as DbSession

from app.db.engine import db_now
from app.db.models import Checkpoint
from app.domain.oai import OaiCompletionOp
from app.queue.submit import NEW_RUNS_QUEUE, Submitted, Wakeup, sample_row


def submit_completion(s: DbSession, tenant: str, op: OaiCompletionOp) -> Submitted:
    """Queue one completion. It has no sampler row and no sequence number: every HTTP request is a
    new op (an OpenAI client has no idempotency key to dedupe a retry on)."""
    row = sample_row(s, tenant, op)
    s.add(row)
    s.flush()
    return Submitted(row.request_id, Wakeup(NEW_RUNS_QUEUE, None))


def visible_sampler_checkpoints(s: DbSession, tenant: str, limit: int) -> list[Checkpoint]:
    """Named, live sampler checkpoints the tenant may sample: its own and published ones, newest first."""
    rows = s.execute(
        select(Checkpoint)
        .where(
            Checkpoint.kind == "sampler",
            Checkpoint.ephemeral.is_(False),
            or_(Checkpoint.tenant == tenant, Checkpoint.public.is_(True)),
            or_(Checkpoint.expires_at.is_(None), Checkpoint.expires_at >= db_now(s)),
        )
        .order_by(Checkpoint.created_at.desc(), Checkpoint.id.desc())
        .limit(limit)
    ).scalars()
    return list(rows)
