"""What a worker's loop pass has to do, in one read (issue 11).

A pass used to open three transactions whatever there was to do: a write to take unowned runs, a
read of its runs' next ops, and a write to claim a sample (with the poison check), so an idle pass
cost ~8 statements and 2 commits, and each op paid for two passes (the one that ran it and the one
that found nothing after it). One UNION ALL now answers all three questions; the writes run only
when it says there is something to write.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import CompoundSelect, String, and_, bindparam, exists, literal, null, or_, select, union_all
from sqlalchemy.orm import Session as DbSession

from app.db.engine import db_clock
from app.db.models import Op, Run
from app.queue.claim import ReadyOp


@dataclass(frozen=True)
class Survey:
    ready: list[ReadyOp]  # the next op of every active run this worker owns (claim.ready_run_ops)
    runs_to_take: bool  # some active run with a waiting op has no live owner (leases.acquire_runs)
    samples_queued: bool  # a sample waits (claim.claim_sample / fail_poison_samples)


def _statement() -> CompoundSelect[Any]:
    ops = (
        select(
            literal("op", String).label("what"),
            Op.request_id,
            Op.run_id,
            Op.seq,
            Run.lease_epoch,
            Op.kind,
            Op.status,
            Op.payload,
            Op.attempt,
            Run.last_request_at,
        )
        .join(Run, and_(Op.run_id == Run.run_id, Op.seq == Run.next_seq))
        .where(Run.owner_worker == bindparam("worker_id"), Run.status == "active", Op.status != "succeeded")
    )
    # The same conditions as leases.acquire_runs and claim.claim_sample, which decide for real.
    waiting = exists().where(and_(Op.run_id == Run.run_id, Op.seq == Run.next_seq))
    takeable = exists().where(
        Run.status == "active", or_(Run.owner_worker.is_(None), Run.lease_expires_at < db_clock()), waiting
    )
    queued_sample = exists().where(Op.kind == "sample", Op.status == "queued")
    blanks = [null()] * 9
    flags = [
        select(literal("take", String), *blanks).where(takeable),
        select(literal("sample", String), *blanks).where(queued_sample),
    ]
    return union_all(ops, *flags)


# Built once: constructing this statement (and its cache key) on every pass cost more CPU than
# running it (1.9 against 0.7 ms a pass on the 2-core machine), and an op takes ~3 passes.
_SURVEY = _statement()


def survey(s: DbSession, worker_id: str) -> Survey:
    rows: list[Any] = list(s.execute(_SURVEY, {"worker_id": worker_id}).all())
    ready = [(r[9], ReadyOp(r[1], r[2] or "", r[3] or 0, r[4], r[5], r[6], r[7], r[8])) for r in rows if r[0] == "op"]
    ready.sort(key=lambda item: item[0])  # oldest request first, as ready_run_ops orders them
    what = {r[0] for r in rows}
    return Survey([op for _, op in ready], "take" in what, "sample" in what)
