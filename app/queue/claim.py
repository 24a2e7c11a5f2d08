"""Finding and claiming work (reliability-design.md §4.4 "Claim").

Training ops run strictly in seq order: only the op whose seq equals its run's next_seq is ready,
so a gap (a later chunk that arrived first) simply waits. Sampling ops are independent and go to
whichever worker claims them first, taken fairly between tenants (claim_sample); one that has
ended its worker on every claim up to max_op_attempts is failed instead (fail_poison_samples).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import and_, bindparam, case, func, literal, select, update
from sqlalchemy.orm import Session as DbSession

from app.db.engine import db_clock, db_now
from app.db.models import Op, Run


@dataclass(frozen=True)
class ReadyOp:
    request_id: str
    run_id: str
    seq: int
    epoch: int
    kind: str
    status: str  # queued | running (a stale claim) | failed (rejected at submission)
    payload: bytes
    attempt: int  # claims so far; each one that did not commit ended with its worker


def ready_run_ops(s: DbSession, worker_id: str) -> list[ReadyOp]:
    """The next op of every active run this worker owns, in one query."""
    rows = s.execute(
        select(Op.request_id, Op.run_id, Op.seq, Run.lease_epoch, Op.kind, Op.status, Op.payload, Op.attempt)
        .join(Run, and_(Op.run_id == Run.run_id, Op.seq == Run.next_seq))
        .where(Run.owner_worker == worker_id, Run.status == "active", Op.status != "succeeded")
        .order_by(Run.last_request_at)
    ).all()
    # run_id and seq are never NULL here: the join is on them.
    return [ReadyOp(r[0], r[1] or "", r[2] or 0, r[3], r[4], r[5], r[6], r[7]) for r in rows]


# Built once (with bound parameters): constructing a statement costs more CPU than running it
# (about 1 ms here against 0.5 on the 2-core machine), and the worker's loop runs these for every
# op. No ORM objects are in these units of work, so there is nothing to synchronize.
_STILL_OURS = (
    select(Run.run_id)
    .where(
        Run.run_id == bindparam("b_run_id"),
        Run.owner_worker == bindparam("b_worker_id"),
        Run.lease_epoch == bindparam("b_epoch"),
        Run.next_seq == bindparam("b_seq"),
    )
    .exists()
)
_CLAIM_RUN_OP = (
    update(Op)
    .where(Op.request_id == bindparam("b_request_id"), Op.status.in_(("queued", "running")), _STILL_OURS)
    .values(
        status="running",
        attempt=Op.attempt + 1,
        claimed_epoch=bindparam("b_epoch"),
        claimed_by=bindparam("b_worker_id"),
        started_at=db_clock(),
    )
    .execution_options(synchronize_session=False)
)


def claim_run_op(s: DbSession, worker_id: str, op: ReadyOp) -> bool:
    """Mark the op running under our epoch; False if the lease or the op moved meanwhile."""
    result = s.execute(
        _CLAIM_RUN_OP,
        {
            "b_run_id": op.run_id,
            "b_worker_id": worker_id,
            "b_epoch": op.epoch,
            "b_seq": op.seq,
            "b_request_id": op.request_id,
        },
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


@dataclass(frozen=True)
class ClaimedSample:
    request_id: str
    sampler_id: str
    payload: bytes
    tenant: str = ""


# The tenant each worker (by id) served last, for the round-robin tie-break in claim_sample. A
# worker process claims from one thread; losing this on restart only restarts the rotation.
_last_served: dict[str, str] = {}


@dataclass(frozen=True)
class PoisonSample:
    """A sample failed by fail_poison_samples (the caller logs it once the transaction commits)."""

    request_id: str
    tenant: str
    attempts: int
    message: str


def poison_sample_message(attempts: int) -> str:
    return (
        f"this sample was attempted {attempts} times and each attempt ended its worker; it is failed "
        "so that it cannot take down more workers (see docs/reliability.md)"
    )


def fail_poison_samples(s: DbSession, max_attempts: int) -> list[PoisonSample]:
    """Fail (category server) every queued sample already claimed `max_attempts` times.

    A queued sample's `attempt` counts exactly the claims that ended without an outcome: a commit
    makes it terminal and a hand-back after an outage undoes its count (handback.py), so each one
    left ended with its worker (killed, or hung past its claim). Run again, it would most likely
    take down one more worker, and with it every tenant's sampling and training on that worker.

    Decided here, at claim time, by the worker that would otherwise take the sample next, rather
    than in the sweeper's requeue: it is the moment a training op's poison limit is applied too
    (workers/runner.py, _fail_poison); it holds whatever way a sample got back to the queue (the
    sweeper's requeue of a lapsed claim, or leases.release_all by a worker exiting after a sticky
    device error, which the sweeper never sees); and the worker already has the limit in its
    settings, which the sweeper's steps are not given. It costs one query on the (kind, status)
    index per claim, over the pending samples (bounded by backpressure), and it touches no other
    sample, so the fair order of claim_sample is unchanged. SKIP LOCKED: a row another worker is
    failing right now is that worker's job."""
    rows = s.execute(
        select(Op.request_id, Op.tenant, Op.attempt)
        .where(Op.kind == "sample", Op.status == "queued", Op.attempt >= max_attempts)
        .order_by(Op.created_at, Op.request_id)
        .with_for_update(skip_locked=True)
    ).all()
    failed: list[PoisonSample] = []
    now = db_now(s)
    for request_id, tenant, attempts in rows:
        message = poison_sample_message(attempts)
        done = s.execute(
            update(Op)
            .where(Op.request_id == request_id, Op.status == "queued")
            .values(
                status="failed",
                error_message=message,
                error_category="server",
                finished_at=now,
                claimed_by=None,
                claim_expires_at=None,
            )
        )
        if done.rowcount == 1:  # type: ignore[attr-defined]
            failed.append(PoisonSample(request_id, tenant, attempts, message))
    return failed


