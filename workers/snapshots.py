"""Recovery snapshots: taken right after an optim_step (a gradient-clean point), every
`snapshot_every_ops` ops or `snapshot_every_seconds`, whichever comes first.

Taking one costs the runner only a copy of the run's tensors off the device (engine.export_run);
files are written by a background thread (temporary name, fsync, rename), then registered under
the fence. A failed write (a full disk) is logged as an alert and leaves the previous snapshot in
force: it never fails the run. The newest `snapshots_kept` verified snapshots are kept.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from app.config import Settings
from app.db.engine import Database
from app.queue import snapshots
from app.queue.commit import Fenced
from app.snapshot_manifest import write_manifest
from workers import metrics
from workers.faults import fault

log = logging.getLogger(__name__)


class Exporter(Protocol):
    def export_run(self, run_id: str) -> Any: ...
    def write_export(self, export: Any, dest: Path) -> int: ...


class SnapshotWriter:
    def __init__(self, settings: Settings, db: Database, engine: Exporter, worker_id: str) -> None:
        self.settings = settings
        self.db = db
        self.engine = engine
        self.worker_id = worker_id
        self.root = settings.resolved_snapshot_dir()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tuft-snapshot")
        self._last: dict[str, tuple[int, float]] = {}  # run -> (seq of the last snapshot, monotonic time)
        self._pending: list[Future[None]] = []
        self._lock = threading.Lock()
        self.failures = 0

    def restored(self, run_id: str, seq: int) -> None:
        """The run's state was just rebuilt from a snapshot at `seq` (or from scratch, seq -1)."""
        self._last[run_id] = (seq, time.monotonic())

    def forget(self, run_id: str) -> None:
        self._last.pop(run_id, None)

    def last_seq(self, run_id: str) -> int | None:
        """Seq of the run's last snapshot taken (or restored) here; None if none is known."""
        last = self._last.get(run_id)
        return None if last is None else last[0]

    def after_commit(self, run_id: str, epoch: int, seq: int, kind: str) -> None:
        """Called after each committed op; snapshots after an optim_step when one is due."""
        if kind != "optim_step" or self.settings.snapshot_every_ops <= 0:
            return
        last_seq, last_time = self._last.setdefault(run_id, (-1, time.monotonic()))
        due = seq - last_seq >= self.settings.snapshot_every_ops or (
            time.monotonic() - last_time >= self.settings.snapshot_every_seconds
        )
        if due:
            self.take(run_id, epoch, seq)

    def take(self, run_id: str, epoch: int, seq: int) -> Future[None]:
        export = self.engine.export_run(run_id)
        self._last[run_id] = (seq, time.monotonic())
        future = self._pool.submit(self._write, run_id, epoch, seq, export)
        with self._lock:
            self._pending = [f for f in self._pending if not f.done()] + [future]
        return future

    def drain(self, timeout: float = 60.0) -> None:
        """Wait for snapshot writes in flight (graceful shutdown, tests)."""
        with self._lock:
            pending = list(self._pending)
        for future in pending:
            future.result(timeout=timeout)

    def _write(self, run_id: str, epoch: int, seq: int, export: Any) -> None:
        rel = f"{run_id.replace(':', '_')}/snap-{seq:010d}-e{epoch}"
        final = self.root / rel
        tmp = final.parent / f".{final.name}.tmp"
        started = time.monotonic()
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            fault("snapshot_write")
            size = self.engine.write_export(export, tmp)
            digest = write_manifest(tmp, {"run_id": run_id, "applied_seq": seq, "epoch": epoch})
            fault("snapshot_before_rename")
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            fault("snapshot_before_register")
            with self.db.write() as s:
                dropped = snapshots.register(
                    s,
                    worker_id=self.worker_id,
                    run_id=run_id,
                    epoch=epoch,
                    applied_seq=seq,
                    storage_path=rel,
                    optimizer_steps=int(export.optimizer_steps),
                    size_bytes=size,
                    manifest_sha256=digest,
                    keep=self.settings.snapshots_kept,
                )
            for path in dropped:
                shutil.rmtree(self.root / path, ignore_errors=True)
            self._remove_unregistered(run_id, final.parent, epoch)
            metrics.snapshot_written(time.monotonic() - started, size)
            log.info("snapshot of %s at seq %d written (%d bytes)", run_id, seq, size)
        except Fenced as exc:
            log.warning("snapshot discarded: %s", exc)
            shutil.rmtree(final, ignore_errors=True)
        except OSError as exc:
            # Disk full or unwritable: an alert, never a failed run; the last snapshot stays valid.
            self.failures += 1
            log.error("ALERT snapshot of %s at seq %d failed, previous snapshot kept: %s", run_id, seq, exc)
            shutil.rmtree(tmp, ignore_errors=True)
        except Exception:
            self.failures += 1
            log.exception("ALERT snapshot of %s at seq %d failed", run_id, seq)
            shutil.rmtree(tmp, ignore_errors=True)

    def _remove_unregistered(self, run_id: str, folder: Path, epoch: int) -> None:
        """Folders a crash left behind (written but never registered, or half-written `.tmp`) are
        garbage: only registered snapshots count. Called right after this worker registered one
        under `epoch`; it may already have lost the run since (paused between that commit and
        here), so it only removes folders written under its own epoch or an older one: a folder of
        a newer epoch belongs to the run's next owner, registered or about to be, and is never
        touched (the same rule as checkpoint files: a writer without the fence leaves them be)."""
        with self.db.read() as s:
            keep = {Path(row.storage_path).name for row in snapshots.for_run(s, run_id)}
        for entry in folder.iterdir():
            written_under = _folder_epoch(entry.name)
            if entry.name in keep or written_under is None or written_under > epoch:
                continue
            log.info("removing unregistered snapshot files %s", entry)
            shutil.rmtree(entry, ignore_errors=True)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


_FOLDER = re.compile(r"^\.?snap-\d+-e(\d+)(\.tmp)?$")


def _folder_epoch(name: str) -> int | None:
    """The lease epoch a snapshot folder (`snap-<seq>-e<epoch>`, or its `.tmp` staging) was written
    under; None for anything else, which is left alone."""
    match = _FOLDER.match(name)
    return int(match.group(1)) if match else None
