"""Bounded worker memory (issue 7, item 5): a worker keeps at most `max_resident_runs` runs in
memory, evicts idle runs and unloads unused base models; an evicted run releases its lease and
comes back from its snapshot + replay, bitwise equal to a run that was never evicted."""

from __future__ import annotations

import time
from pathlib import Path

from app.db import migrate
from app.db.engine import Database
from app.db.models import Op, Run
from app.domain.ops import AdamParams, ForwardBackwardOp, OptimStepOp
from tests.workers.conftest import make_settings
from tests.workers.test_recovery import datum, new_run, script, submit_all
from tests.workers.test_resilience import make_runner, wait_terminal
from workers.engine import TorchEngine


def accumulating_script(rounds: int) -> list[object]:
    """Two forward_backwards per optim_step: evictions land both on gradient-clean points (a
    snapshot is taken first) and between the two forward_backwards (pending gradients: no
    snapshot, the rebuild replays from the previous one)."""
    ops: list[object] = []
    for _ in range(rounds):
        ops += [ForwardBackwardOp(data=(datum(),), loss_fn="cross_entropy")] * 2
        ops.append(OptimStepOp(adam=AdamParams(learning_rate=1e-2)))
    return ops


def reference_digest(db: Database, tmp_path: Path, engine_cache: Path, ops: list[object]) -> str:
    settings = make_settings(tmp_path / "ref", db.url, max_resident_runs=0, run_idle_evict_seconds=0)
    runner = make_runner(settings, db, TorchEngine(settings.models(), cache_dir=engine_cache), "ref")
    run_id = new_run(db)
    wait_terminal(runner, db, submit_all(db, run_id, ops))
    runner.stop.set()
    assert runner.residency.evictions == 0
    return runner.engine.state_digest(run_id)  # type: ignore[attr-defined]


def test_a_cap_of_n_keeps_n_runs_resident_and_evicted_runs_end_bitwise_equal(
    db_url: str, tmp_path: Path, engine_cache: Path
) -> None:
    migrate.upgrade(db_url)
    db = Database(db_url)
    ops = accumulating_script(3)
    expected = reference_digest(db, tmp_path, engine_cache, ops)

    cap, served = 2, 5
    settings = make_settings(tmp_path / "capped", db_url, max_resident_runs=cap, snapshot_every_ops=100)
    engine = TorchEngine(settings.models(), cache_dir=engine_cache)
    runner = make_runner(settings, db, engine, "capped")
    runs = [new_run(db) for _ in range(served)]  # same seed and ops as the reference
    request_ids = [i for run_id in runs for i in submit_all(db, run_id, ops)]
    most_resident = 0
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        runner.step()
        most_resident = max(most_resident, len(engine._runs))
        with db.read() as s:
            if all(s.get(Op, i).status == "succeeded" for i in request_ids):  # type: ignore[union-attr]
                break
    runner.snapshots.drain()
    runner.stop.set()
    assert most_resident == cap
    assert runner.residency.evictions >= served - cap
    assert runner.states.rebuilds > served  # evicted runs came back

    # Every run ends as the never-evicted reference (rebuilt alone if it was evicted at the end).
    for run_id in runs:
        if not engine.has_run(run_id):
            for held in runner.states.held_runs():
                runner.states.discard(held)
            with db.read() as s:
                run = s.get(Run, run_id)
                assert run is not None
            assert runner.states.ensure(run_id, run.lease_epoch, run.applied_seq)
        assert engine.state_digest(run_id) == expected
    with db.read() as s:
        assert {s.get(Run, r).optimizer_steps for r in runs} == {3}  # type: ignore[union-attr]
    db.dispose()


def test_an_idle_run_is_snapshotted_evicted_and_released_and_its_model_unloaded(
    db_url: str, tmp_path: Path, engine_cache: Path
) -> None:
    migrate.upgrade(db_url)
    db = Database(db_url)
    first, second = script(2), script(1)
    expected = reference_digest(db, tmp_path, engine_cache, first + second)

    settings = make_settings(
        tmp_path / "idle",
        db_url,
        run_idle_evict_seconds=0.5,
        model_idle_unload_seconds=0.5,
        snapshot_every_ops=100,  # no cadence snapshot: only the eviction's
    )
    engine = TorchEngine(settings.models(), cache_dir=engine_cache)
    runner = make_runner(settings, db, engine, "idle")
    run_id = new_run(db)
    wait_terminal(runner, db, submit_all(db, run_id, first))
    assert engine.has_run(run_id) and engine.loaded_models() == ["tuft/tiny-qwen3"]

    deadline = time.monotonic() + 60
    while (engine.has_run(run_id) or engine.loaded_models()) and time.monotonic() < deadline:
        runner.step()
        time.sleep(0.1)
    assert not engine.has_run(run_id) and engine.loaded_models() == []
    with db.read() as s:
        run = s.get(Run, run_id)
        assert run is not None
        # Released for any worker, with a snapshot of the state at eviction.
        assert (run.owner_worker, run.lease_expires_at) == (None, None)
        assert run.last_snapshot_seq == len(first)

    # The next op brings it back from that snapshot, with nothing to replay.
    rebuilds = runner.states.rebuilds
    wait_terminal(runner, db, submit_all(db, run_id, second, first_seq=len(first) + 1))
    runner.stop.set()
    assert runner.states.rebuilds == rebuilds + 1 and runner.states.replayed == 0
    assert engine.state_digest(run_id) == expected
    db.dispose()
