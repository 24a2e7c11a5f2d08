"""Pruned payloads never break a recovery (issue 7 item 5): the sweeper empties the payloads of
ops at or below the oldest kept snapshot; a run taken over afterwards still rebuilds bitwise, even
when its newest snapshot is corrupt and it has to fall back to the older one."""

from __future__ import annotations

import time
from pathlib import Path

from app.db.engine import Database
from app.db.models import Op
from app.domain.ops import ForwardBackwardOp
from app.queue import submit
from app.queue.sweeper import sweep
from tests.workers.conftest import make_settings
from tests.workers.test_recovery import TENANT, datum, drain, migrated, new_run, runner_for, script, submit_all

__all__ = ["migrated"]  # the fixture, imported for this module's tests


def test_rebuild_after_pruning_falls_back_to_the_older_snapshot(
    migrated: str, tmp_path: Path, engine_cache: Path
) -> None:
    settings = make_settings(tmp_path, migrated)
    db = Database(migrated)
    run_id = new_run(db)
    ops = script(5)  # 10 ops; snapshots at 4 and 8 are kept
    ids = submit_all(db, run_id, ops)
    a = runner_for(settings, db, engine_cache, "a")
    drain(a, db, run_id, len(ops))
    digest = a.engine.state_digest(run_id)  # type: ignore[attr-defined]
    a.stop.set()

    with db.write() as s:
        sweep(s, lease_ttl=settings.lease_ttl_seconds, result_retention=0)
    with db.read() as s:
        kept = [bool(s.get(Op, i).payload) for i in ids]  # type: ignore[union-attr]
    assert kept == [False] * 4 + [True] * 6  # at or below the oldest snapshot (4): gone

    # The newest snapshot is corrupt: the rebuild falls back to 4 and replays 5..10 from payloads.
    snaps = sorted(settings.resolved_snapshot_dir().glob("*/snap-*"))
    assert [p.name.split("-")[1] for p in snaps] == ["0000000004", "0000000008"]
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
    assert b.states.replayed == len(ops) - 4
    assert b.engine.state_digest(run_id) == digest  # type: ignore[attr-defined]
    db.dispose()
