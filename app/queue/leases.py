"""Worker registration and run leases (reliability-design.md §2.2-2.3).

A worker owns a run under a lease with an epoch. Taking a run (free, or expired by the database
clock) bumps the epoch, so every write the previous owner might still attempt carries a stale
epoch and is rejected by the fenced commit in commit.py.

Lock order (deadlock freedom, issue 7 item 3): a transaction that locks several rows locks `runs`
rows first, in run_id order, then its `workers` row, then `ops` rows. Every function here and in
commit.py/claim.py/sweeper.py follows it (the sweeper takes back one run per transaction).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import and_, exists, or_, select, update
from sqlalchemy.orm import Session as DbSession

from app.db.engine import db_now
from app.db.models import Op, Run, Worker


@dataclass(frozen=True)
class Lease:
    run_id: str
    epoch: int


# A worker whose heartbeat is this many lease TTLs old is dead: the sweeper marks it so
# (sweeper.mark_dead_workers) and the queue state stops counting it (queue_state.live_workers).
DEAD_AFTER_TTLS = 3
# Runs one worker pass takes at most (the sweeper rings the shared queue once per batch).
ACQUIRE_BATCH = 8


def worker_state(stopped_at: float | None, heartbeat_age: float, lease_ttl: float) -> str:
    """live, dead or stopped, as operators are told (`tuft workers list`, /metrics). Dead as soon
    as the heartbeat is older than the lease TTL: from then on every lease it held may be taken
    over, so it runs nothing it could commit. The sweeper waits DEAD_AFTER_TTLS before it marks
    the row stopped, because a worker that was only paused must undo that when it beats again."""
    if stopped_at is not None:
        return "stopped"
    return "dead" if heartbeat_age > lease_ttl else "live"


def register_worker(s: DbSession, *, worker_id: str, host: str, device: str, queue: str, pid: int) -> None:
    now = db_now(s)
    s.add(
        Worker(
            worker_id=worker_id,
            host=host,
            device=device,
            queue=queue,
            pid=pid,
            started_at=now,
            heartbeat_at=now,
        )
    )
    s.flush()


def set_listens(s: DbSession, worker_id: str, listens: bool) -> None:
    """Whether this worker hears `NOTIFY tuft_work` (workers/pglisten.py); the API leaves the Celery
    message out for the runs of a worker that does (submit.submit_run_op)."""
    s.execute(
        update(Worker)
        .where(Worker.worker_id == worker_id)
        .values(listens=listens)
        .execution_options(synchronize_session=False)
    )


def heartbeat_age(s: DbSession, pid: int, started_after: float) -> float | None:
    """Seconds since the last heartbeat of the worker process `pid` registered after
    `started_after` (a database-clock time), or None while it has not registered."""
    row = s.execute(
        select(Worker.heartbeat_at)
        .where(Worker.pid == pid, Worker.started_at >= started_after)
        .order_by(Worker.started_at.desc())
        .limit(1)
    ).first()
    return None if row is None else db_now(s) - row.heartbeat_at


def heartbeat(s: DbSession, worker_id: str, ttl: float) -> list[Lease]:
    """Renew the worker row and every lease it holds; return the leases still held.

    A run missing from the answer was taken over: the caller must drop its state for it.
    """
    now = db_now(s)
    owned = _lock_runs_in_order(s, Run.owner_worker == worker_id)
    if owned:
        s.execute(update(Run).where(Run.run_id.in_(owned)).values(lease_expires_at=now + ttl))
    # A worker the sweeper declared dead (a long pause) is live again once it beats.
    s.execute(update(Worker).where(Worker.worker_id == worker_id).values(heartbeat_at=now, stopped_at=None))
    rows = s.execute(select(Run.run_id, Run.lease_epoch).where(Run.owner_worker == worker_id)).all()
    return [Lease(r.run_id, r.lease_epoch) for r in rows]


def _lock_runs_in_order(s: DbSession, condition: object) -> list[str]:
    """Lock the matching runs rows in run_id order (FOR UPDATE; a no-op on SQLite, where BEGIN
    IMMEDIATE serialises writers): a multi-row UPDATE locks in scan order, which two
    transactions can see differently, and that is a deadlock."""
    return list(
        s.execute(select(Run.run_id).where(condition).order_by(Run.run_id).with_for_update()).scalars()  # type: ignore[arg-type]
    )


def acquire_runs(s: DbSession, worker_id: str, ttl: float, limit: int = ACQUIRE_BATCH) -> list[Lease]:
    """Take runs that have their next op waiting and no live owner. Each take bumps the epoch."""
    now = db_now(s)
    ready = exists().where(and_(Op.run_id == Run.run_id, Op.seq == Run.next_seq))
    candidates = (
        s.execute(
            select(Run.run_id)
            .where(
                Run.status == "active",
                or_(Run.owner_worker.is_(None), Run.lease_expires_at < now),
                ready,
            )
            .order_by(Run.last_request_at)
            .limit(limit)
        )
        .scalars()
        .all()
    )
    taken: list[Lease] = []
    # Chosen by age, locked in run_id order (the lock order above).
    for run_id in sorted(candidates):
        # Guarded: a concurrent worker may have taken it between the select and this update.
        result = s.execute(
            update(Run)
            .where(Run.run_id == run_id, or_(Run.owner_worker.is_(None), Run.lease_expires_at < now))
            .values(owner_worker=worker_id, lease_epoch=Run.lease_epoch + 1, lease_expires_at=now + ttl)
            .returning(Run.lease_epoch)
        )
        epoch = result.scalar_one_or_none()
        if epoch is not None:
            taken.append(Lease(run_id, epoch))
    return taken


def release_all(s: DbSession, worker_id: str) -> None:
    """Graceful stop: hand every run back at once instead of making others wait for the TTL."""
    _lock_runs_in_order(s, Run.owner_worker == worker_id)
    s.execute(update(Run).where(Run.owner_worker == worker_id).values(owner_worker=None, lease_expires_at=None))
    s.execute(update(Worker).where(Worker.worker_id == worker_id).values(stopped_at=db_now(s)))
    # Samples this worker claimed but did not finish go back to the queue.
    s.execute(
        update(Op)
        .where(Op.kind == "sample", Op.status == "running", Op.claimed_by == worker_id)
        .values(status="queued", claimed_by=None, claim_expires_at=None)
    )
