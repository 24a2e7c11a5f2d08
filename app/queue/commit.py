"""Fenced commits (reliability-design.md §2.3).

An op is done exactly when its result and the run's applied_seq commit in one transaction guarded
by the worker's lease epoch. Zero rows updated means the lease moved on (this worker is a zombie)
or the op was already committed: the caller must discard its state for the run and stop.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Integer, and_, bindparam, or_, update
from sqlalchemy.orm import Session as DbSession

from app.db.engine import db_clock
from app.db.models import Op, Run
from app.domain.usage import sample_counts
from app.queue.notify import signal_done, signal_done_on


class Fenced(Exception):
    """This worker no longer holds the lease it wrote under; nothing was written."""


@dataclass(frozen=True)
class Outcome:
    result: bytes | None = None
    error_message: str | None = None
    error_category: str | None = None
    # forward_backward: the micro-batch budget it ran with, so a replay splits it the same way.
    micro_batch_tokens: int | None = None

    @property
    def failed(self) -> bool:
        return self.error_message is not None


# Built once, with bound parameters (see claim._CLAIM_RUN_OP for why); the op's UPDATE in one
# form per dialect, as its RETURNING differs (notify.signal_done_on).
_ADVANCE_RUN = (
    update(Run)
    .where(
        Run.run_id == bindparam("b_run_id"),
        Run.owner_worker == bindparam("b_worker_id"),
        Run.lease_epoch == bindparam("b_epoch"),
        Run.next_seq == bindparam("b_seq"),
    )
    .values(
        applied_seq=bindparam("b_seq"),
        next_seq=bindparam("b_seq") + 1,
        optimizer_steps=Run.optimizer_steps + bindparam("b_steps", type_=Integer()),
    )
    .execution_options(synchronize_session=False)
)
# `queued`: a claim that a database crash lost (claims commit without waiting for the disk:
# Database.write_relaxed). The run's fence in the same transaction (owner, epoch and next_seq)
# already proves that nobody else can have this op, so its result is recorded all the same.
_RECORD_OP = (
    update(Op)
    .where(
        Op.request_id == bindparam("b_request_id"),
        or_(and_(Op.status == "running", Op.claimed_epoch == bindparam("b_epoch")), Op.status == "queued"),
    )
    .values(
        status=bindparam("b_status", type_=Op.status.type),
        result=bindparam("b_result", type_=Op.result.type),
        error_message=bindparam("b_error_message", type_=Op.error_message.type),
        error_category=bindparam("b_error_category", type_=Op.error_category.type),
        micro_batch_tokens=bindparam("b_micro_batch_tokens", type_=Op.micro_batch_tokens.type),
        finished_at=db_clock(),
    )
    .execution_options(synchronize_session=False)
)
_RECORD_OP_BY_DIALECT = {name: signal_done_on(name, _RECORD_OP) for name in ("postgresql", "sqlite")}


def commit_run_op(
    s: DbSession,
    *,
    worker_id: str,
    run_id: str,
    seq: int,
    epoch: int,
    request_id: str,
    outcome: Outcome,
    optimizer_steps_delta: int = 0,
) -> None:
    """Advance the run past `seq` and record the op's outcome, or raise Fenced (caller rolls back)."""
    advanced = s.execute(
        _ADVANCE_RUN,
        {
            "b_run_id": run_id,
            "b_worker_id": worker_id,
            "b_epoch": epoch,
            "b_seq": seq,
            "b_steps": optimizer_steps_delta,
        },
    )
    if advanced.rowcount != 1:  # type: ignore[attr-defined]
        raise Fenced(f"run {run_id} seq {seq}: lease epoch {epoch} is no longer current")
    recorded = s.execute(
        _RECORD_OP_BY_DIALECT[s.get_bind().dialect.name],
        {
            "b_request_id": request_id,
            "b_epoch": epoch,
            "b_status": "failed" if outcome.failed else "succeeded",
            "b_result": outcome.result,
            "b_error_message": outcome.error_message,
            "b_error_category": outcome.error_category,
            "b_micro_batch_tokens": outcome.micro_batch_tokens,
        },
    ).all()
    if len(recorded) != 1:
        raise Fenced(f"op {request_id} is no longer claimed under epoch {epoch}")


def skip_rejected_op(s: DbSession, *, worker_id: str, run_id: str, seq: int, epoch: int) -> None:
    """Move past an op that the API already failed at submission (its future is terminal)."""
    advanced = s.execute(
        update(Run)
        .where(Run.run_id == run_id, Run.owner_worker == worker_id, Run.lease_epoch == epoch, Run.next_seq == seq)
        .values(applied_seq=seq, next_seq=seq + 1)
    )
    if advanced.rowcount != 1:  # type: ignore[attr-defined]
        raise Fenced(f"run {run_id} seq {seq}: lease epoch {epoch} is no longer current")


def commit_sample(s: DbSession, *, worker_id: str, request_id: str, outcome: Outcome) -> None:
    recorded = s.execute(
        signal_done(
            s,
            update(Op)
            .where(Op.request_id == request_id, Op.status == "running", Op.claimed_by == worker_id)
            .values(
                status="failed" if outcome.failed else "succeeded",
                result=outcome.result,
                error_message=outcome.error_message,
                error_category=outcome.error_category,
                finished_at=db_clock(),
                claim_expires_at=None,
                **sample_counts(outcome.result),
            ),
        )
    ).all()
    if len(recorded) != 1:
        raise Fenced(f"sample {request_id} is no longer claimed by {worker_id}")


def blocked_message(run_id: str, reason: str) -> str:
    """What a client reads in the failed future of an op that a blocked run will not run."""
    return (
        f"training run {run_id} is blocked and runs no further operations until an operator "
        f"resumes it (tuft runs resume): {reason}"
    )


def block_run(s: DbSession, *, worker_id: str, run_id: str, epoch: int, reason: str) -> int:
    """Stop the run where it is (its state cannot be rebuilt, or a poison op under
    poison_policy=block) and fail every op still waiting (category server, with the reason), so
    no client polls forever; ops submitted while it stays blocked fail at submission. The
    operator's `tuft runs resume` makes it run again from its last committed state (those
    failed ops stay failed and are skipped; `--retry-op` re-queues the one at next_seq), or
    `tuft runs cancel` ends it. Returns how many ops were failed."""
    blocked = s.execute(
        update(Run)
        .where(Run.run_id == run_id, Run.owner_worker == worker_id, Run.lease_epoch == epoch)
        .values(status="blocked", status_reason=reason[:500], owner_worker=None, lease_expires_at=None)
    )
    if blocked.rowcount != 1:  # type: ignore[attr-defined]
        raise Fenced(f"run {run_id}: lease epoch {epoch} is no longer current")
    failed = s.execute(
        signal_done(
            s,
            update(Op)
            .where(Op.run_id == run_id, Op.status.in_(("queued", "running")))
            .values(
                status="failed",
                error_message=blocked_message(run_id, reason)[:2000],
                error_category="server",
                finished_at=db_clock(),
            ),
        )
    ).all()
    return len(failed)
