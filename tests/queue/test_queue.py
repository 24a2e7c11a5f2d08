"""The durable queue on real databases: dedupe, seq order with gaps, leases, fencing, samples."""

from __future__ import annotations

import time

import pytest

from app.db.engine import Database
from app.db.models import Op, Run
from app.domain.errors import Conflict, NotFound
from app.domain.ops import AdamParams, LoraConfig, OptimStepOp, SampleOp
from app.queue import claim, commit, leases, submit
from app.queue.commit import Fenced, Outcome

TENANT = "t1"


def _run(db: Database) -> str:
    with db.write() as s:
        session_id = submit.create_session(
            s, TENANT, sdk_version="0.38.0", tags=[], user_metadata={}, display_name=None
        )
        run = submit.create_run(
            s,
            TENANT,
            session_id=session_id,
            model_seq_id=0,
            base_model="m",
            lora=LoraConfig(rank=4),
            user_metadata={},
        )
        return run.run_id


def _submit(db: Database, run_id: str, seq: int, lr: float = 1e-3) -> str:
    with db.write() as s:
        run = submit.get_run(s, TENANT, run_id)
        return submit.submit_run_op(s, run, seq, OptimStepOp(adam=AdamParams(learning_rate=lr))).request_id


def _register(db: Database, worker_id: str) -> None:
    with db.write() as s:
        leases.register_worker(s, worker_id=worker_id, host="h", device="cpu", queue=f"q.{worker_id}", pid=1)


def _owned_run(db: Database, ops: int = 1) -> str:
    """A run with `ops` optim_steps queued (seq 1..ops), owned by a registered worker w1."""
    _register(db, "w1")
    run_id = _run(db)
    for seq in range(1, ops + 1):
        _submit(db, run_id, seq)
    with db.write() as s:
        leases.acquire_runs(s, "w1", 30.0)
    return run_id


def _commit(db: Database, worker: str, ready: claim.ReadyOp) -> None:
    with db.write() as s:
        assert claim.claim_run_op(s, worker, ready)
    with db.write() as s:
        commit.commit_run_op(
            s,
            worker_id=worker,
            run_id=ready.run_id,
            seq=ready.seq,
            epoch=ready.epoch,
            request_id=ready.request_id,
            outcome=Outcome(result=b'{"kind":"optim_step","metrics":{}}'),
            optimizer_steps_delta=1,
        )


def test_same_body_same_future_other_body_conflict(db: Database) -> None:
    run_id = _run(db)
    first = _submit(db, run_id, 1)
    assert _submit(db, run_id, 1) == first
    with pytest.raises(Conflict):
        _submit(db, run_id, 1, lr=0.5)
    with db.read() as s:
        assert s.query(Op).filter(Op.run_id == run_id, Op.seq == 1).count() == 1


def test_other_tenant_cannot_see_run(db: Database) -> None:
    run_id = _run(db)
    with db.read() as s, pytest.raises(NotFound):
        submit.get_run(s, "someone-else", run_id)


def test_ops_run_in_seq_order_and_gaps_wait(db: Database) -> None:
    run_id = _run(db)
    _register(db, "w1")
    _submit(db, run_id, 2)
    _submit(db, run_id, 3)
    with db.write() as s:
        # seq 1 has not arrived: nothing is ready, so the run is not even taken.
        assert leases.acquire_runs(s, "w1", ttl=30) == []
    _submit(db, run_id, 1)
    with db.write() as s:
        assert [lease.epoch for lease in leases.acquire_runs(s, "w1", ttl=30)] == [1]
    order = []
    for _ in range(3):
        with db.read() as s:
            (ready,) = claim.ready_run_ops(s, "w1")
        order.append(ready.seq)
        _commit(db, "w1", ready)
    assert order == [1, 2, 3]
    with db.read() as s:
        run = s.get(Run, run_id)
        assert run is not None
        assert (run.applied_seq, run.next_seq, run.optimizer_steps) == (3, 4, 3)
        assert claim.ready_run_ops(s, "w1") == []


