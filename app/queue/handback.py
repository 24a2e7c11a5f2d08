"""A worker handing work back without a result (docs/reliability.md, "What each fault does").

- An op it claimed but could not finish for a reason that is not the op's (the database or Redis
  went away mid-op): the claim is undone, attempt count included, since `attempt` counts the
  claims that ended their worker (the poison-op rule) and this one did not.
- A run it evicts from its memory (idle, or over `max_resident_runs`): the lease is released so
  any worker may take the run, which it rebuilds from its snapshot + replay.

Every statement is guarded by the owner and the epoch the worker holds, so a hand-back from a
worker that has already lost the run changes nothing.
"""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.orm import Session as DbSession

from app.db.models import Op, Run


def give_back_op(s: DbSession, *, worker_id: str, request_id: str, epoch: int) -> bool:
    """Undo our claim of a run op; False if it is no longer ours (the lease moved: nothing to do)."""
    result = s.execute(
        update(Op)
        .where(
            Op.request_id == request_id,
            Op.status == "running",
            Op.claimed_by == worker_id,
            Op.claimed_epoch == epoch,
            Op.attempt > 0,
        )
        .values(status="queued", attempt=Op.attempt - 1)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def give_back_sample(s: DbSession, *, worker_id: str, request_id: str) -> bool:
    """Put a sample we claimed back in the queue for any worker."""
    result = s.execute(
        update(Op)
        .where(Op.request_id == request_id, Op.status == "running", Op.claimed_by == worker_id, Op.attempt > 0)
        .values(status="queued", attempt=Op.attempt - 1, claimed_by=None, claim_expires_at=None)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def release_run(s: DbSession, *, worker_id: str, run_id: str, epoch: int) -> bool:
    """Give up the lease of an evicted run. The next owner bumps the epoch when it takes it."""
    result = s.execute(
        update(Run)
        .where(Run.run_id == run_id, Run.owner_worker == worker_id, Run.lease_epoch == epoch)
        .values(owner_worker=None, lease_expires_at=None)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]
