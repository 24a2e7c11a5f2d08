"""Database.write_relaxed (issue 11): the commits that only record progress (a training op's claim,
a result's delivery mark) do not wait for the disk; everything else still does. Checked on the
real databases: the session settings each pool's connections run with, and that a relaxed claim
is seen by the fenced commit that follows it."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from app.db import migrate
from app.db.engine import Database
from app.domain.ops import AdamParams, LoraConfig, OptimStepOp
from app.queue import claim, commit, leases, submit

TENANT = "t"


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


def test_a_relaxed_claim_is_what_the_fenced_commit_sees(db_url: str) -> None:
    migrate.upgrade(db_url)
    db = Database(db_url, process_name="worker-test")
    try:
        with db.write() as s:
            session_id = submit.create_session(
                s, TENANT, sdk_version=None, tags=[], user_metadata={}, display_name=None
            )
            run = submit.create_run(
                s,
                TENANT,
                session_id=session_id,
                model_seq_id=0,
                base_model="m",
                lora=LoraConfig(rank=2),
                user_metadata={},
            )
            submit.submit_run_op(s, run, 1, OptimStepOp(adam=AdamParams(learning_rate=0.001)))
            leases.register_worker(s, worker_id="w1", host="h", device="cpu", queue="q", pid=1)
        with db.write() as s:
            leases.acquire_runs(s, "w1", ttl=30.0)
        with db.read() as s:
            (ready,) = claim.ready_run_ops(s, "w1")
        with db.write_relaxed() as s:
            assert claim.claim_run_op(s, "w1", ready)
        with db.read() as s:
            (again,) = claim.ready_run_ops(s, "w1")
        assert (again.status, again.attempt) == ("running", 1)  # the claim is visible at once
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
        with db.read() as s:
            assert claim.ready_run_ops(s, "w1") == []
    finally:
        db.dispose()


def test_a_result_commits_after_its_claim_was_lost_but_not_past_the_fence(db_url: str) -> None:
    # A database crash can lose a claim (it did not wait for the disk): the op is `queued` again
    # when its result arrives. The run's fence decides: same owner and epoch commit; a worker whose
    # lease moved on is still fenced out.
    migrate.upgrade(db_url)
    db = Database(db_url, process_name="worker-test")
    try:
        with db.write() as s:
            session_id = submit.create_session(
                s, TENANT, sdk_version=None, tags=[], user_metadata={}, display_name=None
            )
            run = submit.create_run(
                s,
                TENANT,
                session_id=session_id,
                model_seq_id=0,
                base_model="m",
                lora=LoraConfig(rank=2),
                user_metadata={},
            )
            for seq in (1, 2):
                submit.submit_run_op(s, run, seq, OptimStepOp(adam=AdamParams(learning_rate=0.001)))
            leases.register_worker(s, worker_id="w1", host="h", device="cpu", queue="q", pid=1)
        with db.write() as s:
            leases.acquire_runs(s, "w1", ttl=30.0)
        with db.read() as s:
            (first,) = claim.ready_run_ops(s, "w1")
        assert first.status == "queued"  # claimed and lost: nothing recorded it
        with db.write() as s:
            commit.commit_run_op(
                s,
                worker_id="w1",
                run_id=first.run_id,
                seq=first.seq,
                epoch=first.epoch,
                request_id=first.request_id,
                outcome=commit.Outcome(result=b"{}"),
            )
        with db.read() as s:
            (second,) = claim.ready_run_ops(s, "w1")
        assert second.seq == 2
        with db.write() as s:  # the lease moves on (a takeover bumps the epoch)
            s.execute(text("UPDATE runs SET lease_epoch = lease_epoch + 1"))
        with pytest.raises(commit.Fenced), db.write() as s:
            commit.commit_run_op(
                s,
                worker_id="w1",
                run_id=second.run_id,
                seq=second.seq,
                epoch=second.epoch,
                request_id=second.request_id,
                outcome=commit.Outcome(result=b"{}"),
            )
        with db.read() as s:
            statuses = s.execute(text("SELECT seq, status FROM ops WHERE seq IS NOT NULL ORDER BY seq")).all()
        assert [tuple(r) for r in statuses] == [(1, "succeeded"), (2, "queued")]
    finally:
        db.dispose()
