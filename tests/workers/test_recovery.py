"""The runner against a real database and the real engine on the tiny model: a worker that dies
is replaced by one that rebuilds the run from a snapshot plus replay, and the end state is
bitwise the state of a run that never failed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from app.db import migrate
from app.db.engine import Database
from app.db.models import Op, Run
from app.domain.ops import AdamParams, Datum, ForwardBackwardOp, LoraConfig, OptimStepOp
from app.domain.results import parse_result
from app.domain.tensors import Array
from app.queue import leases, submit
from app.queue.sweeper import sweep
from tests.workers.conftest import make_engine, make_settings
from workers.heartbeat import Heartbeat
from workers.runner import Runner

TENANT = "default"
TOKENS = [101, 57, 12, 7, 102, 1000, 2000, 3000, 4000]


def datum() -> Datum:
    return Datum(
        tokens=tuple(TOKENS[:-1]),
        loss_fn_inputs={"target_tokens": Array.from_list(TOKENS[1:], "int64")},
    )


def script(steps: int) -> list[object]:
    ops: list[object] = []
    for _ in range(steps):
        ops.append(ForwardBackwardOp(data=(datum(),), loss_fn="cross_entropy"))
        ops.append(OptimStepOp(adam=AdamParams(learning_rate=1e-2)))
    return ops


def new_run(db: Database) -> str:
    with db.write() as s:
        session_id = submit.create_session(s, TENANT, sdk_version=None, tags=[], user_metadata={}, display_name=None)
        run = submit.create_run(
            s,
            TENANT,
            session_id=session_id,
            model_seq_id=0,
            base_model="tuft/tiny-qwen3",
            lora=LoraConfig(rank=4, seed=3),
            user_metadata={},
        )
        return run.run_id


def submit_all(db: Database, run_id: str, ops: list[object], first_seq: int = 1) -> list[str]:
    ids = []
    with db.write() as s:
        run = submit.get_run(s, TENANT, run_id)
        for i, op in enumerate(ops):
            ids.append(submit.submit_run_op(s, run, first_seq + i, op).request_id)  # type: ignore[arg-type]
    return ids


def runner_for(settings, db, cache, name: str) -> Runner:  # type: ignore[no-untyped-def]
    """A runner with its heartbeat thread, as `python -m workers` builds it. Setting
    runner.stop ends the heartbeat too: the worker is gone as far as the database can tell."""
    runner = Runner(settings, db, make_engine(settings, cache), worker_id=name)
    with db.write() as s:
        leases.register_worker(s, worker_id=name, host="test", device="cpu", queue=f"q.{name}", pid=0)
    Heartbeat(
        db,
        name,
        interval=settings.heartbeat_seconds,
        ttl=settings.lease_ttl_seconds,
        states=runner.states,
        stop=runner.stop,
        on_renewed=lambda t: setattr(runner, "last_renewal", t),
    ).start()
    return runner


def drain(runner: Runner, db: Database, run_id: str, until_seq: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runner.step()
        with db.read() as s:
            run = s.get(Run, run_id)
            assert run is not None
            if run.applied_seq >= until_seq:
                runner.snapshots.drain()
                return
    raise AssertionError(f"run did not reach seq {until_seq}")


def results(db: Database, ids: list[str]) -> list[bytes | None]:
    with db.read() as s:
        return [s.get(Op, i).result for i in ids]  # type: ignore[union-attr]


@pytest.fixture
def migrated(db_url: str) -> str:
    migrate.upgrade(db_url)
    return db_url


def test_takeover_rebuilds_bitwise_from_snapshot_and_replay(migrated: str, tmp_path: Path, engine_cache: Path) -> None:
    ops = script(6)  # 12 ops; snapshots after optim_steps at seq 4, 8, 12 (every 4 ops)

    # Reference: one worker, no faults.
    ref_settings = make_settings(tmp_path / "ref", migrated)
    db = Database(migrated)
    ref_run = new_run(db)
    ref_ids = submit_all(db, ref_run, ops)
    reference = runner_for(ref_settings, db, engine_cache, "ref")
    drain(reference, db, ref_run, len(ops))
    ref_digest = reference.engine.state_digest(ref_run)  # type: ignore[attr-defined]
    reference.stop.set()

    # Faulty: worker A runs the first 9 ops (a snapshot exists at 8), then vanishes.
    settings = make_settings(tmp_path / "faulty", migrated)
    run_id = new_run(db)
    ids = submit_all(db, run_id, ops[:9])
    a = runner_for(settings, db, engine_cache, "a")
    drain(a, db, run_id, 9)
    with db.read() as s:
        assert s.get(Run, run_id).last_snapshot_seq == 8  # type: ignore[union-attr]
    ids += submit_all(db, run_id, ops[9:], first_seq=10)

    a.stop.set()  # A dies: no more heartbeats
    time.sleep(settings.lease_ttl_seconds + 0.3)  # A stops renewing; its lease expires
    with db.write() as s:
        report = sweep(s, lease_ttl=settings.lease_ttl_seconds, result_retention=0)
    assert run_id in report.expired_leases

    b = runner_for(settings, db, engine_cache, "b")
    drain(b, db, run_id, len(ops))
    b.stop.set()
    # Snapshot at 8 + replay of seq 9. On a loaded machine B's own 1 s lease can lapse mid-drain and
    # be taken again (epoch + 1), which correctly costs one more rebuild (CI saw 2): the state must
    # still come out bitwise equal, checked below.
    assert b.states.rebuilds >= 1 and b.states.replayed >= 1
    if b.states.rebuilds == 1:
        assert b.states.replayed == 1
    assert b.states.divergences == 0
    assert b.engine.state_digest(run_id) == ref_digest  # type: ignore[attr-defined]
    # Every client-visible result equals the fault-free run's.
    assert results(db, ids) == results(db, ref_ids)
    with db.read() as s:
        run = s.get(Run, run_id)
        # Epochs: A 1, sweeper 2, B 3; a heavily loaded machine can delay B's 0.2 s heartbeats past
        # the 1 s TTL once B is idle, and an extra take-back is correct behaviour, so: at least 3.
        assert run is not None and run.optimizer_steps == 6 and run.lease_epoch >= 3

    # A's late commit attempt is fenced: A still believes it holds epoch 1.
    from app.queue.commit import Fenced, Outcome, commit_run_op

    with pytest.raises(Fenced), db.write() as s:
        commit_run_op(
            s, worker_id="a", run_id=run_id, seq=12, epoch=1, request_id=ids[-1], outcome=Outcome(result=b"x")
        )
    db.dispose()


def test_corrupt_snapshot_falls_back_to_an_older_one(migrated: str, tmp_path: Path, engine_cache: Path) -> None:
    settings = make_settings(tmp_path, migrated)
    db = Database(migrated)
    run_id = new_run(db)
    ops = script(5)
    submit_all(db, run_id, ops)
    a = runner_for(settings, db, engine_cache, "a")
    drain(a, db, run_id, len(ops))
    digest = a.engine.state_digest(run_id)  # type: ignore[attr-defined]
    a.stop.set()
    snaps = sorted((settings.resolved_snapshot_dir()).glob("*/snap-*"))
    assert [p.name.split("-")[1] for p in snaps] == ["0000000004", "0000000008"]  # the newest two are kept
    (snaps[-1] / "adapter_model.safetensors").write_bytes(b"garbage")

    time.sleep(settings.lease_ttl_seconds + 0.3)
    with db.write() as s:
        sweep(s, lease_ttl=settings.lease_ttl_seconds, result_retention=0)
    b = runner_for(settings, db, engine_cache, "b")
    with db.write() as s:
        run = submit.get_run(s, TENANT, run_id)
        submit.submit_run_op(
            s, run, len(ops) + 1, ForwardBackwardOp(data=(datum(),), loss_fn="cross_entropy", forward_only=True)
        )
    drain(b, db, run_id, len(ops) + 1)
    b.stop.set()
    assert b.states.replayed == len(ops) - 4  # from the snapshot at 4, not the corrupt one at 8
    assert b.engine.state_digest(run_id) == digest  # type: ignore[attr-defined]
    db.dispose()


def test_poison_op_fails_after_max_attempts_and_the_run_goes_on(
    migrated: str, tmp_path: Path, engine_cache: Path
) -> None:
    settings = make_settings(tmp_path, migrated, max_op_attempts=2)
    db = Database(migrated)
    run_id = new_run(db)
    ids = submit_all(db, run_id, script(2))
    # Simulate two crashes while running seq 1: claimed twice, never committed.
    with db.write() as s:
        op = s.get(Op, ids[0])
        assert op is not None
        op.attempt, op.status = 2, "running"
    a = runner_for(settings, db, engine_cache, "a")
    drain(a, db, run_id, 4)
    with db.read() as s:
        first = s.get(Op, ids[0])
        assert first is not None and first.status == "failed" and first.error_category == "server"
        assert "attempted 2 times" in (first.error_message or "")
        assert [s.get(Op, i).status for i in ids[1:]] == ["succeeded"] * 3  # type: ignore[union-attr]
    assert parse_result(results(db, ids[1:2])[0]).kind == "optim_step"  # type: ignore[arg-type]
    a.stop.set()
    db.dispose()
