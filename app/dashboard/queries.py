"""The dashboard's reads: read-only, one bounded query per table, scoped to the viewer's tenant
(None: an admin, every tenant). Every list stops at a fixed number of rows and every op result is
read through a fixed-size tail, so no request parameter can make a page cost more."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session as DbSession
from sqlalchemy.orm import load_only

from app.db.models import Checkpoint, Op, Run, Sampler, Worker

RUNS_LIMIT = 200
OPS_LIMIT = 200
METRIC_OPS_LIMIT = 1000
CHECKPOINTS_LIMIT = 200
WORKERS_LIMIT = 100
HELD_RUNS_LIMIT = 1000
QUEUE_LIMIT = 5000
# The end of a stored result that is read for its metrics (see metric_ops).
RESULT_TAIL_BYTES = 4096
# Every op kind stored today: listing them lets the queue read go through the (kind, status) index
# instead of scanning the whole ops table, which holds every op ever run.
OP_KINDS = (
    "create_model",
    "forward_backward",
    "forward",
    "optim_step",
    "save_weights",
    "load_weights",
    "sample",
    "oai_completion",
)
PENDING = ("queued", "running")


def runs(s: DbSession, tenant: str | None) -> list[Run]:
    query = select(Run).order_by(Run.created_at.desc()).limit(RUNS_LIMIT)
    if tenant is not None:
        query = query.where(Run.tenant == tenant)
    return list(s.execute(query).scalars())


def run(s: DbSession, tenant: str | None, run_id: str) -> Run | None:
    row = s.get(Run, run_id)
    if row is None or (tenant is not None and row.tenant != tenant):
        return None  # another tenant's run is indistinguishable from none
    return row


@dataclass(frozen=True)
class MetricOp:
    seq: int
    kind: str
    # The last RESULT_TAIL_BYTES of the stored result JSON; None once retention dropped it.
    result_tail: bytes | None


def metric_ops(s: DbSession, run_id: str) -> list[MetricOp]:
    """The newest succeeded forward_backward and optim_step ops, oldest first. A forward_backward
    result also holds every datum's logprobs (megabytes for a large batch), but its metrics are
    the last field of the JSON (app/domain/results.py field order), so only the tail is read:
    substr() runs in the database on both dialects."""
    length = func.length(Op.result)
    start = case((length > RESULT_TAIL_BYTES, length - (RESULT_TAIL_BYTES - 1)), else_=1)
    query = (
        select(Op.seq, Op.kind, func.substr(Op.result, start))
        .where(Op.run_id == run_id, Op.kind.in_(("forward_backward", "optim_step")), Op.status == "succeeded")
        .order_by(Op.seq.desc())
        .limit(METRIC_OPS_LIMIT)
    )
    rows = s.execute(query).all()
    return [MetricOp(int(seq), kind, None if tail is None else bytes(tail)) for seq, kind, tail in reversed(rows)]


def timeline(s: DbSession, run_id: str) -> list[Op]:
    """The newest ops of a run with their times (payload and result are not loaded)."""
    query = (
        select(Op)
        .where(Op.run_id == run_id)
        .order_by(Op.seq.desc().nulls_last())
        .limit(OPS_LIMIT)
        .options(
            load_only(
                Op.seq,
                Op.kind,
                Op.status,
                Op.attempt,
                Op.created_at,
                Op.started_at,
                Op.finished_at,
                Op.error_message,
                Op.claimed_by,
            )
        )
    )
    return list(reversed(list(s.execute(query).scalars())))


def checkpoints(s: DbSession, tenant: str | None, run_id: str | None = None) -> list[Checkpoint]:
    query = select(Checkpoint).where(Checkpoint.ephemeral.is_(False))
    if tenant is not None:
        query = query.where(Checkpoint.tenant == tenant)
    if run_id is not None:
        query = query.where(Checkpoint.run_id == run_id)
    return list(s.execute(query.order_by(Checkpoint.created_at.desc()).limit(CHECKPOINTS_LIMIT)).scalars())


def workers(s: DbSession) -> list[Worker]:
    query = select(Worker).order_by(Worker.stopped_at.is_not(None), Worker.heartbeat_at.desc()).limit(WORKERS_LIMIT)
    return list(s.execute(query).scalars())


def held_runs(s: DbSession, tenant: str | None, worker_ids: list[str]) -> list[tuple[str, str, str]]:
    """(worker_id, run_id, tenant) of the runs whose lease those workers hold."""
    if not worker_ids:
        return []
    query = select(Run.owner_worker, Run.run_id, Run.tenant).where(Run.owner_worker.in_(worker_ids))
    if tenant is not None:
        query = query.where(Run.tenant == tenant)
    rows = s.execute(query.order_by(Run.run_id).limit(HELD_RUNS_LIMIT)).all()
    return [(str(w), str(r), str(t)) for w, r, t in rows]


@dataclass
class QueueGroup:
    base_model: str
    tenant: str
    queued: int = 0
    running: int = 0
    oldest_queued_at: float | None = None
    kinds: dict[str, int] | None = None


def queue(s: DbSession, tenant: str | None) -> tuple[list[QueueGroup], bool]:
    """Pending ops per (base model, tenant), from the QUEUE_LIMIT oldest: the second value says
    the limit was reached (the counts are then lower bounds)."""
    model = func.coalesce(Run.base_model, Sampler.base_model, "-")
    query = (
        select(Op.tenant, Op.kind, Op.status, Op.created_at, model)
        .outerjoin(Run, Run.run_id == Op.run_id)
        .outerjoin(Sampler, Sampler.sampler_id == Op.sampler_id)
        .where(Op.kind.in_(OP_KINDS), Op.status.in_(PENDING))
        .order_by(Op.created_at)
        .limit(QUEUE_LIMIT)
    )
    if tenant is not None:
        query = query.where(Op.tenant == tenant)
    rows = s.execute(query).all()
    groups: dict[tuple[str, str], QueueGroup] = {}
    for op_tenant, kind, status, created_at, base_model in rows:
        group = groups.setdefault((base_model, op_tenant), QueueGroup(base_model, op_tenant, kinds={}))
        if status == "running":
            group.running += 1
            continue
        group.queued += 1
        assert group.kinds is not None
        group.kinds[kind] = group.kinds.get(kind, 0) + 1
        if group.oldest_queued_at is None:
            group.oldest_queued_at = created_at  # rows come oldest first
    ordered = sorted(groups.values(), key=lambda g: (g.oldest_queued_at is None, g.oldest_queued_at or 0.0))
    return ordered, len(rows) >= QUEUE_LIMIT
