"""Two attempts of one save op (issue 7 item 1), deterministically interleaved on a real database
and the real engine: worker A pauses after its checkpoint is sealed (manifest written) and before
it is renamed into place; its lease expires, the sweeper takes the run back, worker B rebuilds the
run, saves again and registers the checkpoint. Then A resumes. A's late commit must be fenced off
AND A must leave B's registered files alone: they still verify and load."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

import workers.execute
from app.checkpoint_store import CheckpointStore
from app.db import migrate
from app.db.engine import Database, db_now
from app.db.models import Checkpoint, Op, Run
from app.domain.ops import LoraConfig, SaveWeightsOp
from app.queue import leases
from app.queue.sweeper import sweep
from tests.workers.conftest import make_engine, make_settings
from tests.workers.test_recovery import new_run, script, submit_all
from workers.engine import TorchEngine
from workers.runner import Runner


def _runner(settings: Any, db: Database, engine: TorchEngine, name: str) -> Runner:
    runner = Runner(settings, db, engine, worker_id=name)
    with db.write() as s:
        leases.register_worker(s, worker_id=name, host="test", device="cpu", queue=f"q.{name}", pid=0)
    return runner


def _step(runner: Runner) -> None:
    # No heartbeat thread here: the test decides when a lease is fresh (so A's can expire).
    runner.last_renewal = time.monotonic()
    runner.step()


def _applied(db: Database, run_id: str) -> int:
    with db.read() as s:
        run = s.get(Run, run_id)
        assert run is not None
        return run.applied_seq


def _registered(db: Database, run_id: str) -> list[str]:
    with db.read() as s:
        return [c.storage_path for c in s.query(Checkpoint).filter(Checkpoint.run_id == run_id)]


def test_a_paused_writer_cannot_touch_the_save_registered_after_a_takeover(
    db_url: str, tmp_path: Path, engine_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    migrate.upgrade(db_url)
    settings = make_settings(tmp_path, db_url, lease_ttl_seconds=2.0)
    db = Database(db_url)
    run_id = new_run(db)
    ids = submit_all(db, run_id, [*script(1), SaveWeightsOp(checkpoint_kind="training", name="final")])
    a = _runner(settings, db, make_engine(settings, engine_cache), "a")
    engine_b = make_engine(settings, engine_cache)
    b = _runner(settings, db, engine_b, "b")

    # A pauses at the named fault point between sealing its checkpoint and renaming it into place
    # (where a SIGSTOPped worker was caught in the report).
    paused, resume = threading.Event(), threading.Event()
    real_fault = workers.execute.fault

    def fault(name: str) -> None:
        if name == "checkpoint_sealed" and threading.current_thread().name == "worker-a":
            paused.set()
            assert resume.wait(120), "the test never resumed worker A"
        real_fault(name)

    monkeypatch.setattr(workers.execute, "fault", fault)

    deadline = time.monotonic() + 120
    while _applied(db, run_id) < 2:
        assert time.monotonic() < deadline, "A did not train"
        _step(a)
    a_thread = threading.Thread(target=_step, args=(a,), name="worker-a", daemon=True)
    a_thread.start()
    assert paused.wait(120), "A never reached its save"

    # A's lease expires (it is paused: no renewals); the sweeper takes the run back; B saves.
    while True:
        with db.read() as s:
            run = s.get(Run, run_id)
            assert run is not None and run.lease_expires_at is not None
            if run.lease_expires_at < db_now(s):
                break
        assert time.monotonic() < deadline, "A's lease never expired"
        time.sleep(0.1)
    with db.write() as s:
        assert run_id in sweep(s, lease_ttl=settings.lease_ttl_seconds, result_retention=0).expired_leases
    while _applied(db, run_id) < 3:
        assert time.monotonic() < deadline, "B did not take the run over"
        _step(b)
    (registered,) = _registered(db, run_id)
    with db.read() as s:
        save = s.get(Op, ids[-1])
        assert save is not None and save.status == "succeeded" and save.attempt == 2

    # A resumes: its commit is fenced off, and B's files must survive it.
    resume.set()
    a_thread.join(120)
    assert not a_thread.is_alive()
    assert a.fenced_commits == 1
    assert _registered(db, run_id) == [registered]
    folder = settings.resolved_checkpoint_dir() / registered
    probe = f"{run_id}-probe"
    with db.read() as s:
        run = s.get(Run, run_id)
        assert run is not None
        engine_b.create_run(probe, run.base_model, LoraConfig.model_validate(run.lora_config))
    engine_b.load_run(probe, folder, True)  # "not a TuFT checkpoint" when A had removed them
    assert engine_b.state_digest(probe) == engine_b.state_digest(run_id)
    assert CheckpointStore(settings.resolved_checkpoint_dir()).verify(registered) is None
    # A removed only its own, unregistered folder: B's is the only one left under the name.
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]
    db.dispose()
