"""The runner under faults that are not the op's fault (issue 7, items 2 and 4), on a real database
and the real engine on the tiny model:

- a database outage in the middle of an op (its connections killed, no new ones accepted for a
  while) never fails the op: it is handed back and runs again once the database is back;
- a sticky device error (DeviceFatal) ends the worker without committing anything, and the next
  worker completes the op;
- an out-of-memory error that freeing other runs cures is retried and succeeds, bitwise equal to a
  run that never hit it; one that does not fit even then fails with category `user`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.pool import NullPool

from app.config import Settings
from app.db import migrate
from app.db.engine import Database
from app.db.models import Checkpoint, Op, Run
from app.domain import ids
from app.domain.ops import ForwardBackwardOp, LoadWeightsOp, SampleOp, SaveWeightsOp
from app.domain.results import parse_result
from app.queue import leases, submit
from tests.conftest import PG_ADMIN_URL
from tests.workers.conftest import make_settings
from tests.workers.test_recovery import TENANT, new_run, script, submit_all
from workers import faults
from workers.engine import DeviceFatal, OpInputError, OutOfMemory, TorchEngine
from workers.heartbeat import Heartbeat
from workers.runner import Runner
from workers.transient import is_transient


def make_runner(settings: Settings, db: Database, engine: TorchEngine, name: str) -> Runner:
    """A runner as `python -m workers` builds it (error classes, heartbeat thread); setting
    runner.stop ends the heartbeat too."""
    runner = Runner(
        settings,
        db,
        engine,
        worker_id=name,
        user_errors=(OpInputError,),
        fatal_errors=(DeviceFatal,),
        oom_errors=(OutOfMemory,),
    )
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


def op_rows(db: Database, request_ids: list[str]) -> list[Op]:
    with db.read() as s:
        return [s.get(Op, i) for i in request_ids]  # type: ignore[misc]


def wait_terminal(runner: Runner, db: Database, request_ids: list[str], timeout: float = 180) -> list[Op]:
    """Step the runner until every op is terminal (the step raises nothing: outages are waited out
    the way run_forever waits them out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            runner.step()
        except Exception as exc:  # the database is still down: what run_forever does
            if not is_transient(exc):
                raise
            time.sleep(0.2)
            continue
        rows = op_rows(db, request_ids)
        if all(r.status in ("succeeded", "failed") for r in rows):
            runner.snapshots.drain()
            return rows
    raise AssertionError(f"ops not done: {[(r.seq, r.status) for r in op_rows(db, request_ids)]}")


# ---- database outages (item 2) ------------------------------------------------------------------


def outage(url: str, seconds: float) -> threading.Thread:
    """An outage of one test database (never the shared server): every connection to it killed,
    and no new one accepted for `seconds`. Returns the thread that ends the outage."""
    name = make_url(url).database
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false'))
        conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d AND pid <> pg_backend_pid()"
            ),
            {"d": name},
        )

    def end() -> None:
        time.sleep(seconds)
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true'))
        admin.dispose()

    thread = threading.Thread(target=end, name="end-outage")
    thread.start()
    return thread


@pytest.fixture
def once_at() -> Iterator[Callable[[str, Callable[[], Any]], None]]:
    """once_at(point, action): run `action` the first time the runner passes crash point `point`."""
    points: list[str] = []

    def attach(point: str, action: Callable[[], Any]) -> None:
        fired: list[bool] = []

        def hook() -> None:
            if not fired:
                fired.append(True)
                action()

        points.append(point)
        faults.set_hook(point, hook)

    yield attach
    for point in points:
        faults.set_hook(point, None)


