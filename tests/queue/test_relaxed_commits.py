"""Database.write_relaxed (issue 11): the commits that only record progress (a training op's claim,
a result's delivery mark) do not wait for the disk; everything else still does. Checked on the
real databases: the session settings each pool's connections run with, and that a relaxed claim
is seen by the fenced commit that follows it."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from app.db import migrate
from app.db.engine import Database
from app.queue import claim, commit
from tests.queue.test_queue import _owned_run


def _durability(db: Database, relaxed: bool) -> str:
    query = "SHOW synchronous_commit" if not db.sqlite else "PRAGMA synchronous"
    unit = db.write_relaxed() if relaxed else db.write()
    with unit as s:
        return str(s.execute(text(query)).scalar())


def test_only_relaxed_units_of_work_skip_the_disk_wait(db_url: str) -> None:
    migrate.upgrade(db_url)
    db = Database(db_url, process_name="worker-test")
    try:
        if db.sqlite:
            # PRAGMA synchronous: 2 = FULL (every commit synced), 1 = NORMAL (WAL: process-crash safe)
            assert (_durability(db, False), _durability(db, True)) == ("2", "1")
        else:
            assert (_durability(db, False), _durability(db, True)) == ("on", "off")
        with db.read() as s:
            reads = str(s.execute(text("SHOW synchronous_commit" if not db.sqlite else "PRAGMA synchronous")).scalar())
        assert reads in ("on", "2")
    finally:
        db.dispose()


def _next(db: Database) -> list[claim.ReadyOp]:
    with db.read() as s:
        return claim.ready_run_ops(s, "w1")


def _record(db: Database, ready: claim.ReadyOp) -> None:
    """The fenced commit of `ready`'s result, without claiming it first."""
    with db.write() as s:
        commit.commit_run_op(
            s,
            worker_id="w1",
            run_id=ready.run_id,
            seq=ready.seq,
            epoch=ready.epoch,
            request_id=ready.request_id,
            outcome=commit.Outcome(result=b"{}"),
        )


def test_a_relaxed_claim_is_what_the_fenced_commit_sees(db_url: str) -> None:
    migrate.upgrade(db_url)
    db = Database(db_url, process_name="worker-test")
    try:
        _owned_run(db, 1)
        (ready,) = _next(db)
        with db.write_relaxed() as s:
            assert claim.claim_run_op(s, "w1", ready)
        (again,) = _next(db)
        assert (again.status, again.attempt) == ("running", 1)  # the claim is visible at once
        _record(db, ready)
        assert _next(db) == []
    finally:
        db.dispose()


def test_a_result_commits_after_its_claim_was_lost_but_not_past_the_fence(db_url: str) -> None:
    # A database crash can lose a claim (it did not wait for the disk): the op is `queued` again
    # when its result arrives. The run's fence decides: same owner and epoch commit; a worker whose
    # lease moved on is still fenced out.
    migrate.upgrade(db_url)
    db = Database(db_url, process_name="worker-test")
    try:
        _owned_run(db, 2)
        (first,) = _next(db)
        assert first.status == "queued"  # claimed and lost: nothing recorded it
        _record(db, first)
        (second,) = _next(db)
        assert second.seq == 2
        with db.write() as s:  # the lease moves on (a takeover bumps the epoch)
            s.execute(text("UPDATE runs SET lease_epoch = lease_epoch + 1"))
        with pytest.raises(commit.Fenced):
            _record(db, second)
        with db.read() as s:
            statuses = s.execute(text("SELECT seq, status FROM ops WHERE seq IS NOT NULL ORDER BY seq")).all()
        assert [tuple(r) for r in statuses] == [(1, "succeeded"), (2, "queued")]
    finally:
        db.dispose()
