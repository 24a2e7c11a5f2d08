"""Recovery snapshot records, registered under the fence (reliability-design.md §4.4 "Snapshot").

Files are written first (temporary name, fsync, rename); a snapshot only counts once this fenced
insert commits, so files left by a crashed or fenced-out writer are garbage, never state.
"""

from __future__ import annotations

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session as DbSession

from app.db.engine import db_now
from app.db.models import Run, Snapshot
from app.queue.commit import Fenced


def register(
    s: DbSession,
    *,
    worker_id: str,
    run_id: str,
    epoch: int,
    applied_seq: int,
    storage_path: str,
    optimizer_steps: int,
    size_bytes: int,
    manifest_sha256: str,
    keep: int,
) -> list[str]:
    """Record the snapshot and drop all but the newest `keep`; return the dropped storage paths."""
    owned = s.execute(
        update(Run)
        .where(Run.run_id == run_id, Run.owner_worker == worker_id, Run.lease_epoch == epoch)
        .values(last_snapshot_seq=applied_seq)
    )
    if owned.rowcount != 1:  # type: ignore[attr-defined]
        raise Fenced(f"snapshot of {run_id} at seq {applied_seq}: lease epoch {epoch} is no longer current")
    s.execute(delete(Snapshot).where(Snapshot.run_id == run_id, Snapshot.applied_seq == applied_seq))
    s.add(
        Snapshot(
            run_id=run_id,
            applied_seq=applied_seq,
            epoch=epoch,
            storage_path=storage_path,
            optimizer_steps=optimizer_steps,
            size_bytes=size_bytes,
            manifest_sha256=manifest_sha256,
            created_at=db_now(s),
        )
    )
    s.flush()
    stale = s.execute(
        select(Snapshot.applied_seq, Snapshot.storage_path)
        .where(Snapshot.run_id == run_id)
        .order_by(Snapshot.applied_seq.desc())
        .offset(keep)
    ).all()
    if stale:
        s.execute(
            delete(Snapshot).where(Snapshot.run_id == run_id, Snapshot.applied_seq.in_([row[0] for row in stale]))
        )
    return [row[1] for row in stale]


def candidates(s: DbSession, run_id: str, upto_seq: int) -> list[Snapshot]:
    """Snapshots usable to rebuild the run to `upto_seq`, newest first."""
    return list(
        s.execute(
            select(Snapshot)
            .where(Snapshot.run_id == run_id, Snapshot.applied_seq <= upto_seq)
            .order_by(Snapshot.applied_seq.desc())
        ).scalars()
    )


def for_run(s: DbSession, run_id: str) -> list[Snapshot]:
    return list(s.execute(select(Snapshot).where(Snapshot.run_id == run_id).order_by(Snapshot.applied_seq)).scalars())
