"""The engine's per-run state as a cache of committed history (reliability-design.md §4.2).

For every run this worker serves we remember (epoch, applied_seq) of the state held by the engine.
Before op `seq` runs, the state must be exactly "after seq-1" under the current epoch; otherwise it
is rebuilt: a fresh adapter initialised from the run's seed, then every committed mutating op
replayed from its stored input, in order. Snapshots (to bound replay) plug in here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select

from app.db.engine import Database
from app.db.models import Op, Run
from app.domain.ops import LoraConfig, parse_op
from workers.execute import Engine, apply_mutation

log = logging.getLogger(__name__)


class RunStates:
    def __init__(self, db: Database, engine: Engine, resolve_dir: Callable[[str], Path]) -> None:
        self.db = db
        self.engine = engine
        self.resolve_dir = resolve_dir
        self._held: dict[str, tuple[int, int]] = {}  # run_id -> (epoch, applied_seq of the engine state)
        self._lost: set[str] = set()
        self._lock = threading.Lock()

    def advance(self, run_id: str, epoch: int, seq: int) -> None:
        self._held[run_id] = (epoch, seq)

    def discard(self, run_id: str) -> None:
        self._held.pop(run_id, None)
        if self.engine.has_run(run_id):
            self.engine.drop_run(run_id)

    def mark_lost(self, run_ids: set[str]) -> None:
        """Called from the heartbeat thread: these leases were taken over by someone else."""
        with self._lock:
            self._lost |= run_ids

    def held_runs(self) -> set[str]:
        return set(self._held)

    def drop_lost_runs(self) -> None:
        with self._lock:
            lost, self._lost = self._lost, set()
        for run_id in lost:
            log.warning("lease of %s was taken over; dropping its state", run_id)
            self.discard(run_id)

    def ensure(self, run_id: str, epoch: int, applied_seq: int) -> bool:
        """Make the engine hold run_id's state as of applied_seq; False if that is impossible now."""
        if self._held.get(run_id) == (epoch, applied_seq) and self.engine.has_run(run_id):
            return True
        self.discard(run_id)
        with self.db.read() as s:
            run = s.get(Run, run_id)
            if run is None or run.applied_seq != applied_seq:
                return False
            base_model, lora = run.base_model, LoraConfig(**run.lora_config)
            history = s.execute(
                select(Op.seq, Op.payload)
                .where(Op.run_id == run_id, Op.seq <= applied_seq, Op.mutates.is_(True), Op.status == "succeeded")
                .order_by(Op.seq)
            ).all()
        self.engine.create_run(run_id, base_model, lora)
        for seq, payload in history:
            try:
                apply_mutation(self.engine, run_id, parse_op(payload), self.resolve_dir)
            except Exception:
                log.exception("replay of %s seq %d failed; the run cannot be rebuilt", run_id, seq)
                self.discard(run_id)
                raise
        if history:
            log.info("rebuilt %s to seq %d by replaying %d ops", run_id, applied_seq, len(history))
        self._held[run_id] = (epoch, applied_seq)
        return True
