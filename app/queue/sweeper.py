"""One sweeper pass (reliability-design.md §2.2): repair what lost messages and dead processes
leave behind. Every statement is guarded, so two passes racing each other are harmless; the
singleton lease below keeps it to one active sweeper anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session as DbSession

from app.db.engine import db_now
from app.db.models import Checkpoint, Op, Run, Singleton, Worker
from app.queue.claim import requeue_expired_samples
from app.queue.submit import NEW_RUNS_QUEUE, Wakeup

# A queued op this old with no progress has probably lost its wake-up: ring again.
STALE_WAKEUP_SECONDS = 5.0
# Expired checkpoints deleted per pass: keeps each pass's transaction short; the rest go next time.
EXPIRE_CHECKPOINTS_BATCH = 200


@dataclass
class SweepReport:
    expired_leases: list[str] = field(default_factory=list)
    dead_workers: list[str] = field(default_factory=list)
    requeued_samples: int = 0
    expired_results: int = 0
    # Storage paths (relative to the checkpoint dir) of the checkpoints whose rows were deleted;
    # the caller removes their files once this pass has committed.
    expired_checkpoints: list[str] = field(default_factory=list)
    wakeups: list[Wakeup] = field(default_factory=list)


def hold_singleton(s: DbSession, name: str, holder: str, ttl: float) -> bool:
    """Take or renew the named lease; True if `holder` has it now."""
    now = db_now(s)
    if s.get(Singleton, name) is None:
        try:
            with s.begin_nested():
                s.add(Singleton(name=name, holder=holder, expires_at=now + ttl))
            return True
        except IntegrityError:
            pass
    taken = s.execute(
        update(Singleton)
        .where(Singleton.name == name, or_(Singleton.holder == holder, Singleton.expires_at < now))
        .values(holder=holder, expires_at=now + ttl)
    )
    return taken.rowcount == 1  # type: ignore[attr-defined]


def expire_leases(s: DbSession, report: SweepReport) -> None:
    """Runs whose owner stopped renewing: bump the epoch (fencing the old owner out), put the op
    it was running back in the queue (its attempt count kept), and wake any worker."""
    now = db_now(s)
    expired = s.execute(select(Run.run_id).where(Run.owner_worker.is_not(None), Run.lease_expires_at < now)).scalars()
    for run_id in list(expired):
        taken = s.execute(
            update(Run)
            .where(Run.run_id == run_id, Run.owner_worker.is_not(None), Run.lease_expires_at < now)
            .values(owner_worker=None, lease_epoch=Run.lease_epoch + 1, lease_expires_at=None)
        )
        if taken.rowcount == 1:  # type: ignore[attr-defined]
            s.execute(update(Op).where(Op.run_id == run_id, Op.status == "running").values(status="queued"))
            report.expired_leases.append(run_id)
            report.wakeups.append(Wakeup(NEW_RUNS_QUEUE, run_id))


def mark_dead_workers(s: DbSession, ttl: float, report: SweepReport) -> None:
    cutoff = db_now(s) - 3 * ttl
    dead = s.execute(
        select(Worker.worker_id).where(Worker.stopped_at.is_(None), Worker.heartbeat_at < cutoff)
    ).scalars()
    for worker_id in list(dead):
        s.execute(update(Worker).where(Worker.worker_id == worker_id).values(stopped_at=db_now(s)))
        report.dead_workers.append(worker_id)


def rering_stale(s: DbSession, report: SweepReport) -> None:
    """Ops waiting at their run's next_seq for a while: their wake-up was probably lost (Redis
    restarted without persistence, a consumer hung after a reconnect...)."""
    cutoff = db_now(s) - STALE_WAKEUP_SECONDS
    rows = s.execute(
        select(Run.run_id, Worker.queue)
        .join(Op, and_(Op.run_id == Run.run_id, Op.seq == Run.next_seq))
        .outerjoin(Worker, and_(Worker.worker_id == Run.owner_worker, Worker.stopped_at.is_(None)))
        .where(Run.status == "active", Op.status == "queued", Op.created_at < cutoff)
    ).all()
    report.wakeups += [Wakeup(queue or NEW_RUNS_QUEUE, run_id) for run_id, queue in rows]
    waiting_sample = s.execute(
        select(Op.request_id).where(Op.kind == "sample", Op.status == "queued", Op.created_at < cutoff).limit(1)
    ).first()
    if waiting_sample is not None:
        report.wakeups.append(Wakeup(NEW_RUNS_QUEUE, None))


def expire_results(s: DbSession, retention: float, report: SweepReport) -> None:
    """Results are kept until delivered, then `retention` seconds (0 keeps them forever)."""
    if retention <= 0:
        return
    cutoff = db_now(s) - retention
    done = s.execute(
        update(Op).where(Op.delivered_at < cutoff, Op.result.is_not(None), Op.status == "succeeded").values(result=None)
    )
    report.expired_results = int(done.rowcount)  # type: ignore[attr-defined]


def expire_checkpoints(s: DbSession, report: SweepReport) -> None:
    """Checkpoints past their expires_at (published ones too: a TTL is the owner's decision) lose
    their rows here. Each delete re-checks the expiry, so a TTL extended or removed meanwhile wins."""
    now = db_now(s)
    due = s.execute(
        select(Checkpoint.id, Checkpoint.storage_path)
        .where(Checkpoint.expires_at < now)
        .order_by(Checkpoint.expires_at)
        .limit(EXPIRE_CHECKPOINTS_BATCH)
    ).all()
    for checkpoint_id, storage_path in due:
        gone = s.execute(delete(Checkpoint).where(Checkpoint.id == checkpoint_id, Checkpoint.expires_at < now))
        if gone.rowcount == 1:  # type: ignore[attr-defined]
            report.expired_checkpoints.append(storage_path)


def sweep(s: DbSession, *, lease_ttl: float, result_retention: float) -> SweepReport:
    report = SweepReport()
    expire_leases(s, report)
    mark_dead_workers(s, lease_ttl, report)
    report.requeued_samples = requeue_expired_samples(s)
    rering_stale(s, report)
    expire_results(s, result_retention, report)
    expire_checkpoints(s, report)
    return report
