"""The sweeper and the operator actions on real databases."""

from __future__ import annotations

import time

import pytest

from app.db.engine import Database
from app.db.models import Op, Run, Worker
from app.domain.errors import InvalidInput
from app.domain.ops import AdamParams, LoraConfig, OptimStepOp
from app.queue import admin, claim, leases, submit
from app.queue.commit import Fenced, Outcome, commit_run_op
from app.queue.futures import get_future, mark_delivered
from app.queue.sweeper import NEW_RUNS_QUEUE, SweepReport, expire_results, hold_singleton, sweep

TENANT = "t"


def _setup(db: Database, n_ops: int = 2) -> tuple[str, list[str]]:
    with db.write() as s:
        session_id = submit.create_session(s, TENANT, sdk_version=None, tags=[], user_metadata={}, display_name=None)
        run = submit.create_run(
            s, TENANT, session_id=session_id, model_seq_id=0, base_model="m", lora=LoraConfig(rank=2), user_metadata={}
        )
        ids = [
            submit.submit_run_op(s, run, seq, OptimStepOp(adam=AdamParams(learning_rate=0.001 * seq))).request_id
            for seq in range(1, n_ops + 1)
        ]
        leases.register_worker(s, worker_id="w1", host="h", device="cpu", queue="q1", pid=1)
        return run.run_id, ids


def _claim_first(db: Database, ttl: float) -> claim.ReadyOp:
    with db.write() as s:
        leases.acquire_runs(s, "w1", ttl=ttl)
    with db.read() as s:
        (ready,) = claim.ready_run_ops(s, "w1")
    with db.write() as s:
        assert claim.claim_run_op(s, "w1", ready)
    return ready


def test_expired_lease_is_taken_back_and_the_op_requeued(db: Database) -> None:
    run_id, ids = _setup(db)
    ready = _claim_first(db, ttl=0.1)
    time.sleep(0.3)
    with db.write() as s:
        report = sweep(s, lease_ttl=0.1, result_retention=0)
    assert report.expired_leases == [run_id]
    assert (NEW_RUNS_QUEUE, run_id) in {(w.queue, w.run_id) for w in report.wakeups}
    with db.read() as s:
        run = s.get(Run, run_id)
        op = s.get(Op, ids[0])
        assert run is not None and run.owner_worker is None and run.lease_epoch == ready.epoch + 1
        assert op is not None and op.status == "queued" and op.attempt == 1
    with pytest.raises(Fenced), db.write() as s:
        commit_run_op(
            s, worker_id="w1", run_id=run_id, seq=1, epoch=ready.epoch, request_id=ids[0], outcome=Outcome(result=b"z")
        )
    # A second pass finds nothing more to take back.
    with db.write() as s:
        assert sweep(s, lease_ttl=0.1, result_retention=0).expired_leases == []


def test_dead_workers_and_stale_wakeups(db: Database) -> None:
    run_id, _ = _setup(db)
    with db.write() as s:
        leases.acquire_runs(s, "w1", ttl=60)
        s.query(Op).filter(Op.run_id == run_id).update({Op.created_at: Op.created_at - 60})
        s.query(Worker).filter(Worker.worker_id == "w1").update({Worker.heartbeat_at: Worker.heartbeat_at - 3600})
    with db.write() as s:
        report = sweep(s, lease_ttl=10, result_retention=0)
    assert report.dead_workers == ["w1"]
    # The owner is dead, so the re-ring goes to the shared queue.
    assert (NEW_RUNS_QUEUE, run_id) in {(w.queue, w.run_id) for w in report.wakeups}


def test_stale_wakeups_ring_each_queue_once_not_each_run(db: Database) -> None:
    # 20 runs with a stale op: 10 owned by a live worker (one ring wakes it for all of them) and 10
    # unowned (the shared queue: one ring per batch a worker acquires, so 2 for 10 runs).
    run_ids = [_setup(db, 1)[0]]
    with db.write() as s:
        for _ in range(19):
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
            run_ids.append(run.run_id)
    with db.write() as s:
        taken = leases.acquire_runs(s, "w1", ttl=60, limit=10)
        s.query(Op).update({Op.created_at: Op.created_at - 60})
    with db.write() as s:
        report = sweep(s, lease_ttl=10, result_retention=0)
    by_queue: dict[str, list[str | None]] = {}
    for w in report.wakeups:
        by_queue.setdefault(w.queue, []).append(w.run_id)
    assert len(taken) == 10 and len(by_queue["q1"]) == 1
    assert len(by_queue[NEW_RUNS_QUEUE]) == 2
    unowned = set(run_ids) - {lease.run_id for lease in taken}
    assert set(by_queue[NEW_RUNS_QUEUE]) <= unowned


