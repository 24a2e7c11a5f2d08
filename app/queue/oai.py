"""The queue side of the OpenAI-compatible endpoint (app/domain/oai.py says why it is a sample op)."""

from __future__ import annotations

from sqlalchemy import or_, select
from sqlalchemy.orm import Session as DbSession

from app.db.engine import db_now
from app.db.models import Checkpoint, Op
from app.domain import ids
from app.domain.oai import OaiCompletionOp
from app.domain.ops import canonical_bytes, op_sha256
from app.queue.submit import NEW_RUNS_QUEUE, Submitted, Wakeup


def submit_completion(s: DbSession, tenant: str, op: OaiCompletionOp) -> Submitted:
    """Queue one completion. It has no sampler row and no sequence number: every HTTP request is a
    new op (an OpenAI client has no idempotency key to dedupe a retry on)."""
    row = Op(
        request_id=ids.new_request_id(),
        tenant=tenant,
        kind="sample",
        mutates=False,
        request_sha256=op_sha256(op),
        payload=canonical_bytes(op),
        status="queued",
        attempt=0,
        created_at=db_now(s),
    )
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
