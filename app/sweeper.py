"""Hosting the sweeper: a thread in every API process; the singleton lease makes one of them
active at a time, and another takes over within a TTL if that process dies."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

from app.checkpoint_store import CheckpointStore
from app.config import Settings
from app.db.engine import Database
from app.doorbell import Doorbell
from app.metrics import collector as metrics
from app.queue.sweeper import SweepReport, hold_singleton, run_pass

log = logging.getLogger("tuft.sweeper")


def remove_checkpoint_files(db: Database, checkpoint_dir: Path, storage_paths: list[str]) -> int:
    """Delete the folders of checkpoints whose rows are gone (committed). Rows go first, files
    after: a crash in between leaves orphan files (swept later), never a listed checkpoint without
    files. A folder some row still names stays."""
    return CheckpointStore(checkpoint_dir).remove_unregistered(db, storage_paths)


def orphan_scan_interval(settings: Settings) -> float:
    """How often the active sweeper walks the checkpoint tree for orphans: a fraction of the grace
    period (an orphan waits at most grace + interval), at most every 10 minutes, never more often
    than a sweep."""
    return max(settings.sweep_interval_seconds, min(settings.checkpoint_orphan_grace_seconds / 4, 600.0))


class SweeperThread(threading.Thread):
    def __init__(self, settings: Settings, db: Database, doorbell: Doorbell) -> None:
        super().__init__(name="tuft-sweeper", daemon=True)
        self.settings = settings
        self.db = db
        self.doorbell = doorbell
        self.stop_event = threading.Event()
        self.holder = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.passes = 0
        self._next_orphan_scan = 0.0  # monotonic; the first active pass scans

    def run_once(self) -> SweepReport | None:
        interval = self.settings.sweep_interval_seconds
        with self.db.write() as s:
            if not hold_singleton(s, "sweeper", self.holder, ttl=max(3 * interval, 5.0)):
                return None
        # Short transactions, one step (one lease take-back) each: app/queue/sweeper.py run_pass.
        report = run_pass(
            self.db,
            lease_ttl=self.settings.lease_ttl_seconds,
            result_retention=self.settings.result_retention_seconds,
            finished_run_retention=self.settings.finished_run_retention_seconds,
        )
        if report.retention.snapshot_paths:
            # Snapshot rows of retired runs are gone (committed): their files go now.
            snapshot_dir = self.settings.resolved_snapshot_dir()
            for rel in report.retention.snapshot_paths:
                shutil.rmtree(snapshot_dir / rel, ignore_errors=True)
            log.info("sweeper: retired %d finished run(s)", len(report.retention.finished_runs))
        metrics.record_sweep(len(report.expired_leases))
        if report.wakeups:
            self.doorbell.ring(report.wakeups)
        if report.expired_checkpoints:
            checkpoint_dir = self.settings.resolved_checkpoint_dir()
            remove_checkpoint_files(self.db, checkpoint_dir, report.expired_checkpoints)
            log.info("sweeper: deleted %d expired checkpoint(s)", len(report.expired_checkpoints))
        if report.expired_leases or report.dead_workers or report.requeued_samples:
            log.warning(
                "sweeper: took back %d expired lease(s) %s, %d dead worker(s), %d abandoned sample(s)",
                len(report.expired_leases),
                report.expired_leases,
                len(report.dead_workers),
                report.requeued_samples,
            )
        if time.monotonic() >= self._next_orphan_scan:
            self._next_orphan_scan = time.monotonic() + orphan_scan_interval(self.settings)
            self.sweep_checkpoint_orphans()
        self.passes += 1
        return report

    def sweep_checkpoint_orphans(self) -> list[str]:
        """Orphaned checkpoint folders (app/checkpoint_store.py); a failure waits for the next scan."""
        store = CheckpointStore(self.settings.resolved_checkpoint_dir())
        try:
            return store.sweep_orphans(self.db, self.settings.checkpoint_orphan_grace_seconds)
        except Exception as exc:
            log.warning("sweeper: checkpoint orphan scan failed: %s", exc)
            return []

    def run(self) -> None:
        while not self.stop_event.wait(self.settings.sweep_interval_seconds):
            try:
                self.run_once()
            except Exception as exc:
                log.warning("sweeper pass failed: %s", exc)

    def stop(self) -> None:
        self.stop_event.set()