@pytest.mark.postgres
@pytest.mark.parametrize("kind", ["save_weights", "load_weights", "sample"])
def test_database_outage_in_the_middle_of_an_op_does_not_fail_it(
    kind: str, pg_url: str, tmp_path: Path, engine_cache: Path, once_at: Callable[..., None]
) -> None:
    migrate.upgrade(pg_url)
    # A lease far longer than the outage: the op must survive on this worker, not by a takeover.
    settings = make_settings(tmp_path, pg_url, lease_ttl_seconds=60.0)
    db = Database(pg_url)
    run_id = new_run(db)
    ops: list[object] = [*script(1), SaveWeightsOp(checkpoint_kind="training", name="ckpt")]
    if kind == "load_weights":
        ops.append(LoadWeightsOp(path=ids.checkpoint_path(run_id, "training", "ckpt"), with_optimizer=True))
    request_ids = submit_all(db, run_id, ops)
    if kind == "sample":
        with db.write() as s:
            session_id = submit.get_run(s, TENANT, run_id).session_id
            sampler = submit.create_sampler(
                s,
                TENANT,
                session_id=session_id,
                sampling_session_seq_id=0,
                base_model="tuft/tiny-qwen3",
                model_path=None,
            )
            prompt = SampleOp(prompt=(101, 57, 12), num_samples=2)
            request_ids.append(submit.submit_sample(s, sampler, 0, prompt).request_id)
    ended: list[threading.Thread] = []
    # The worker's connections die right before the op reads the database (the checkpoint row,
    # the load source, the sampler), and for 1.5 s none can be opened.
    once_at(f"before_engine_{kind}", lambda: ended.append(outage(pg_url, 1.5)))
    runner = make_runner(settings, db, TorchEngine(settings.models(), cache_dir=engine_cache), "w")
    try:
        rows = wait_terminal(runner, db, request_ids)
    finally:
        runner.stop.set()
        for thread in ended:
            thread.join()
    assert ended, "the outage was never triggered"
    assert [(r.status, r.error_message) for r in rows] == [("succeeded", None)] * len(rows)
    assert runner.handed_back == 1
    target = rows[-1]
    assert target.attempt == 1  # a hand-back is not a crash: it does not count toward poisoning
    result = parse_result(target.result)  # type: ignore[arg-type]
    assert result.kind == ("save_weights" if kind == "save_weights" else kind)
    with db.read() as s:
        assert s.get(Run, run_id).applied_seq == len(ops)  # type: ignore[union-attr]
        assert s.query(Checkpoint).filter_by(run_id=run_id, name="ckpt").count() == 1
    db.dispose()


# ---- device errors (item 4) ---------------------------------------------------------------------


def test_device_fatal_ends_the_worker_without_committing_and_the_next_one_completes_the_op(
    db_url: str, tmp_path: Path, engine_cache: Path, once_at: Callable[..., None]
) -> None:
    migrate.upgrade(db_url)
    settings = make_settings(tmp_path, db_url, lease_ttl_seconds=2.0)
    db = Database(db_url)
    run_id = new_run(db)
    request_ids = submit_all(db, run_id, script(2))

    def sticky_cuda_error() -> None:
        raise DeviceFatal("CUDA error: an illegal memory access was encountered")

    once_at("before_engine_optim_step", sticky_cuda_error)
    a = make_runner(settings, db, TorchEngine(settings.models(), cache_dir=engine_cache), "a")
    loop = threading.Thread(target=a.run_forever, daemon=True)
    loop.start()
    loop.join(timeout=120)
    running_on = loop.is_alive()
    a.stop.set()  # (the old runner recorded the op as failed and went on)
    assert not running_on, "the worker kept running after a device error"
    assert isinstance(a.fatal, DeviceFatal)
    first, step = op_rows(db, request_ids[:2])
    assert first.status == "succeeded"
    # Nothing committed for the op: no result, no error, still claimed; the run did not move.
    assert (step.status, step.result, step.error_message, step.attempt) == ("running", None, None, 1)
    with db.read() as s:
        assert s.get(Run, run_id).applied_seq == 1  # type: ignore[union-attr]

    # The lease expires (nobody renews it); another worker takes the run and completes the op.
    time.sleep(settings.lease_ttl_seconds + 0.3)
    b = make_runner(settings, db, TorchEngine(settings.models(), cache_dir=engine_cache), "b")
    rows = wait_terminal(b, db, request_ids)
    b.stop.set()
    assert [r.status for r in rows] == ["succeeded"] * 4
    assert rows[1].attempt == 2
    db.dispose()


