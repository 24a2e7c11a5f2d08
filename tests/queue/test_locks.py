"""Row locks held by a stalled process (issue 7 item 3), on PostgreSQL: the sweeper and the
heartbeat give up on a lock after the lock timeout instead of queueing behind it, report it as a
transient failure, and do their work on the next try; the server ends a transaction left idle."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from app.db import migrate
from app.db.engine import Database, DbTimeouts
from app.db.models import Run
from app.domain.ops import AdamParams, LoraConfig, OptimStepOp
from app.queue import claim, leases, submit
from app.queue.sweeper import run_pass

pytestmark = pytest.mark.postgres
TENANT = "t"
BOUNDS = DbTimeouts(lock_seconds=0.5, idle_in_transaction_seconds=1.0)


def _owned_expired_run(db: Database) -> str:
    with db.write() as s:
        session_id = submit.create_session(s, TENANT, sdk_version=None, tags=[], user_metadata={}, display_name=None)
        run = submit.create_run(
            s, TENANT, session_id=session_id, model_seq_id=0, base_model="m", lora=LoraConfig(rank=2), user_metadata={}
        )
        submit.submit_run_op(s, run, 1, OptimStepOp(adam=AdamParams(learning_rate=0.001)))
        leases.register_worker(s, worker_id="w1", host="h", device="cpu", queue="q", pid=1)
    with db.write() as s:
        (lease,) = leases.acquire_runs(s, "w1", ttl=0.1)
    with db.read() as s:
        (ready,) = claim.ready_run_ops(s, "w1")
    with db.write() as s:
        assert claim.claim_run_op(s, "w1", ready)
    time.sleep(0.3)
    return lease.run_id


def test_the_sweeper_skips_a_locked_run_and_takes_it_back_once_the_lock_is_gone(pg_url: str) -> None:
    migrate.upgrade(pg_url)
    db = Database(pg_url, process_name="api", timeouts=BOUNDS)
    stalled = Database(pg_url, process_name="test")  # no bounds: it plays the paused worker
    try:
        run_id = _owned_expired_run(db)
        holder = stalled.write_engine.connect()
        tx = holder.begin()
        holder.execute(text("SELECT 1 FROM runs WHERE run_id = :r FOR UPDATE"), {"r": run_id})
        started = time.monotonic()
        report = run_pass(db, lease_ttl=0.1, result_retention=0)
        # Bounded by the lock timeout, not by the holder; the other steps still ran.
        assert time.monotonic() - started < 10
        assert report.expired_leases == [] and "leases" in report.failed_steps
        tx.rollback()
        holder.close()
        report = run_pass(db, lease_ttl=0.1, result_retention=0)
        assert report.expired_leases == [run_id] and report.failed_steps == []
        with db.read() as s:
            assert s.get(Run, run_id).owner_worker is None  # type: ignore[union-attr]
    finally:
        db.dispose()
        stalled.dispose()


def test_a_transaction_left_idle_is_ended_by_the_server_and_its_locks_freed(pg_url: str) -> None:
    migrate.upgrade(pg_url)
    db = Database(pg_url, process_name="worker-test", timeouts=BOUNDS)
    other = Database(pg_url, process_name="worker-other", timeouts=BOUNDS)
    try:
        run_id = _owned_expired_run(db)
        # A heartbeat whose process stops before COMMIT: its runs and workers rows stay locked...
        paused = db.write_engine.connect()
        tx = paused.begin()
        paused.execute(text("UPDATE runs SET lease_expires_at = 0 WHERE run_id = :r"), {"r": run_id})
        # ...until the server ends it (1 s here); meanwhile another session's wait is bounded.
        with pytest.raises(DBAPIError), other.write() as s:
            leases.heartbeat(s, "w1", ttl=10)  # locks the same run row
        time.sleep(1.5)
        with other.write() as s:
            assert [lease.run_id for lease in leases.heartbeat(s, "w1", ttl=10)] == [run_id]
        with pytest.raises(DBAPIError):
            tx.commit()  # the paused transaction is gone: nothing it wrote lands
        paused.close()
    finally:
        db.dispose()
        other.dispose()