def claim_sample(
    s: DbSession, worker_id: str, claim_ttl: float, *, max_attempts: int | None = None
) -> ClaimedSample | None:
    """Take the next queued sample, fairly between tenants (docs/sampling.md "Fairness").

    Each pending (queued or running) sample gets its turn within its tenant: 1 for the tenant's
    oldest, 2 for the next... A running sample holds its turn, so a tenant with samples in service
    waits behind one with none. The lowest turn goes first; among equal turns, the tenant after the
    one this worker served last (in name order, wrapping round), then the oldest. So a light
    tenant's sample is served within about one sample per other active tenant, however long a heavy
    tenant's backlog is. One query over the pending samples (the (kind, status) index; their number
    is bounded by the backpressure limits). Postgres: SKIP LOCKED lets workers claim side by side;
    SQLite: BEGIN IMMEDIATE already serialises writers (FOR UPDATE is dropped there).

    With `max_attempts`, a sample claimed that many times is never handed out again, even if it
    went back to the queue after this transaction's fail_poison_samples looked (PostgreSQL: the
    sweeper's requeue committing in between); the next fail_poison_samples fails it."""
    now = db_now(s)
    pending = (
        select(
            Op.request_id.label("request_id"),
            func.row_number().over(partition_by=Op.tenant, order_by=(Op.created_at, Op.request_id)).label("turn"),
        )
        .where(Op.kind == "sample", Op.status.in_(("queued", "running")))
        .subquery()
    )
    last = _last_served.get(worker_id)
    after_last = case((Op.tenant > last, 0), else_=1) if last is not None else literal(0)
    ready = [Op.kind == "sample", Op.status == "queued"]
    if max_attempts is not None:
        ready.append(Op.attempt < max_attempts)
    row = s.execute(
        select(Op.request_id, Op.sampler_id, Op.payload, Op.tenant)
        .join(pending, pending.c.request_id == Op.request_id)
        .where(*ready)
        .order_by(pending.c.turn, after_last, Op.tenant, Op.created_at, Op.request_id)
        .limit(1)
        .with_for_update(of=Op, skip_locked=True)
    ).first()
    if row is None:
        return None
    s.execute(
        update(Op)
        .where(Op.request_id == row[0])
        .values(
            status="running",
            attempt=Op.attempt + 1,
            claimed_by=worker_id,
            claim_expires_at=now + claim_ttl,
            started_at=now,
        )
    )
    _last_served[worker_id] = row[3]
    return ClaimedSample(row[0], row[1] or "", row[2], row[3])


def requeue_expired_samples(s: DbSession) -> int:
    """Samples whose worker stopped renewing its claim go back to the queue."""
    result = s.execute(
        update(Op)
        .where(Op.kind == "sample", Op.status == "running", Op.claim_expires_at < db_now(s))
        .values(status="queued", claimed_by=None, claim_expires_at=None)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def renew_sample_claims(s: DbSession, worker_id: str, claim_ttl: float) -> None:
    s.execute(
        update(Op)
        .where(Op.kind == "sample", Op.status == "running", Op.claimed_by == worker_id)
        .values(claim_expires_at=db_now(s) + claim_ttl)
    )
