"""Executing a save_weights op: the checkpoint's files first, its row in the op's fenced commit.

Kept out of runner.py (the loop) because it is the one op kind with files and rows of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session as DbSession

from app.db.models import Run
from app.domain import ids
from app.domain.ops import SaveWeightsOp
from app.domain.results import SaveWeightsResult
from app.queue import checkpoints
from app.queue.claim import ReadyOp
from workers.execute import write_checkpoint

if TYPE_CHECKING:
    from workers.runner import Runner


class UserError(Exception):
    """An input problem found while executing: the op fails with category `user`."""


def run_save(runner: Runner, op: ReadyOp, save: SaveWeightsOp) -> tuple[SaveWeightsResult, Callable[[DbSession], None]]:
    """Write a claimed save_weights op's files (through the checkpoint store) and return its result
    and what its fenced commit must register; file clean-up goes on the runner's after-commit and
    abandon lists."""
    with runner.db.read() as s:
        run = s.get(Run, op.run_id)
        assert run is not None
        tenant, session_id, base_model, lora = (
            run.tenant,
            run.session_id,
            run.base_model,
            dict(run.lora_config),
        )
        name = save.name if save.name is not None else f"ephemeral-{op.seq}"
        existing = checkpoints.find(s, op.run_id, save.checkpoint_kind, name)
        if existing is not None and existing.created_by_op != op.request_id and not save.overwrite:
            raise UserError(f"checkpoint {name!r} already exists for {op.run_id}; pass overwrite=True to replace it")
    path = ids.checkpoint_path(op.run_id, save.checkpoint_kind, name)
    manifest = {
        "tinker_path": path,
        "run_id": op.run_id,
        "seq": op.seq,
        "base_model": base_model,
        "lora_config": lora,
        "optimizer_steps": runner.engine.optimizer_steps(op.run_id),
        "format": "peft-lora",
        # Which attempt wrote the folder: the sweeper keeps an unregistered folder while that
        # attempt may still commit (app/checkpoint_store.py, sweep_orphans).
        "written_by": {
            "request_id": op.request_id,
            "attempt": op.attempt + 1,  # claim_run_op counted this attempt
            "epoch": op.epoch,
            "worker": runner.worker_id,
        },
    }
    files, pending = write_checkpoint(
        runner.engine, runner.store, run_id=op.run_id, op=save, name=name, made_by=op.request_id, manifest=manifest
    )
    sampler_id = None
    if save.name is None and save.sampling_session_seq_id is not None:
        sampler_id = ids.sampler_id_for(session_id, save.sampling_session_seq_id)

    # The folder of the row this save replaces (overwritten, or expired and not yet swept),
    # read in the committing transaction; removed once that commit has landed (and only if no
    # row names it then). If the commit does not land, this attempt removes its own folder,
    # unless a row names it after all (a commit whose acknowledgement was lost). A crash in
    # between leaves an orphan folder for the sweeper, never a row without files.
    replaced: list[str] = []
    runner._after_commit.append(lambda: runner.store.remove_unregistered(runner.db, replaced))
    runner._abandon.append(lambda: runner.store.remove_unregistered(runner.db, [pending.storage_path]))

    def _register(s: DbSession) -> None:
        replaced.clear()  # a retried commit reads it again
        previous = checkpoints.find(s, op.run_id, save.checkpoint_kind, name, expired=True)
        if previous is not None and previous.storage_path != files.storage_path:
            replaced.append(previous.storage_path)
        checkpoints.record(
            s,
            tenant=tenant,
            run_id=op.run_id,
            kind=save.checkpoint_kind,
            name=name,
            storage_path=files.storage_path,
            base_model=base_model,
            lora_config=lora,
            with_optimizer=save.checkpoint_kind == "training",
            ephemeral=save.name is None,
            size_bytes=files.size_bytes,
            user_metadata=save.user_metadata,
            ttl_seconds=save.ttl_seconds,
            request_id=op.request_id,
            overwrite=save.overwrite,
        )
        if sampler_id is not None:
            checkpoints.record_sampler(
                s,
                sampler_id=sampler_id,
                session_id=session_id,
                tenant=tenant,
                base_model=base_model,
                model_path=path,
            )

    result = SaveWeightsResult(
        checkpoint_kind=save.checkpoint_kind,
        path=path,
        sampling_session_id=sampler_id,
        size_bytes=files.size_bytes,
    )
    return result, _register
