"""Why a future is still pending: the queue state a `try_again` reply reports (docs/architecture.md
"Queue state").

The SDK (0.25 to 0.38 alike) maps the `queue_state` string of a try_again onto its QueueState enum
(an unknown string becomes UNKNOWN, never an error) and, for any state but `active`, logs
"<Training|Sampling|Model creation> for <id> is paused. Reason: <queue_state_reason>" at most once a
minute (0.38's training and model-creation logger only once the pause has lasted 15 minutes). So
only the SDK's three values are used, `paused_capacity` for every wait on the server, and the
detail goes into `queue_state_reason`, the one field it shows; `queue_position` and
`queue_estimate_seconds` are extra keys that its parser ignores, for clients that read the JSON.

Computed only when a long poll ends without a result, so at most once per hold (25 s) per waiting
client: a few primary-key and index reads (the op, its run, the workers table, the run's ops
around its next_seq); for a queued sample one pass over the pending samples, the same window
claim_sample runs, whose size the backpressure limits bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session as DbSession

from app.db.engine import db_now
from app.db.models import Op, Run, Worker
from app.queue.leases import DEAD_AFTER_TTLS

# The SDK's own vocabulary (tinker.types.TryAgainResponse.queue_state); app/wire/responses.py
# declares the same literal for the body it writes.
QueueStateValue = Literal["active", "paused_capacity", "paused_rate_limit"]

# Recent finished ops of a run that the estimate averages over.
ESTIMATE_WINDOW = 20
PENDING = ("queued", "running")


@dataclass(frozen=True)
class QueueReport:
    state: QueueStateValue = "active"
    reason: str | None = None
    # Operations that run before this one (the run's earlier ops, or samples ahead in the fair queue).
    position: int | None = None
    # Seconds until this op's result, from the durations of the run's recent ops; None if unknown.
    estimate_seconds: float | None = None


ACTIVE = QueueReport()


def live_workers(s: DbSession, lease_ttl: float) -> int:
    cutoff = db_now(s) - DEAD_AFTER_TTLS * lease_ttl
    query = select(func.count()).where(Worker.stopped_at.is_(None), Worker.heartbeat_at >= cutoff)
    return int(s.execute(query).scalar_one())


def describe_wait(s: DbSession, request_id: str, lease_ttl: float) -> QueueReport:
    """The queue state of a pending future (request_id already checked against the tenant)."""
    op = s.execute(select(Op.kind, Op.status, Op.run_id, Op.seq).where(Op.request_id == request_id)).first()
    if op is None or op.status not in PENDING:
        # Finished since the poll gave up: the next poll gets the result.
        return ACTIVE
    if op.run_id is not None and op.seq is not None:
        return _training_op(s, op.run_id, op.seq, op.status, lease_ttl)
    if op.status == "running":
        return QueueReport(reason="running")
    workers = live_workers(s, lease_ttl)
    if workers == 0:
        return _no_worker()
    if op.kind != "sample":
        return ACTIVE
    ahead = _samples_ahead(s, request_id)
    if ahead == 0:
        return QueueReport(reason="next in the sampling queue", position=0)
    plural = "s" if ahead != 1 else ""
    return QueueReport(
        "paused_capacity",
        f"{ahead} sample{plural} ahead of this one in the fair sampling queue, served by {workers} worker(s)",
        position=ahead,
    )


def _no_worker() -> QueueReport:
    return QueueReport(
        "paused_capacity", "waiting for a worker: no TuFT worker is running (start one with `tuft worker`)"
    )


def _training_op(s: DbSession, run_id: str, seq: int, status: str, lease_ttl: float) -> QueueReport:
    run = s.execute(
        select(Run.status, Run.status_reason, Run.owner_worker, Run.lease_expires_at, Run.next_seq).where(
            Run.run_id == run_id
        )
    ).first()
    if run is None:
        return ACTIVE
    if run.status in ("paused", "blocked"):
        why = run.status_reason or "no reason recorded"
        return QueueReport(
            "paused_capacity",
            f"training run {run_id} is {run.status} ({why}); it runs again after `tuft runs resume {run_id}`",
        )
    if run.status != "active":
        return QueueReport("paused_capacity", f"training run {run_id} is {run.status}")
    ahead = max(seq - run.next_seq, 0)
    owned = run.owner_worker is not None and run.lease_expires_at is not None and run.lease_expires_at >= db_now(s)
    if not owned:
        workers = live_workers(s, lease_ttl)
        if workers == 0:
            return _no_worker()
        return QueueReport(
            "paused_capacity", f"waiting for one of {workers} live worker(s) to take training run {run_id}", ahead
        )
    if status == "running":
        return QueueReport(reason="running", position=0, estimate_seconds=_estimate(s, run_id, run.next_seq, 1))
    if ahead == 0:
        return QueueReport(reason="next in its run", position=0, estimate_seconds=_estimate(s, run_id, seq, 1))
    arrived = s.execute(
        select(func.count()).where(Op.run_id == run_id, Op.seq >= run.next_seq, Op.seq < seq)
    ).scalar_one()
    if arrived < ahead:
        first_gap = _first_gap(s, run_id, run.next_seq, seq)
        return QueueReport(
            reason=f"waiting for seq_id {first_gap} of training run {run_id}, which has not been sent yet",
            position=ahead,
        )
    return QueueReport(
        reason=f"{ahead} earlier operation(s) of training run {run_id} run first",
        position=ahead,
        estimate_seconds=_estimate(s, run_id, run.next_seq, ahead + 1),
    )


def _first_gap(s: DbSession, run_id: str, start: int, end: int) -> int:
    seqs = s.execute(
        select(Op.seq).where(Op.run_id == run_id, Op.seq >= start, Op.seq < end).order_by(Op.seq)
    ).scalars()
    expected = start
    for got in seqs:
        if got != expected:
            return expected
        expected += 1
    return expected


def _estimate(s: DbSession, run_id: str, next_seq: int, ops: int) -> float | None:
    """`ops` times the mean duration of the run's last ESTIMATE_WINDOW finished ops (a range read
    on the (run_id, seq) unique index); None without any history."""
    recent = (
        select((Op.finished_at - Op.started_at).label("took"))
        .where(
            Op.run_id == run_id,
            Op.seq < next_seq,
            Op.seq >= next_seq - ESTIMATE_WINDOW,
            Op.status == "succeeded",
            Op.started_at.is_not(None),
            Op.finished_at.is_not(None),
        )
        .subquery()
    )
    mean = s.execute(select(func.avg(recent.c.took))).scalar_one()
    return None if mean is None else round(float(mean) * ops, 1)


def _samples_ahead(s: DbSession, request_id: str) -> int:
    """Queued samples that claim_sample hands out before this one: each pending sample's turn is
    its rank within its tenant (claim.claim_sample); a lower turn goes first, and at an equal turn
    an older sample is counted as ahead (the workers' round robin between tenants is not known
    here)."""
    pending = (
        select(
            Op.request_id.label("request_id"),
            Op.status.label("status"),
            Op.created_at.label("created_at"),
            func.row_number().over(partition_by=Op.tenant, order_by=(Op.created_at, Op.request_id)).label("turn"),
        )
        .where(Op.kind == "sample", Op.status.in_(PENDING))
        .subquery()
    )
    me = s.execute(select(pending.c.turn, pending.c.created_at).where(pending.c.request_id == request_id)).first()
    if me is None:
        return 0
    query = select(func.count()).where(
        pending.c.status == "queued",
        pending.c.request_id != request_id,
        or_(pending.c.turn < me.turn, and_(pending.c.turn == me.turn, pending.c.created_at < me.created_at)),
    )
    return int(s.execute(query).scalar_one())