def test_one_sweeper_at_a_time(db: Database) -> None:
    with db.write() as s:
        assert hold_singleton(s, "sweeper", "a", ttl=0.2)
    with db.write() as s:
        assert not hold_singleton(s, "sweeper", "b", ttl=0.2)
        assert hold_singleton(s, "sweeper", "a", ttl=0.2)  # renewal
    time.sleep(0.4)
    with db.write() as s:
        assert hold_singleton(s, "sweeper", "b", ttl=0.2)  # a stopped renewing


def test_results_expire_only_after_delivery_and_retention(db: Database) -> None:
    run_id, ids = _setup(db, 1)
    ready = _claim_first(db, ttl=60)
    with db.write() as s:
        commit_run_op(
            s, worker_id="w1", run_id=run_id, seq=1, epoch=ready.epoch, request_id=ids[0], outcome=Outcome(result=b"r")
        )
    with db.write() as s:
        expire_results(s, 0.1, report := SweepReport())
    assert report.expired_results == 0  # never delivered: kept
    with db.write() as s:
        mark_delivered(s, ids[0])
    time.sleep(0.3)
    with db.write() as s:
        expire_results(s, 0.1, report)
    assert report.expired_results == 1
    with db.read() as s:
        view = get_future(s, TENANT, ids[0])
        assert view.status == "succeeded" and view.result is None


def test_pause_resume_retry_skip_fail_cancel(db: Database) -> None:
    run_id, ids = _setup(db, 3)
    ready = _claim_first(db, ttl=60)
    with db.write() as s:
        admin.pause(s, run_id)
    with db.read() as s:
        run = s.get(Run, run_id)
        assert run is not None and (run.status, run.owner_worker) == ("paused", None)
        assert s.get(Op, ids[0]).status == "queued"  # type: ignore[union-attr]
    with db.write() as s:
        assert leases.acquire_runs(s, "w1", ttl=60) == []  # paused runs are not taken
    with pytest.raises(Fenced), db.write() as s:  # the worker that held it is fenced out
        commit_run_op(
            s, worker_id="w1", run_id=run_id, seq=1, epoch=ready.epoch, request_id=ids[0], outcome=Outcome(result=b"z")
        )
    with db.write() as s:
        assert admin.resume(s, run_id, "skip") == ids[0]
    with db.read() as s:
        run = s.get(Run, run_id)
        op = s.get(Op, ids[0])
        assert run is not None and (run.status, run.next_seq, run.applied_seq) == ("active", 2, 1)
        assert op is not None and op.status == "failed" and "skipped by an operator" in (op.error_message or "")
    with db.write() as s:
        s.get(Op, ids[1]).attempt = 3  # type: ignore[union-attr]
        admin.resume(s, run_id, "retry")
        assert s.get(Op, ids[1]).attempt == 0  # type: ignore[union-attr]
        admin.resume(s, run_id, "fail")
        assert "failed by an operator" in (s.get(Op, ids[1]).error_message or "")  # type: ignore[union-attr]
    with db.write() as s:
        assert admin.cancel(s, run_id) == 1
    with db.read() as s:
        last = s.get(Op, ids[2])
        assert last is not None and (last.status, last.error_category) == ("failed", "user")
    with pytest.raises(InvalidInput), db.write() as s:
        admin.resume(s, run_id)


def test_admin_listings(db: Database) -> None:
    run_id, _ = _setup(db, 2)
    _claim_first(db, ttl=60)
    with db.read() as s:
        (row,) = admin.run_rows(s)
        ops = admin.op_rows(s, run_id, 10)
        (worker,) = admin.worker_rows(s, lease_ttl=15.0)
    assert row["run_id"] == run_id and row["owner_worker"] == "w1" and row["pending_ops"] == 2
    assert row["next_seq"] == 1 and row["applied_seq"] == 0 and row["lease_expires_in"] > 0
    assert [(o["seq"], o["status"]) for o in ops] == [(1, "running"), (2, "queued")]
    assert worker["worker_id"] == "w1" and worker["runs"] == 1 and worker["state"] == "live"