class TightEngine(TorchEngine):
    """A device with room for one run's forward_backward at a time: with another run resident it
    runs out of memory, after accumulating part of the gradients (a half-applied op, as a GPU that
    fails on its second micro-batch leaves it)."""

    def __init__(self, *args: Any, too_big_above: int = 10**9, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.too_big_above = too_big_above
        self.ooms = 0

    def forward_backward(self, run_id: str, op: ForwardBackwardOp, micro_batch_tokens: int | None = None) -> Any:
        result = super().forward_backward(run_id, op, micro_batch_tokens)
        if len(self._runs) > 1 or len(op.data) > self.too_big_above:
            self.ooms += 1
            raise OutOfMemory("CUDA out of memory. Tried to allocate 2.00 GiB (test)")
        return result


def test_out_of_memory_that_freeing_cures_is_retried_and_ends_bitwise_equal(
    db_url: str, tmp_path: Path, engine_cache: Path
) -> None:
    migrate.upgrade(db_url)
    db = Database(db_url)
    ops = script(3)

    # Reference: each run alone on an engine with room to spare.
    ref_settings = make_settings(tmp_path / "ref", db_url)
    reference = make_runner(ref_settings, db, TorchEngine(ref_settings.models(), cache_dir=engine_cache), "ref")
    ref_run = new_run(db)
    wait_terminal(reference, db, submit_all(db, ref_run, ops))
    ref_digest = reference.engine.state_digest(ref_run)  # type: ignore[attr-defined]
    reference.stop.set()

    # Two runs (the same seed and ops as the reference) interleaved on the tight device.
    settings = make_settings(tmp_path / "tight", db_url)
    engine = TightEngine(settings.models(), cache_dir=engine_cache)
    runner = make_runner(settings, db, engine, "tight")
    runs = [new_run(db), new_run(db)]
    request_ids = [i for run_id in runs for i in submit_all(db, run_id, ops)]
    rows = wait_terminal(runner, db, request_ids)
    runner.stop.set()
    assert [(r.status, r.error_message) for r in rows] == [("succeeded", None)] * len(rows)
    assert engine.ooms >= 1 and runner.oom_retries >= 1
    # Each run's final state, rebuilt alone if it was evicted meanwhile, is the reference's.
    digests = {run_id: engine.state_digest(run_id) for run_id in runs if engine.has_run(run_id)}
    for run_id in set(runs) - set(digests):
        for held in runner.states.held_runs():
            runner.states.discard(held)
        with db.read() as s:
            run = s.get(Run, run_id)
            assert run is not None
        assert runner.states.ensure(run_id, run.lease_epoch, run.applied_seq)
        digests[run_id] = engine.state_digest(run_id)
    assert digests == {run_id: ref_digest for run_id in runs}
    db.dispose()


def test_an_op_too_big_even_alone_fails_with_category_user_and_the_run_goes_on(
    db_url: str, tmp_path: Path, engine_cache: Path
) -> None:
    migrate.upgrade(db_url)
    db = Database(db_url)
    settings = make_settings(tmp_path, db_url)
    engine = TightEngine(settings.models(), cache_dir=engine_cache, too_big_above=1)
    runner = make_runner(settings, db, engine, "w")
    run_id = new_run(db)
    fb = script(1)[0]
    assert isinstance(fb, ForwardBackwardOp)
    big = ForwardBackwardOp(data=fb.data * 2, loss_fn="cross_entropy")
    request_ids = submit_all(db, run_id, [big, *script(1)])
    rows = wait_terminal(runner, db, request_ids)
    runner.stop.set()
    assert (rows[0].status, rows[0].error_category) == ("failed", "user")
    assert "out of memory" in (rows[0].error_message or "") and "smaller pieces" in (rows[0].error_message or "")
    assert engine.ooms == 2  # tried, freed, tried once more
    assert [r.status for r in rows[1:]] == ["succeeded", "succeeded"]
    db.dispose()
