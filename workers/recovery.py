"""The engine's per-run state as a cache of committed history (reliability-design.md §4.2).

For every run this worker serves we remember (epoch, applied_seq) of the state held by the engine.
Before op `seq` runs, the state must be exactly "after seq-1" under the current epoch; otherwise it
is rebuilt: the newest snapshot at or before that point that verifies (else a fresh adapter from
the run's seed), then every committed mutating op after it replayed from its stored input, in
order. Replayed results are compared with the stored ones, never rewritten: what a client has seen
never changes, and a divergence (which only a nondeterministic device could cause) is reported.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select

from app.config import Settings
from app.db.engine import Database
from app.db.models import Op, Run
from app.domain.ops import LoraConfig, parse_op
from app.domain.results import result_bytes
from app.queue import snapshots
from app.snapshot_manifest import verify
from workers.execute import Engine, apply_mutation
from workers.faults import fault
from workers.snapshots import SnapshotWriter

log = logging.getLogger(__name__)


class RunStates:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        engine: Engine,
        resolve_dir: Callable[[str], Path],
        writer: SnapshotWriter | None = None,
    ) -> None:
        self.db = db
        self.engine = engine
        self.resolve_dir = resolve_dir
        self.writer = writer
        self.snapshot_root = settings.resolved_snapshot_dir()
        self._held: dict[str, tuple[int, int]] = {}  # run_id -> (epoch, applied_seq of the engine state)
        self._used: dict[str, float] = {}  # run_id -> monotonic time of its last op (eviction order)
        self._lost: set[str] = set()
        self._lock = threading.Lock()
        # Counters for operators and tests: rebuilds, ops replayed, replayed results that differed.
        self.rebuilds = 0
        self.replayed = 0
        self.divergences = 0

    def advance(self, run_id: str, epoch: int, seq: int) -> None:
        self._held[run_id] = (epoch, seq)
        self._used[run_id] = time.monotonic()

    def discard(self, run_id: str) -> None:
        self._held.pop(run_id, None)
        self._used.pop(run_id, None)
        if self.writer is not None:
            self.writer.forget(run_id)
        if self.engine.has_run(run_id):
            self.engine.drop_run(run_id)

    def mark_lost(self, run_ids: set[str]) -> None:
        """Called from the heartbeat thread: these leases were taken over by someone else."""
        with self._lock:
            self._lost |= run_ids

    def held_runs(self) -> set[str]:
        return set(self._held)

    def by_last_use(self) -> list[tuple[str, int, int, float]]:
        """(run_id, epoch, applied_seq, last use) of every held run, least recently used first."""
        held = [(run_id, epoch, seq, self._used.get(run_id, 0.0)) for run_id, (epoch, seq) in self._held.items()]
        return sorted(held, key=lambda item: item[3])

    def drop_lost_runs(self) -> None:
        with self._lock:
            lost, self._lost = self._lost, set()
        for run_id in lost:
            log.warning("lease of %s was taken over; dropping its state", run_id)
            self.discard(run_id)

    def ensure(self, run_id: str, epoch: int, applied_seq: int) -> bool:
        """Make the engine hold run_id's state as of applied_seq; False if the run moved meanwhile."""
        if self._held.get(run_id) == (epoch, applied_seq) and self.engine.has_run(run_id):
            return True
        self.discard(run_id)
        with self.db.read() as s:
            run = s.get(Run, run_id)
            if run is None or run.applied_seq != applied_seq:
                return False
            base_model, lora = run.base_model, LoraConfig(**run.lora_config)
            candidates = [
                (c.applied_seq, c.storage_path, c.manifest_sha256, c.optimizer_steps)
                for c in snapshots.candidates(s, run_id, applied_seq)
            ]
        self.engine.create_run(run_id, base_model, lora)
        start = self._restore_snapshot(run_id, candidates)
        if start < 0 and candidates:
            # A rejected snapshot may have been half-loaded: start again from the seed.
            self.engine.drop_run(run_id)
            self.engine.create_run(run_id, base_model, lora)
        with self.db.read() as s:
            history = s.execute(
                select(Op.seq, Op.payload, Op.result, Op.micro_batch_tokens)
                .where(
                    Op.run_id == run_id,
                    Op.seq > start,
                    Op.seq <= applied_seq,
                    Op.mutates.is_(True),
                    Op.status == "succeeded",
                )
                .order_by(Op.seq)
            ).all()
        for seq, payload, stored, split in history:
            fault("replay_op")  # a crash while rebuilding: the next owner rebuilds from scratch again
            try:
                # Split as it first ran: on a GPU the budget came from the free memory of the moment.
                result = apply_mutation(self.engine, run_id, parse_op(payload), self.resolve_dir, split)
            except Exception:
                log.exception("replay of %s seq %d failed; the run cannot be rebuilt", run_id, seq)
                self.discard(run_id)
                raise
            if result is not None and stored is not None and result_bytes(result) != stored:  # type: ignore[arg-type]
                self.divergences += 1
                log.warning("replay of %s seq %d gave a different result than the one served", run_id, seq)
        self.rebuilds += 1
        self.replayed += len(history)
        if history or start >= 0:
            log.info("rebuilt %s to seq %d: snapshot at %d + %d ops replayed", run_id, applied_seq, start, len(history))
        if self.writer is not None:
            self.writer.restored(run_id, start)
        self.advance(run_id, epoch, applied_seq)
        return True

    def _restore_snapshot(self, run_id: str, candidates: list[tuple[int, str, str, int]]) -> int:
        """Load the newest intact snapshot; return its seq, or -1 if the run starts from its seed."""
        for seq, rel, digest, steps in candidates:
            folder = self.snapshot_root / rel
            problem = verify(folder, digest)
            if problem is None:
                try:
                    self.engine.load_run(run_id, folder, True)
                except Exception as exc:
                    problem = f"cannot load: {exc}"
                else:
                    if self.engine.optimizer_steps(run_id) == steps:
                        return seq
                    problem = "optimizer step count does not match the registered one"
            log.error("ALERT snapshot of %s at seq %d is unusable (%s); trying an older one", run_id, seq, problem)
        return -1
