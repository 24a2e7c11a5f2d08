"""Retention of op payloads, results and finished runs' snapshots (issue 7 item 5).

An op row is the durable future: its status, result and error are what a client polls, and its
`request_sha256` answers a retried submission. Its `payload` (the op's full input: 184 KB for one
8x1024 forward_backward) matters only while the op may still run or be replayed:

- a training op is replayed only on top of a snapshot (workers/recovery.py), so once a run's
  OLDEST kept snapshot is at seq N, the payloads of its terminal ops at seq <= N can never be read
  again (every snapshot a rebuild may fall back to is at or after N);
- a sample op is never replayed: once terminal and delivered its payload is dead weight;
- a finished run (its session finished, or the run cancelled) takes no new ops, so after
  `finished_run_retention_seconds` all its payloads and its snapshots go.

A pruned payload is the empty byte string (the column stays NOT NULL) and `payload_pruned_at` says
when. Every pass works in bounded batches, each statement guarded so a racing pass is harmless,
and touches rows through indexes (migrations/versions/*_0003_*.py), never a scan of `ops`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.orm import Session as DbSession

from app.db.engine import db_now
from app.db.models import Op, Run, Session, Snapshot

TERMINAL = ("succeeded", "failed")
# Rows per statement: each pass's transactions stay short; what is left goes next pass.
BATCH = 1000
# Runs visited per pass by each rule.
RUNS_PER_PASS = 50


@dataclass
class RetentionReport:
    results_dropped: int = 0
    payloads_pruned: int = 0
    finished_runs: list[str] = field(default_factory=list)
    # Snapshot storage paths (relative to the snapshot dir) whose rows were deleted: the caller
    # removes the files once the transaction has committed.
    snapshot_paths: list[str] = field(default_factory=list)


def expire_results(s: DbSession, retention: float, batch: int = BATCH) -> int:
    """Results are kept until delivered, then `retention` seconds (0 keeps them forever). Reads
    through the partial index ix_ops_result_delivered (rows that still hold a result)."""
    if retention <= 0:
        return 0
    cutoff = db_now(s) - retention
    due = (
        select(Op.request_id)
        .where(Op.result.is_not(None), Op.delivered_at < cutoff, Op.status == "succeeded")
        .limit(batch)
        .scalar_subquery()
    )
    done = s.execute(update(Op).where(Op.request_id.in_(due)).values(result=None))
    return int(done.rowcount)  # type: ignore[attr-defined]


def _prune(s: DbSession, *conditions: object, batch: int = BATCH) -> int:
    now = db_now(s)
    due = (
        select(Op.request_id)
        .where(Op.payload_pruned_at.is_(None), Op.status.in_(TERMINAL), *conditions)  # type: ignore[arg-type]
        .limit(batch)
        .scalar_subquery()
    )
    done = s.execute(
        update(Op)
        .where(Op.request_id.in_(due), Op.payload_pruned_at.is_(None), Op.status.in_(TERMINAL))
        .values(payload=b"", payload_pruned_at=now)
    )
    return int(done.rowcount)  # type: ignore[attr-defined]


def prune_sample_payloads(s: DbSession, batch: int = BATCH) -> int:
    """Terminal, delivered sample ops (partial index ix_ops_sample_unpruned)."""
    return _prune(s, Op.run_id.is_(None), Op.delivered_at.is_not(None), batch=batch)


def prune_covered_payloads(s: DbSession, batch: int = BATCH) -> int:
    """Training ops at or below their run's oldest kept snapshot. `runs.payloads_pruned_seq`
    remembers how far each run is done, so a pass visits only runs with new work."""
    oldest = select(Snapshot.run_id, func.min(Snapshot.applied_seq).label("upto")).group_by(Snapshot.run_id).subquery()
    todo = s.execute(
        select(Run.run_id, Run.payloads_pruned_seq, oldest.c.upto)
        .join(oldest, oldest.c.run_id == Run.run_id)
        .where(or_(Run.payloads_pruned_seq.is_(None), Run.payloads_pruned_seq < oldest.c.upto))
        .limit(RUNS_PER_PASS)
    ).all()
    pruned = 0
    for run_id, done_to, upto in todo:
        start = done_to or -1
        # Bounded by seq range as well as rows: uq_ops_run_id (run_id, seq) serves the range.
        stop = min(int(upto), start + batch)
        pruned += _prune(s, Op.run_id == run_id, Op.seq > start, Op.seq <= stop, batch=batch)
        left = s.execute(
            select(Op.request_id)
            .where(Op.run_id == run_id, Op.seq > start, Op.seq <= stop, Op.payload_pruned_at.is_(None))
            .limit(1)
        ).first()
        if left is None:  # everything up to `stop` is pruned (or still running: next pass)
            s.execute(
                update(Run)
                .where(Run.run_id == run_id, or_(Run.payloads_pruned_seq.is_(None), Run.payloads_pruned_seq < stop))
                .values(payloads_pruned_seq=stop)
            )
    return pruned


def retire_finished_runs(s: DbSession, retention: float, report: RetentionReport) -> None:
    """Runs of a session finished `retention` seconds ago, or cancelled that long since their
    last request: drop their snapshots (rows here, files by the caller after the commit) and all
    their payloads. Not active runs: a paused or blocked run may still be resumed by an operator."""
    if retention <= 0:
        return
    cutoff = db_now(s) - retention
    finished_session = (
        select(Session.session_id).where(Session.session_id == Run.session_id, Session.finished_at < cutoff).exists()
    )
    runs = (
        s.execute(
            select(Run.run_id)
            .where(
                Run.retired_at.is_(None),
                or_(
                    and_(Run.status == "cancelled", Run.last_request_at < cutoff),
                    finished_session,
                ),
            )
            .order_by(Run.run_id)
            .limit(RUNS_PER_PASS)
        )
        .scalars()
        .all()
    )
    now = db_now(s)
    for run_id in runs:
        report.payloads_pruned += _prune(s, Op.run_id == run_id, batch=BATCH)
        if s.execute(select(Op.request_id).where(Op.run_id == run_id, Op.payload_pruned_at.is_(None)).limit(1)).first():
            continue  # more than a batch, or an op not terminal yet: next pass
        paths = list(s.execute(select(Snapshot.storage_path).where(Snapshot.run_id == run_id)).scalars())
        s.execute(delete(Snapshot).where(Snapshot.run_id == run_id))
        s.execute(update(Run).where(Run.run_id == run_id).values(retired_at=now, last_snapshot_seq=None))
        report.snapshot_paths += paths
        report.finished_runs.append(run_id)