def test_takeover_fences_the_old_owner(db: Database) -> None:
    run_id = _run(db)
    _register(db, "w1")
    _register(db, "w2")
    request_id = _submit(db, run_id, 1)
    with db.write() as s:
        (lease1,) = leases.acquire_runs(s, "w1", ttl=0.05)
    with db.read() as s:
        (stale,) = claim.ready_run_ops(s, "w1")
    with db.write() as s:
        assert claim.claim_run_op(s, "w1", stale)
    time.sleep(0.2)  # w1 stops renewing (paused, partitioned...): its lease expires
    with db.write() as s:
        (lease2,) = leases.acquire_runs(s, "w2", ttl=30)
    assert lease2.epoch == lease1.epoch + 1
    # The zombie's late commit is rejected and changes nothing.
    with pytest.raises(Fenced), db.write() as s:
        commit.commit_run_op(
            s,
            worker_id="w1",
            run_id=run_id,
            seq=1,
            epoch=lease1.epoch,
            request_id=request_id,
            outcome=Outcome(result=b"zombie"),
        )
    with db.read() as s:
        op = s.get(Op, request_id)
        assert op is not None and op.result is None
        (ready,) = claim.ready_run_ops(s, "w2")
    assert ready.epoch == lease2.epoch and ready.status == "running"  # the stale claim is re-claimable
    _commit(db, "w2", ready)
    with db.read() as s:
        op = s.get(Op, request_id)
        assert op is not None and op.status == "succeeded" and op.attempt == 2 and op.claimed_epoch == lease2.epoch


def test_rejected_op_is_skipped_without_stalling(db: Database) -> None:
    run_id = _run(db)
    _register(db, "w1")
    with db.write() as s:
        run = submit.get_run(s, TENANT, run_id)
        rejected = submit.submit_run_op(s, run, 1, None, rejected="bad tokens", kind="forward_backward", raw=b"x")
    _submit(db, run_id, 2)
    with db.write() as s:
        (lease,) = leases.acquire_runs(s, "w1", ttl=30)
        (ready,) = claim.ready_run_ops(s, "w1")
        assert (ready.seq, ready.status) == (1, "failed")
        commit.skip_rejected_op(s, worker_id="w1", run_id=run_id, seq=1, epoch=lease.epoch)
    with db.read() as s:
        (ready,) = claim.ready_run_ops(s, "w1")
        assert ready.seq == 2
        op = s.get(Op, rejected.request_id)
        assert op is not None and (op.status, op.error_category, op.error_message) == (
            "failed",
            "user",
            "bad tokens",
        )


def test_samples_are_claimed_once_and_requeued_when_abandoned(db: Database) -> None:
    with db.write() as s:
        session_id = submit.create_session(s, TENANT, sdk_version=None, tags=[], user_metadata={}, display_name=None)
        sampler = submit.create_sampler(
            s, TENANT, session_id=session_id, sampling_session_seq_id=0, base_model="m", model_path=None
        )
        sub = submit.submit_sample(s, sampler, 0, SampleOp(prompt=(1, 2, 3)))
        again = submit.submit_sample(s, sampler, 0, SampleOp(prompt=(1, 2, 3)))
    assert again.request_id == sub.request_id
    with db.write() as s:
        first = claim.claim_sample(s, "w1", claim_ttl=0.05)
    with db.write() as s:
        assert claim.claim_sample(s, "w2", claim_ttl=30) is None  # already taken
    assert first is not None and first.request_id == sub.request_id
    time.sleep(0.2)
    with db.write() as s:
        assert claim.requeue_expired_samples(s) == 1
        retaken = claim.claim_sample(s, "w2", claim_ttl=30)
    assert retaken is not None
    with pytest.raises(Fenced), db.write() as s:
        commit.commit_sample(s, worker_id="w1", request_id=sub.request_id, outcome=Outcome(result=b"late"))
    with db.write() as s:
        commit.commit_sample(s, worker_id="w2", request_id=sub.request_id, outcome=Outcome(result=b"ok"))
    with db.read() as s:
        op = s.get(Op, sub.request_id)
        assert op is not None and (op.status, op.result) == ("succeeded", b"ok")


def test_create_run_is_idempotent_per_model_seq_id(db: Database) -> None:
    with db.write() as s:
        session_id = submit.create_session(s, TENANT, sdk_version=None, tags=[], user_metadata={}, display_name=None)
        a = submit.create_run(
            s,
            TENANT,
            session_id=session_id,
            model_seq_id=0,
            base_model="m",
            lora=LoraConfig(rank=4),
            user_metadata={},
        )
        b = submit.create_run(
            s,
            TENANT,
            session_id=session_id,
            model_seq_id=0,
            base_model="m",
            lora=LoraConfig(rank=4),
            user_metadata={},
        )
        assert a.run_id == b.run_id == f"{session_id}:train:0"
        with pytest.raises(Conflict):
            submit.create_run(
                s,
                TENANT,
                session_id=session_id,
                model_seq_id=0,
                base_model="m",
                lora=LoraConfig(rank=8),
                user_metadata={},
            )
