"""A replay splits each forward_backward into the micro-batches it first ran as (issue 8 item 6).

On a GPU the micro-batch budget comes from the free device memory of the moment, so the worker that
rebuilds a run after a crash would plan other micro-batches than the one that served it, and the
split decides the float rounding of the accumulated gradients. Here two engines with different
budgets stand for "the same GPU with more or less memory free": the run is served by one and
rebuilt by the other, and the rebuilt state must be bitwise the served one, every replayed result
equal to what the client got.
"""

from __future__ import annotations

from pathlib import Path

from app.db import migrate
from app.db.engine import Database
from app.db.models import Op, Run
from app.domain.ops import AdamParams, Datum, ForwardBackwardOp, OptimStepOp
from app.domain.tensors import Array
from tests.workers.conftest import make_settings
from tests.workers.test_recovery import new_run, submit_all
from tests.workers.test_resilience import make_runner, wait_terminal
from workers.engine import EngineConfig, TorchEngine

LENGTHS = (13, 9, 7, 5, 3)


def _datum(n: int, offset: int) -> Datum:
    tokens = [(offset * 31 + i * 7) % 500 + 1 for i in range(n + 1)]
    return Datum(tokens=tuple(tokens[:-1]), loss_fn_inputs={"target_tokens": Array.from_list(tokens[1:], "int64")})


def _ops(steps: int) -> list[object]:
    ops: list[object] = []
    for step in range(steps):
        data = tuple(_datum(n, step * 10 + i) for i, n in enumerate(LENGTHS))
        ops.append(ForwardBackwardOp(data=data, loss_fn="cross_entropy"))
        ops.append(OptimStepOp(adam=AdamParams(learning_rate=1e-2)))
    return ops


def test_a_replay_splits_each_op_as_it_first_ran(db_url: str, tmp_path: Path, engine_cache: Path) -> None:
    migrate.upgrade(db_url)
    db = Database(db_url)
    # No snapshots: the rebuild replays every op from the seed.
    settings = make_settings(tmp_path, db_url, snapshot_every_ops=0)

    def engine(budget: int) -> TorchEngine:
        return TorchEngine(settings.models(), cache_dir=engine_cache, config=EngineConfig(micro_batch_tokens=budget))

    served = make_runner(settings, db, engine(14), "served")  # micro-batches [13], [9], [7 5], [3]
    run_id = new_run(db)
    request_ids = submit_all(db, run_id, _ops(3))
    rows = wait_terminal(served, db, request_ids)
    served.stop.set()
    assert [r.status for r in rows] == ["succeeded"] * 6
    # The worker recorded each forward_backward's budget with its outcome.
    with db.read() as s:
        splits = [op.micro_batch_tokens for op in s.query(Op).filter(Op.run_id == run_id).order_by(Op.seq)]
        run = s.get(Run, run_id)
        assert run is not None
        epoch, applied = run.lease_epoch, run.applied_seq
    assert splits == [14, None] * 3
    want = served.engine.state_digest(run_id)  # type: ignore[attr-defined]

    # Another worker whose budget fits everything in one micro-batch rebuilds the run.
    rebuilder = make_runner(settings, db, engine(10**6), "rebuilder")
    try:
        assert rebuilder.states.ensure(run_id, epoch, applied)
        assert rebuilder.states.replayed == 6
        assert rebuilder.states.divergences == 0  # every replayed result is the one served
        assert rebuilder.engine.state_digest(run_id) == want  # type: ignore[attr-defined]
        # Its own new ops use its own budget.
        data = tuple(_datum(n, 99 + i) for i, n in enumerate(LENGTHS))
        rebuilder.engine.forward_backward(run_id, ForwardBackwardOp(data=data, loss_fn="cross_entropy"))
        assert rebuilder.engine.micro_batch_tokens(run_id) == 10**6  # type: ignore[attr-defined]
    finally:
        rebuilder.stop.set()
        db.dispose()
