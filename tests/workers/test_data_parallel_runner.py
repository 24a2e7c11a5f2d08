"""The runner over the data-parallel engine (2 CPU ranks, gloo), the base model replicated or
sharded (FSDP2): ops served from the database as by a one-GPU worker, and a rebuild by replay on the
same ranks bitwise equal to the served state, every replayed result the one the client got
(docs/architecture.md, "Several GPUs per worker")."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.db import migrate
from app.db.engine import Database
from app.db.models import Op, Run
from tests.engine.helpers import ON_GPU
from tests.workers.conftest import make_settings
from tests.workers.test_recovery import new_run, submit_all
from tests.workers.test_replay_split import _ops
from tests.workers.test_resilience import make_runner, wait_terminal
from workers.engine import EngineConfig, TorchEngine
from workers.engine.data_parallel import EngineArgs, launch

pytestmark = pytest.mark.skipif(ON_GPU, reason="the gloo path is tested on the CPU")


@pytest.mark.parametrize("shard", [False, True], ids=["replicated", "sharded"])
def test_runner_serves_and_replays_on_the_data_parallel_engine(
    sqlite_url: str, tmp_path: Path, engine_cache: Path, shard: bool
) -> None:
    migrate.upgrade(sqlite_url)
    db = Database(sqlite_url)
    settings = make_settings(tmp_path, sqlite_url, snapshot_every_ops=0)  # the rebuild replays every op
    config = EngineConfig(micro_batch_tokens=14)
    dp = launch(
        EngineArgs(settings.models(), cache_dir=engine_cache, config=config, shard=shard), world=2, timeout_s=60
    )
    try:
        served = make_runner(settings, db, dp, "dp-served")  # type: ignore[arg-type]
        run_id = new_run(db)
        rows = wait_terminal(served, db, submit_all(db, run_id, _ops(2)))
        served.stop.set()
        assert [r.status for r in rows] == ["succeeded"] * 4
        with db.read() as s:
            splits = [op.micro_batch_tokens for op in s.query(Op).filter(Op.run_id == run_id).order_by(Op.seq)]
            run = s.get(Run, run_id)
            assert run is not None
            epoch, applied = run.lease_epoch, run.applied_seq
        assert splits == [14, None] * 2
        want = dp.state_digest(run_id)

        # One process replaying the same ops lands within float rounding of the served weights (its
        # results are not bitwise the served ones: its micro-batches are not the ranks').
        one = TorchEngine(settings.models(), cache_dir=engine_cache, config=config)
        reference = make_runner(settings, db, one, "one-process")
        assert reference.states.ensure(run_id, epoch, applied)
        reference.stop.set()
        assert one.optimizer_steps(run_id) == 2
        w_one, w_dp = one.adapter_state(run_id), dp.adapter_state(run_id)
        gap = sum(float((w_dp[k] - w).pow(2).sum()) for k, w in w_one.items()) ** 0.5
        norm = sum(float(w.pow(2).sum()) for w in w_one.values()) ** 0.5
        assert gap < 1e-5 * norm  # 6e-7 measured: the ranks' micro-batches differ from one process's

        # Another runner on the same ranks drops the run and rebuilds it by replay.
        rebuilder = make_runner(settings, db, dp, "dp-rebuilder")  # type: ignore[arg-type]
        try:
            assert rebuilder.states.ensure(run_id, epoch, applied)
            assert rebuilder.states.replayed == 4
            assert rebuilder.states.divergences == 0  # every replayed result is the one served
            assert dp.state_digest(run_id) == want
        finally:
            rebuilder.stop.set()
    finally:
        dp.close(timeout_s=10)
        db.dispose()
