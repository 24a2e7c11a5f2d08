"""Operator actions on runs (`tuft runs ...`). Each one bumps the run's lease epoch, so a worker
still busy with the run is fenced out: its late commit is rejected and it drops the run's state."""

from __future__ import annotations

from typing import Any, Literal

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session as DbSession

from app.db.engine import db_now
from app.db.models import Op, Run, Snapshot, Worker
from app.domain.errors import InvalidInput, NotFound
from app.queue.leases import worker_state

OpAction = Literal["retry", "skip", "fail"]


def _run(s: DbSession, run_id: str) -> Run:
    run = s.get(Run, run_id)
    if run is None:
        raise NotFound(f"run {run_id!r} not found")
    return run


def _fence(run: Run, status: str, reason: str | None) -> None:
    run.status = status
    run.status_reason = reason
    run.owner_worker = None
    run.lease_expires_at = None
    run.lease_epoch += 1


# Every status a run can have (app/db/models.py Run.status).
RUN_STATUSES = ("active", "blocked", "paused", "cancelled")


def run_rows(
    s: DbSession, status: str | None = None, *, tenant: str | None = None, base_model: str | None = None
) -> list[dict[str, Any]]:
    if status is not None and status not in RUN_STATUSES:
        raise InvalidInput(f"unknown run status {status!r}: use one of {', '.join(RUN_STATUSES)}")
    now = db_now(s)
    pending = (
        select(Op.run_id, func.count().label("n"))
        .where(Op.status.in_(("queued", "running")), Op.run_id.is_not(None))
        .group_by(Op.run_id)
        .subquery()
    )
    query = select(Run, pending.c.n).outerjoin(pending, pending.c.run_id == Run.run_id).order_by(Run.created_at)
    if status:
        query = query.where(Run.status == status)
    if tenant is not None:
        query = query.where(Run.tenant == tenant)
    if base_model is not None:
        query = query.where(Run.base_model == base_model)
    rows = []
    for run, n_pending in s.execute(query).all():
        rows.append(
            {
                "run_id": run.run_id,
                "tenant": run.tenant,
                "base_model": run.base_model,
                "status": run.status,
                "status_reason": run.status_reason,
                "owner_worker": run.owner_worker,
                "lease_epoch": run.lease_epoch,
                # Negative once expired: the sweeper will take the run back.
                "lease_expires_in": None if run.lease_expires_at is None else round(run.lease_expires_at - now, 1),
                "next_seq": run.next_seq,
                "applied_seq": run.applied_seq,
                "pending_ops": int(n_pending or 0),
                "optimizer_steps": run.optimizer_steps,
                "last_snapshot_seq": run.last_snapshot_seq,
                "idle_seconds": round(now - run.last_request_at, 1),
            }
        )
    return rows


def op_rows(s: DbSession, run_id: str, limit: int) -> list[dict[str, Any]]:
    _run(s, run_id)
    ops = s.execute(select(Op).where(Op.run_id == run_id).order_by(Op.seq.desc().nulls_last()).limit(limit)).scalars()
    return [
        {
            "seq": op.seq,
            "request_id": op.request_id,
            "kind": op.kind,
            "status": op.status,
            "attempt": op.attempt,
            "claimed_epoch": op.claimed_epoch,
            "claimed_by": op.claimed_by,
            "error": op.error_message,
            "error_category": op.error_category,
            "seconds_to_finish": None
            if op.finished_at is None or op.started_at is None
            else round(op.finished_at - op.started_at, 3),
        }
        for op in reversed(list(ops))
    ]


def worker_rows(s: DbSession, lease_ttl: float) -> list[dict[str, Any]]:
    now = db_now(s)
    owned = dict(
        s.execute(
            select(Run.owner_worker, func.count()).where(Run.owner_worker.is_not(None)).group_by(Run.owner_worker)
        ).all()
    )
    workers = s.execute(select(Worker).order_by(Worker.started_at)).scalars()
    return [
        {
            "worker_id": w.worker_id,
            "host": w.host,
            "device": w.device,
            "queue": w.queue,
            "pid": w.pid,
            "heartbeat_age": round(now - w.heartbeat_at, 1),
            "runs": int(owned.get(w.worker_id, 0)),
            "state": worker_state(w.stopped_at, now - w.heartbeat_at, lease_ttl),
        }
        for w in workers
    ]


def snapshot_rows(s: DbSession, run_id: str) -> list[Snapshot]:
    _run(s, run_id)
    return list(s.execute(select(Snapshot).where(Snapshot.run_id == run_id).order_by(Snapshot.applied_seq)).scalars())


def pause(s: DbSession, run_id: str) -> None:
    run = _run(s, run_id)
    if run.status == "cancelled":
        raise InvalidInput(f"run {run_id} is cancelled")
    _fence(run, "paused", "paused by an operator")
    s.execute(update(Op).where(Op.run_id == run_id, Op.status == "running").values(status="queued"))


def cancel(s: DbSession, run_id: str) -> int:
    """Stop the run for good: every op still waiting fails (category user), so no client hangs."""
    run = _run(s, run_id)
    _fence(run, "cancelled", "cancelled by an operator")
    failed = s.execute(
        update(Op)
        .where(Op.run_id == run_id, Op.status.in_(("queued", "running")))
        .values(
            status="failed",
            error_message="the training run was cancelled by an operator",
            error_category="user",
            finished_at=db_now(s),
        )
    )
    return int(failed.rowcount)  # type: ignore[attr-defined]


def resume(s: DbSession, run_id: str, op_action: OpAction | None = None) -> str | None:
    """Make the run active again. With an op action, first deal with the op at next_seq:
    retry (back to the queue, attempts reset, even if it failed when the run blocked), skip or
    fail it (it fails; the run moves past it). Ops that failed when the run blocked stay failed
    and the run moves past them unchanged. Returns the request id of the op acted on."""
    run = _run(s, run_id)
    if run.status == "cancelled":
        raise InvalidInput(f"run {run_id} is cancelled; it cannot be resumed")
    acted = None
    if op_action is not None:
        op = s.execute(select(Op).where(Op.run_id == run_id, Op.seq == run.next_seq)).scalar_one_or_none()
        if op is None:
            raise InvalidInput(f"run {run_id} has no op at seq {run.next_seq} to {op_action}")
        acted = op.request_id
        if op_action == "retry":
            op.status, op.attempt, op.claimed_by, op.claimed_epoch = "queued", 0, None, None
            # Failed when the run blocked: its future becomes pending again, and a client that
            # polls it (or re-sends the request) gets the new outcome.
            op.error_message, op.error_category, op.finished_at = None, None, None
        else:
            verb = "skipped" if op_action == "skip" else "failed"
            op.status = "failed"
            op.error_message = f"{verb} by an operator (tuft runs resume --{op_action}-op)"
            op.error_category = "server"
            op.finished_at = db_now(s)
            # A failed op changed nothing, so the run's state moves past it unchanged.
            run.applied_seq, run.next_seq = run.next_seq, run.next_seq + 1
    _fence(run, "active", None)
    s.execute(update(Op).where(Op.run_id == run_id, Op.status == "running").values(status="queued"))
    return acted
