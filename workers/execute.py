"""Executing one op on the engine: domain op in, Outcome out.

Kept apart from the loop (runner.py) so that recovery replays ops through exactly the same code.
Checkpoint files are written here (temporary name, fsync, rename) before the fenced commit that
registers them, so a registered checkpoint always has complete files.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from app.domain.ops import ForwardBackwardOp, LoadWeightsOp, LoraConfig, OptimStepOp, SampleOp, SaveWeightsOp
from app.domain.results import ForwardBackwardResult, OptimStepResult, SampleResult
from app.files import fsync_path

log = logging.getLogger(__name__)


class Engine(Protocol):
    """What the runner needs from workers.engine.TorchEngine (a fake implements it in tests)."""

    def vocab_size(self, base_model: str) -> int: ...
    def create_run(self, run_id: str, base_model: str, lora: LoraConfig) -> None: ...
    def has_run(self, run_id: str) -> bool: ...
    def drop_run(self, run_id: str) -> None: ...
    def forward_backward(self, run_id: str, op: ForwardBackwardOp) -> ForwardBackwardResult: ...
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
    *,
    checkpoint_dir: Path,
    storage_path: str,
    run_id: str,
    op: SaveWeightsOp,
    request_id: str,
    manifest: dict[str, Any],
) -> SavedFiles:
    """Write the run's adapter (and optimizer for training checkpoints) atomically at storage_path."""
    final = checkpoint_dir / storage_path
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{request_id}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with_optimizer = op.checkpoint_kind == "training"
    try:
        size = engine.save_run(run_id, tmp, with_optimizer)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        fsync_path(tmp)
    except BaseException:
        # A full disk or a failed export: leave no half-written folder to fill the disk further.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        # A replay of this very save after a crash (each save has a folder of its own): redo it.
        trash = final.parent / f".{final.name}.old-{request_id}"
        shutil.rmtree(trash, ignore_errors=True)
        final.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    tmp.rename(final)
    fsync_path(final.parent)
    return SavedFiles(storage_path, size)


def apply_mutation(engine: Engine, run_id: str, op: object, resolve_dir: Any) -> object:
    """Run a state-changing op; `resolve_dir(path) -> Path` locates load_weights sources."""
    if isinstance(op, ForwardBackwardOp):
        return engine.forward_backward(run_id, op)
    if isinstance(op, OptimStepOp):
        return engine.optim_step(run_id, op)
    if isinstance(op, LoadWeightsOp):
        engine.load_run(run_id, resolve_dir(op.path), op.with_optimizer)
        return None
    raise TypeError(f"not a mutating op: {type(op).__name__}")
