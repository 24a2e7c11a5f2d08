"""Retention (issue 7 item 5): op payloads, sample payloads and finished runs are pruned by the
sweeper, and nothing a recovery or a client still needs is. Real databases (SQLite, PostgreSQL)."""

from __future__ import annotations

import time

from sqlalchemy import update

from app.db.engine import Database
from app.db.models import Op, Run, Session, Snapshot, Worker
from app.domain.ops import AdamParams, LoraConfig, OptimStepOp, SampleOp
from app.queue import claim, leases, snapshots, submit
from app.queue.commit import Outcome, commit_run_op, commit_sample
from app.queue.futures import get_future, mark_delivered
from app.queue.sweeper import run_pass, sweep

TENANT = "t"
W = "w1"


def _run_with_ops(db: Database, n: int) -> tuple[str, str, list[str]]:
    with db.write() as s:
        session_id = submit.create_session(s, TENANT, sdk_version=None, tags=[], user_metadata={}, display_name=None)
        run = submit.create_run(
            s, TENANT, session_id=session_id, model_seq_id=0, base_model="m", lora=LoraConfig(rank=2), user_metadata={}
        )
        ids = [
            submit.submit_run_op(s, run, seq, OptimStepOp(adam=AdamParams(learning_rate=0.001 * seq))).request_id
            for seq in range(1, n + 1)
        ]
        if s.get(Worker, W) is None:
            leases.register_worker(s, worker_id=W, host="h", device="cpu", queue="q", pid=1)
        return session_id, run.run_id, ids


def _apply(db: Database, run_id: str, upto: int) -> int:
    """Claim and commit the run's ops up to seq `upto` as a worker would; return the epoch."""
    with db.write() as s:
        leases.acquire_runs(s, W, ttl=60)
    epoch = 0
    while True:
        with db.read() as s:
            ready = [r for r in claim.ready_run_ops(s, W) if r.run_id == run_id and r.seq <= upto]
        if not ready:
            return epoch
        op = ready[0]
        epoch = op.epoch
        with db.write() as s:
            assert claim.claim_run_op(s, W, op)
        with db.write() as s:
            commit_run_op(
                s,
                worker_id=W,
                run_id=run_id,
                seq=op.seq,
                epoch=op.epoch,
                request_id=op.request_id,
                outcome=Outcome(result=f"r{op.seq}".encode()),
                optimizer_steps_delta=1,
            )


def _snapshot(db: Database, run_id: str, epoch: int, seq: int) -> list[str]:
    with db.write() as s:
        return snapshots.register(
            s,
            worker_id=W,
            run_id=run_id,
            epoch=epoch,
            applied_seq=seq,
            storage_path=f"{run_id}/{seq}",
            optimizer_steps=seq,
            size_bytes=1,
            manifest_sha256="0" * 64,
            keep=2,
        )


def _payloads(db: Database, ids: list[str]) -> list[bool]:
    """For each op: does it still hold its payload?"""
    with db.read() as s:
        return [bool(s.get(Op, i).payload) for i in ids]  # type: ignore[union-attr]


def _pass(db: Database, finished_run_retention: float = 0.0) -> None:
    run_pass(db, lease_ttl=60, result_retention=0, finished_run_retention=finished_run_retention)


def test_payloads_up_to_the_oldest_kept_snapshot_are_pruned_and_no_further(db: Database) -> None:
    _, run_id, ids = _run_with_ops(db, 7)
    epoch = _apply(db, run_id, 2)
    _snapshot(db, run_id, epoch, 2)
    _apply(db, run_id, 4)
    _snapshot(db, run_id, epoch, 4)
    _apply(db, run_id, 5)  # seq 6 and 7 stay queued
    _pass(db)
    # Oldest kept snapshot: 2. A rebuild may fall back to it, so 3..5 are needed for replay; 6, 7
    # have not run yet.
    assert _payloads(db, ids) == [False, False, True, True, True, True, True]
    with db.read() as s:
        first = get_future(s, TENANT, ids[0])
        assert first.status == "succeeded" and first.result == b"r1"  # the future itself is intact
        assert s.get(Op, ids[0]).payload_pruned_at is not None  # type: ignore[union-attr]
        assert s.get(Run, run_id).payloads_pruned_seq == 2  # type: ignore[union-attr]

    # A newer snapshot drops the one at 2: now 3 and 4 can go as well, not 5.
    _apply(db, run_id, 6)
    assert _snapshot(db, run_id, epoch, 6) == [f"{run_id}/2"]
    _pass(db)
    assert _payloads(db, ids) == [False, False, False, False, True, True, True]
    # A retried submission of a pruned op is still recognised (sha256, not the payload).
    with db.write() as s:
        run = submit.get_run(s, TENANT, run_id)
        again = submit.submit_run_op(s, run, 1, OptimStepOp(adam=AdamParams(learning_rate=0.001)))
    assert again.request_id == ids[0]


