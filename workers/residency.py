"""Which runs and base models a worker keeps in memory (docs/configuration.md, "Worker memory").

A run's state in the engine is a cache of its committed history (recovery.py), so it can be
dropped at any point between ops and rebuilt later from its snapshot + replay. Without a bound a
worker that lives for months keeps every run and base model it ever served, on the GPU too. So:

- at most `max_resident_runs` runs are resident; before another run's state is built, the least
  recently used one is evicted;
- a run with no op for `run_idle_evict_seconds` is evicted;
- a base model with no resident run, unused for `model_idle_unload_seconds`, is unloaded;
- after an out-of-memory error everything but the failing op's run is evicted (`free_for_oom`).

Evicting a run: if it holds no pending gradients and has ops since its last snapshot, a snapshot
is written and registered first (under the fence, while the lease is still ours), so its rebuild
replays nothing; otherwise the rebuild replays the ops after its last snapshot, which the snapshot
cadence bounds. Then its state is dropped and its lease released, so any worker may take it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from sqlalchemy.orm import Session as DbSession

from app.config import Settings
from app.queue import handback
from workers.execute import Engine
from workers.recovery import RunStates
from workers.snapshots import SnapshotWriter

log = logging.getLogger(__name__)

# How often the idle checks run at most: they only compare clocks, but the loop turns every 0.1 s.
CHECK_INTERVAL_SECONDS = 1.0


class MemoryEngine(Protocol):
    def has_run(self, run_id: str) -> bool: ...
    def pending_gradients(self, run_id: str) -> bool: ...
    def unload_idle_models(self, idle_seconds: float) -> list[str]: ...
    def free_memory(self) -> None: ...


class WorkerEngine(Engine, MemoryEngine, Protocol):
    """What the runner needs from the engine: the op verbs and the memory verbs."""


class Residency:
    def __init__(
        self,
        settings: Settings,
        engine: MemoryEngine,
        states: RunStates,
        snapshots: SnapshotWriter,
        *,
        worker_id: str,
        commit: Callable[[Callable[[DbSession], Any]], Any],
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.states = states
        self.snapshots = snapshots
        self.worker_id = worker_id
        self.commit = commit  # the runner's retrying commit
        self._next_check = 0.0
        self.evictions = 0  # for operators and tests
        # Runs released since the runner's step began: their ops read in that step are no longer
        # ours to run (the claim would be refused after a useless rebuild).
        self.released: set[str] = set()

    def make_room(self, run_id: str) -> None:
        """Before `run_id`'s state is built: evict least recently used runs to stay under the cap."""
        cap = self.settings.max_resident_runs
        if cap <= 0 or run_id in self.states.held_runs():
            return
        others = [item for item in self.states.by_last_use() if item[0] != run_id]
        for victim, epoch, seq, _ in others[: max(0, len(others) - (cap - 1))]:
            self.evict(victim, epoch, seq, "over max_resident_runs")

    def evict_idle(self) -> None:
        """Between ops: evict runs idle too long and unload models nothing uses any more."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + CHECK_INTERVAL_SECONDS
        idle = self.settings.run_idle_evict_seconds
        if idle > 0:
            for run_id, epoch, seq, used in self.states.by_last_use():
                if now - used >= idle:
                    self.evict(run_id, epoch, seq, f"idle for {now - used:.0f}s")
        if self.settings.model_idle_unload_seconds > 0:
            for name in self.engine.unload_idle_models(self.settings.model_idle_unload_seconds):
                log.info("unloaded base model %s: no resident run and unused for a while", name)

    def free_for_oom(self, keep: str | None) -> None:
        """Out of device memory while running an op of `keep`: free everything else we can."""
        for run_id, epoch, seq, _ in self.states.by_last_use():
            if run_id != keep:
                self.evict(run_id, epoch, seq, "freeing memory after an out-of-memory error")
        self.engine.free_memory()

    def evict(self, run_id: str, epoch: int, seq: int, why: str) -> None:
        if self.engine.has_run(run_id) and self._worth_a_snapshot(run_id, seq):
            # Waited for: it must register under our epoch, before the lease is released below.
            self.snapshots.take(run_id, epoch, seq).result(timeout=600)
        self.states.discard(run_id)
        self.commit(lambda s: handback.release_run(s, worker_id=self.worker_id, run_id=run_id, epoch=epoch))
        self.released.add(run_id)
        self.evictions += 1
        log.info("evicted run %s at seq %d (%s); its lease is released", run_id, seq, why)

    def _worth_a_snapshot(self, run_id: str, seq: int) -> bool:
        if self.settings.snapshot_every_ops <= 0 or self.engine.pending_gradients(run_id):
            return False  # snapshots are off, or one now would lose the accumulated gradients
        last = self.snapshots.last_seq(run_id)
        return last is None or last < seq
