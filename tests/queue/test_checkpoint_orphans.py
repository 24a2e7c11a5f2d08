"""The sweeper's orphan pass over checkpoint files (app/checkpoint_store.py, sweep_orphans), on a
real database: it removes what no row names and no attempt can still commit, after the grace
period, and never a registered folder or the folder of an attempt still in flight."""

from __future__ import annotations

import json
import time
from pathlib import Path

from sqlalchemy import update

from app.checkpoint_store import CheckpointStore
from app.db.engine import Database
from app.db.models import Op
from app.domain.ops import LoraConfig, SaveWeightsOp
from app.queue import checkpoints, submit

GRACE = 60.0


def _run(db: Database) -> tuple[str, str]:
    """A run with one queued save op: (run id, the op's request id)."""
    with db.write() as s:
        session_id = submit.create_session(s, "t", sdk_version=None, tags=[], user_metadata={}, display_name=None)
        run = submit.create_run(
            s, "t", session_id=session_id, model_seq_id=0, base_model="m", lora=LoraConfig(rank=2), user_metadata={}
        )
        op = submit.submit_run_op(s, run, 1, SaveWeightsOp(checkpoint_kind="training", name="final"))
        return run.run_id, op.request_id


def _write(store: CheckpointStore, run_id: str, request_id: str, attempt: int, epoch: int) -> str:
    """A published folder, as one attempt of the save writes it."""
    pending = store.begin(run_id, "training", "final", request_id)
    (pending.staging / "adapter_model.safetensors").write_bytes(b"w")
    written_by = {"request_id": request_id, "attempt": attempt, "epoch": epoch, "worker": "w"}
    pending.seal({"tinker_path": "x", "written_by": written_by})
    pending.publish()
    return pending.storage_path


def _register(db: Database, run_id: str, request_id: str, storage_path: str) -> None:
    with db.write() as s:
        checkpoints.record(
            s,
            tenant="t",
            run_id=run_id,
            kind="training",
            name="final",
            storage_path=storage_path,
            base_model="m",
            lora_config={"rank": 2},
            with_optimizer=True,
            ephemeral=False,
            size_bytes=1,
            user_metadata=None,
            ttl_seconds=None,
            request_id=request_id,
            overwrite=True,
        )


def _set_op(db: Database, request_id: str, status: str, attempt: int, epoch: int) -> None:
    with db.write() as s:
        s.execute(
            update(Op).where(Op.request_id == request_id).values(status=status, attempt=attempt, claimed_epoch=epoch)
        )


def test_orphans_go_after_the_grace_period_registered_and_in_flight_folders_stay(db: Database, tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    run_id, request_id = _run(db)
    later = time.time() + GRACE + 1

    # Attempt 1 (epoch 1) published its folder, then its worker vanished; attempt 2 (epoch 2) is
    # running now and has published its own folder, not yet registered.
    zombie = _write(store, run_id, request_id, attempt=1, epoch=1)
    current = _write(store, run_id, request_id, attempt=2, epoch=2)
    _set_op(db, request_id, "running", attempt=2, epoch=2)
    # A staging folder left by a crash, and a legacy temporary folder of the old layout.
    crashed = store.begin(run_id, "training", "final", "req-crashed")
    legacy_tmp = tmp_path / Path(zombie).parent / ".0123456789abcdef.tmp-req-old"
    legacy_tmp.mkdir()

    # Nothing is old enough yet.
    assert store.sweep_orphans(db, GRACE) == []

    removed = store.sweep_orphans(db, GRACE, now=later)
    # The dead attempt's folder and both temporary folders go; attempt 2 may still commit.
    assert sorted(removed) == sorted(
        [zombie, crashed.staging.relative_to(tmp_path).as_posix(), legacy_tmp.relative_to(tmp_path).as_posix()]
    )
    assert not (tmp_path / zombie).exists() and (tmp_path / current).is_dir()

    # Attempt 2 commits: its folder is registered, and stays however old it gets.
    _register(db, run_id, request_id, current)
    _set_op(db, request_id, "succeeded", attempt=2, epoch=2)
    assert store.sweep_orphans(db, GRACE, now=later) == []
    assert store.verify(current) is None

    # An overwriting save replaced it and crashed before removing it: now it is an orphan.
    with db.write() as s:
        run = submit.get_run(s, "t", run_id)
        save = SaveWeightsOp(checkpoint_kind="training", name="final", overwrite=True)
        other_request = submit.submit_run_op(s, run, 2, save).request_id
    replacement = _write(store, run_id, other_request, attempt=1, epoch=3)
    _register(db, run_id, other_request, replacement)
    _set_op(db, other_request, "succeeded", attempt=1, epoch=3)
    assert store.sweep_orphans(db, GRACE, now=later) == [current]
    assert [p.name for p in (tmp_path / replacement).parent.iterdir()] == [Path(replacement).name]


def test_folders_of_the_old_layout_resolve_and_are_judged_by_their_rows(db: Database, tmp_path: Path) -> None:
    """Rows written before per-attempt folders name `<run>/<kind>/<name>/<16 hex>`: still read
    and kept while named; once no row names one (and its manifest names no attempt) it is an
    orphan like any other."""
    store = CheckpointStore(tmp_path)
    run_id, request_id = _run(db)
    old = f"{run_id.replace(':', '_')}/training/final/0123456789abcdef"
    (tmp_path / old).mkdir(parents=True)
    (tmp_path / old / "manifest.json").write_text(json.dumps({"tinker_path": "x", "format": "peft-lora"}))
    (tmp_path / old / "tuft_run.json").write_text("{}")
    _register(db, run_id, request_id, old)
    later = time.time() + GRACE + 1
    assert store.verify(old) is None
    assert store.sweep_orphans(db, GRACE, now=later) == []
    with db.write() as s:
        checkpoints.delete(s, "t", run_id, "training", "final", label="final")
    assert store.sweep_orphans(db, GRACE, now=later) == [old]
    # The run's tree is gone down to the name folder (removed with its last save).
    assert not (tmp_path / old).parent.exists()