def test_a_running_op_below_the_snapshot_keeps_its_payload(db: Database) -> None:
    """The guard is `terminal`, not the seq alone: an op still running is never emptied."""
    _, run_id, ids = _run_with_ops(db, 3)
    epoch = _apply(db, run_id, 2)
    _snapshot(db, run_id, epoch, 2)
    with db.write() as s:  # an impossible-but-guarded state: op 1 back to running
        s.execute(update(Op).where(Op.request_id == ids[0]).values(status="running"))
    _pass(db)
    assert _payloads(db, ids) == [True, False, True]
    with db.read() as s:
        assert s.get(Run, run_id).payloads_pruned_seq is None  # type: ignore[union-attr]  # op 1 left


def test_sample_payloads_go_once_terminal_and_delivered(db: Database) -> None:
    session_id, _, _ = _run_with_ops(db, 0)
    with db.write() as s:
        sampler = submit.create_sampler(
            s, TENANT, session_id=session_id, sampling_session_seq_id=0, base_model="m", model_path=None
        )
        ids = [submit.submit_sample(s, sampler, seq, SampleOp(prompt=(1, 2, seq))).request_id for seq in range(3)]
    for _ in range(2):  # two of the three run; the third stays queued
        with db.write() as s:
            got = claim.claim_sample(s, W, 60)
        assert got is not None
        with db.write() as s:
            commit_sample(s, worker_id=W, request_id=got.request_id, outcome=Outcome(result=b"done"))
    done = [i for i in ids if _status(db, i) == "succeeded"]
    with db.write() as s:
        mark_delivered(s, done[0])
    _pass(db)
    expected = {i: i != done[0] for i in ids}
    assert dict(zip(ids, _payloads(db, ids), strict=True)) == expected
    with db.read() as s:
        assert get_future(s, TENANT, done[0]).result == b"done"


def _status(db: Database, request_id: str) -> str:
    with db.read() as s:
        return s.get(Op, request_id).status  # type: ignore[union-attr]


def test_finished_runs_lose_payloads_and_snapshots_after_the_retention(db: Database) -> None:
    finished_session, finished_run, finished_ids = _run_with_ops(db, 4)
    epoch = _apply(db, finished_run, 4)
    _snapshot(db, finished_run, epoch, 2)
    _snapshot(db, finished_run, epoch, 4)
    _, live_run, live_ids = _run_with_ops(db, 4)
    live_epoch = _apply(db, live_run, 4)
    _snapshot(db, live_run, live_epoch, 4)
    with db.write() as s:
        s.execute(update(Session).where(Session.session_id == finished_session).values(finished_at=time.time()))

    # Within the retention nothing of the finished run goes beyond the snapshot rule.
    _pass(db, finished_run_retention=3600)
    assert _payloads(db, finished_ids) == [False, False, True, True]
    time.sleep(1.2)
    with db.write() as s:
        report = sweep(s, lease_ttl=60, result_retention=0, finished_run_retention=1.0)
    assert report.retention.finished_runs == [finished_run]
    assert sorted(report.retention.snapshot_paths) == [f"{finished_run}/2", f"{finished_run}/4"]
    assert _payloads(db, finished_ids) == [False] * 4
    with db.read() as s:
        assert s.query(Snapshot).filter(Snapshot.run_id == finished_run).count() == 0
        assert s.get(Run, finished_run).retired_at is not None  # type: ignore[union-attr]
        # Results and futures stay.
        assert get_future(s, TENANT, finished_ids[3]).result == b"r4"
        # The live run (session not finished) keeps its snapshot: recovery starts from it.
        assert s.query(Snapshot).filter(Snapshot.run_id == live_run).count() == 1
        assert s.get(Run, live_run).retired_at is None  # type: ignore[union-attr]
    assert _payloads(db, live_ids) == [False] * 4  # by the snapshot rule: its snapshot at 4 covers them
    # Retired once: the next pass reports nothing more.
    with db.write() as s:
        assert sweep(s, lease_ttl=60, result_retention=0, finished_run_retention=1.0).retention.finished_runs == []
