"""Snapshot folders and the lease: a writer that may have lost its run never removes a folder
written under a newer epoch (the snapshot twin of the checkpoint-store race in issue 7 item 1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.db.engine import Database
from tests.workers.conftest import make_settings
from workers.snapshots import SnapshotWriter


class _NoExport:
    def export_run(self, run_id: str) -> Any:
        raise AssertionError("not used")

    def write_export(self, export: Any, dest: Path) -> int:
        raise AssertionError("not used")


def test_a_stale_writer_leaves_a_newer_owners_snapshot_folders(tmp_path: Path, db: Database) -> None:
    settings = make_settings(tmp_path, db.url)
    writer = SnapshotWriter(settings, db, _NoExport(), "worker-a")
    try:
        run_dir = writer.root / "run_x"
        names = {
            "snap-0000000004-e1": "older epoch, never registered (a crash): garbage",
            "snap-0000000006-e2": "own epoch, never registered: garbage",
            ".snap-0000000007-e2.tmp": "own epoch, half written: garbage",
            "snap-0000000008-e3": "the next owner's, renamed into place, not registered yet",
            ".snap-0000000012-e3.tmp": "the next owner's, being written",
            "notes": "not a snapshot folder",
        }
        for name in names:
            (run_dir / name).mkdir(parents=True)
            (run_dir / name / "adapter.bin").write_bytes(b"x")
        # Worker A registered its snapshot under epoch 2, was paused, and resumes here after the
        # run moved to epoch 3.
        writer._remove_unregistered("run:x", run_dir, 2)
        left = sorted(p.name for p in run_dir.iterdir())
        assert left == [".snap-0000000012-e3.tmp", "notes", "snap-0000000008-e3"]
        assert (run_dir / "snap-0000000008-e3" / "adapter.bin").read_bytes() == b"x"
    finally:
        writer.close()
