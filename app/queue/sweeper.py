"""One sweeper pass (reliability-design.md §2.2): repair what lost messages and dead processes
leave behind. Every statement is guarded, so two passes racing each other are harmless; the
singleton lease below keeps it to one active sweeper anyway.

`run_pass` (what the sweeper thread calls) runs each step in its own short transaction, and takes
back each expired lease in a transaction of its own: a pass never holds a lock while it waits on
another, so it can neither deadlock with a worker's heartbeat or commit (lock order in leases.py)
nor stall the deployment behind one paused worker's row (issue 7 item 3). A step that fails on a
database error (a lock timeout, a deadlock victim, a restart) is logged and the pass goes on; the
next pass retries it. `sweep` runs the same steps in one caller-owned session (tests).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session as DbSession

from app.db.engine import Database, db_now
from app.db.models import Checkpoint, Op, Run, Singleton, Worker
from app.queue import retention
from app.queue.claim import requeue_expired_samples
from app.queue.leases import ACQUIRE_BATCH, DEAD_AFTER_TTLS
from app.queue.stability import expire_records
from app.queue.submit import NEW_RUNS_QUEUE, Wakeup

log = logging.getLogger("tuft.sweeper")

# A queued op this old with no progress has probably lost its wake-up: ring again.
STALE_WAKEUP_SECONDS = 5.0
MAX_SHARED_RERINGS = 32
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
    retention: retention.RetentionReport = field(default_factory=retention.RetentionReport)
    # StableReinforce sampling records past their day (app/queue/stability.py).
    expired_stability_records: int = 0
    # Steps that failed on a database error this pass (retried next pass).
    failed_steps: list[str] = field(default_factory=list)


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
    for run_id in expired_runs(s):
        take_back(s, run_id, report)


def expired_runs(s: DbSession) -> list[str]:
    now = db_now(s)
    return list(
        s.execute(
            select(Run.run_id).where(Run.owner_worker.is_not(None), Run.lease_expires_at < now).order_by(Run.run_id)
        ).scalars()
    )


def take_back(s: DbSession, run_id: str, report: SweepReport) -> None:
    now = db_now(s)
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
    cutoff = db_now(s) - DEAD_AFTER_TTLS * ttl
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
    by_queue: dict[str, list[str]] = {}
    for run_id, queue in rows:
        by_queue.setdefault(queue or NEW_RUNS_QUEUE, []).append(run_id)
    for queue, run_ids in by_queue.items():
        # A ring wakes a worker to look at all its ready work, so its owner needs one per pass, not
        # one per run: with 1,000 runs behind a busy worker, one per run was a burst of 1,000 Redis
        # publishes every pass (bench/load_1000.py). On the shared queue each ring wakes one worker,
        # which takes up to ACQUIRE_BATCH runs: one ring per batch, at most MAX_SHARED_RERINGS.
        step = ACQUIRE_BATCH if queue == NEW_RUNS_QUEUE else len(run_ids)
        report.wakeups += [Wakeup(queue, run_id) for run_id in run_ids[::step][:MAX_SHARED_RERINGS]]
    waiting_sample = s.execute(
        select(Op.request_id).where(Op.kind == "sample", Op.status == "queued", Op.created_at < cutoff).limit(1)
    ).first()
    if waiting_sample is not None:
        report.wakeups.append(Wakeup(NEW_RUNS_QUEUE, None))


def expire_results(s: DbSession, retention_seconds: float, report: SweepReport) -> None:
    """Results are kept until delivered, then `retention` seconds (0 keeps them forever)."""
    report.expired_results += retention.expire_results(s, retention_seconds)


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


def apply_retention(s: DbSession, finished_run_retention: float, report: SweepReport) -> None:
    r = report.retention
    r.payloads_pruned += retention.prune_sample_payloads(s) + retention.prune_covered_payloads(s)
    retention.retire_finished_runs(s, finished_run_retention, r)


Step = Callable[[DbSession, SweepReport], object]


def _steps(lease_ttl: float, result_retention: float, finished_run_retention: float) -> list[tuple[str, Step]]:
    def requeue(s: DbSession, report: SweepReport) -> None:
        report.requeued_samples += requeue_expired_samples(s)

    def stability_records(s: DbSession, report: SweepReport) -> None:
        report.expired_stability_records += expire_records(s)

    return [
        ("dead_workers", lambda s, r: mark_dead_workers(s, lease_ttl, r)),
        ("samples", requeue),
        ("wakeups", rering_stale),
        ("results", lambda s, r: expire_results(s, result_retention, r)),
        ("checkpoints", expire_checkpoints),
        ("retention", lambda s, r: apply_retention(s, finished_run_retention, r)),
        ("stability_records", stability_records),
    ]


def sweep(
    s: DbSession, *, lease_ttl: float, result_retention: float, finished_run_retention: float = 0.0
) -> SweepReport:
    report = SweepReport()
    expire_leases(s, report)
    for _name, step in _steps(lease_ttl, result_retention, finished_run_retention):
        step(s, report)
    return report


def _merge(into: SweepReport, done: SweepReport) -> None:
    into.expired_leases += done.expired_leases
    into.dead_workers += done.dead_workers
    into.requeued_samples += done.requeued_samples
    into.expired_results += done.expired_results
    into.expired_checkpoints += done.expired_checkpoints
    into.expired_stability_records += done.expired_stability_records
    into.wakeups += done.wakeups
    into.retention.results_dropped += done.retention.results_dropped
    into.retention.payloads_pruned += done.retention.payloads_pruned
    into.retention.finished_runs += done.retention.finished_runs
    into.retention.snapshot_paths += done.retention.snapshot_paths


def run_pass(
    db: Database, *, lease_ttl: float, result_retention: float, finished_run_retention: float = 0.0
) -> SweepReport:
    """One pass in short transactions: leases first (one run per transaction), then the rest.
    A step's findings join the report only once its transaction has committed: the caller deletes
    files on the strength of it."""
    report = SweepReport()

    def attempt(name: str, step: Step) -> None:
        done = SweepReport()
        try:
            with db.write() as s:
                step(s, done)
        except DBAPIError as exc:
            # A lock timeout behind a paused process, a deadlock victim, a restart: next pass.
            report.failed_steps.append(name)
            log.warning("sweeper step %s failed (retried next pass): %s", name, type(exc.orig).__name__)
            return
        _merge(report, done)

    found: list[str] = []
    attempt("leases", lambda s, _r: found.extend(expired_runs(s)))
    for run_id in found:
        attempt("leases", lambda s, r, run_id=run_id: take_back(s, run_id, r))  # type: ignore[misc]
    for name, step in _steps(lease_ttl, result_retention, finished_run_retention):
        attempt(name, step)
    return report
