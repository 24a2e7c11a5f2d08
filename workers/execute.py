"""Executing one op on the engine: domain op in, Outcome out.

Kept apart from the loop (runner.py) so that recovery replays ops through exactly the same code.
Checkpoint files are written here through the checkpoint store (a staging folder of the attempt's
own, sealed, renamed) before the fenced commit that registers them, so a registered checkpoint
always has complete files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from app.checkpoint_store import CheckpointStore, Pending
from app.domain.ops import ForwardBackwardOp, LoadWeightsOp, LoraConfig, OptimStepOp, SampleOp, SaveWeightsOp
from app.domain.results import ForwardBackwardResult, OptimStepResult, SampleResult
from workers.faults import fault

log = logging.getLogger(__name__)


class Engine(Protocol):
    """What the runner needs from workers.engine.TorchEngine (a fake implements it in tests)."""

    def vocab_size(self, base_model: str) -> int: ...
    def create_run(self, run_id: str, base_model: str, lora: LoraConfig) -> None: ...
    def has_run(self, run_id: str) -> bool: ...
    def drop_run(self, run_id: str) -> None: ...
    def forward_backward(
        self, run_id: str, op: ForwardBackwardOp, micro_batch_tokens: int | None = None
    ) -> ForwardBackwardResult: ...
    def micro_batch_tokens(self, run_id: str) -> int | None: ...
    def optim_step(self, run_id: str, op: OptimStepOp) -> OptimStepResult: ...
    def optimizer_steps(self, run_id: str) -> int: ...
    def save_run(self, run_id: str, dest: Path, with_optimizer: bool) -> int: ...
    def load_run(self, run_id: str, src: Path, with_optimizer: bool) -> None: ...
    def sample(self, base_model: str, adapter: Path | None, op: SampleOp) -> SampleResult: ...
    def export_run(self, run_id: str) -> Any: ...
    def write_export(self, export: Any, dest: Path) -> int: ...


@dataclass(frozen=True)
class SavedFiles:
    storage_path: str  # relative to the checkpoint dir
    size_bytes: int


def write_checkpoint(
    engine: Engine,
    store: CheckpointStore,
    *,
    run_id: str,
    op: SaveWeightsOp,
    name: str,
    made_by: str,
    manifest: dict[str, Any],
) -> tuple[SavedFiles, Pending]:
    """Write the run's adapter (and optimizer for training checkpoints) into a folder of this
    attempt's own (app/checkpoint_store.py): staged, sealed, renamed into place. The caller
    registers it under the fence, and discards it (`Pending.discard`) if that never lands."""
    pending = store.begin(run_id, op.checkpoint_kind, name, made_by)
    try:
        size = engine.save_run(run_id, pending.staging, op.checkpoint_kind == "training")
        if op.age_recipients:
            size = pending.encrypt(op.age_recipients)
        pending.seal(manifest)
        # A worker paused here (issue 7 item 1) used to find its run's save redone under the same
        # names when it woke; now nobody else can have touched this attempt's folders.
        fault("checkpoint_sealed")
        pending.publish()
    except BaseException:
        # A full disk, a failed export or a failed rename: leave nothing of ours behind.
        pending.discard()
        raise
    return SavedFiles(pending.storage_path, size), pending


def apply_mutation(
    engine: Engine, run_id: str, op: object, resolve_dir: Any, micro_batch_tokens: int | None = None
) -> object:
    """Run a state-changing op; `resolve_dir(path) -> Path` locates load_weights sources.
    `micro_batch_tokens`: a replay's forward_backward is split as the op first was (ops.micro_batch_tokens)."""
    if isinstance(op, ForwardBackwardOp):
        return engine.forward_backward(run_id, op, micro_batch_tokens)
    if isinstance(op, OptimStepOp):
        return engine.optim_step(run_id, op)
    if isinstance(op, LoadWeightsOp):
        engine.load_run(run_id, resolve_dir(op.path), op.with_optimizer)
        return None
    raise TypeError(f"not a mutating op: {type(op).__name__}")
