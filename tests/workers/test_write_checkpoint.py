"""write_checkpoint: files appear atomically at their final folder, each attempt in a folder of its
own, and a failed export (a full disk) leaves nothing behind. The engine is a fake of our own
Engine port: only save_run is used."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest

from app.checkpoint_store import CheckpointStore
from app.domain.ops import SaveWeightsOp
from workers.execute import SavedFiles, write_checkpoint

RUN = "s-1:train:0"


class Exporter:
    """save_run writes two files; with `fail_after_first`, the disk fills up after the first."""

    def __init__(self, fail_after_first: bool = False) -> None:
        self.fail_after_first = fail_after_first

    def save_run(self, run_id: str, dest: Path, with_optimizer: bool) -> int:
        (dest / "adapter_model.safetensors").write_bytes(b"w" * 10)
        if self.fail_after_first:
            raise OSError(errno.ENOSPC, "No space left on device")
        (dest / "optimizer.pt").write_bytes(b"o" * 5)
        return 15


def _write(store: CheckpointStore, engine: Any, request_id: str) -> SavedFiles:
    op = SaveWeightsOp(checkpoint_kind="training", name="step-1")
    saved, _pending = write_checkpoint(
        engine,
        store,
        run_id=RUN,
        op=op,
        name="step-1",
        made_by=request_id,
        manifest={"tinker_path": f"tinker://{RUN}/weights/step-1"},
    )
    return saved


def test_files_land_in_the_attempt_s_own_folder(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    saved = _write(store, Exporter(), "req-a")
    folder = tmp_path / saved.storage_path
    assert saved.size_bytes == 15
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_model.safetensors", "manifest.json", "optimizer.pt"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["tinker_path"].endswith("/weights/step-1")
    assert sorted(manifest["files"]) == ["adapter_model.safetensors", "optimizer.pt"]
    assert store.verify(saved.storage_path) is None
    # Another save of the same name gets another folder beside it; so does another attempt of the
    # same op (a retry, or a worker that took the run over): nobody writes into another's folder.
    other = _write(store, Exporter(), "req-b")
    again = _write(store, Exporter(), "req-a")
    assert len({saved.storage_path, other.storage_path, again.storage_path}) == 3
    assert (folder / "optimizer.pt").read_bytes() == b"o" * 5
    assert len(list(folder.parent.iterdir())) == 3  # no temporary folders left


def test_verify_names_what_is_wrong(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    saved = _write(store, Exporter(), "req-a")
    folder = tmp_path / saved.storage_path
    (folder / "optimizer.pt").write_bytes(b"x" * 5)
    assert store.verify(saved.storage_path) == "optimizer.pt is corrupt (sha256 mismatch)"
    (folder / "adapter_model.safetensors").unlink()
    assert store.verify(saved.storage_path) == "adapter_model.safetensors is missing"


def test_a_full_disk_leaves_no_partial_folder(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    with pytest.raises(OSError, match="No space left"):
        _write(store, Exporter(fail_after_first=True), "req-a")
    name_folder = tmp_path / RUN.replace(":", "_") / "training" / "step-1"
    assert list(name_folder.iterdir()) == []


def test_storage_paths_that_leave_the_root_are_refused(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    for bad in ("../x", "/etc", "a/../../b", ""):
        with pytest.raises(ValueError):
            store.folder(bad)
    # The layout of rows written before per-attempt folders still resolves (no data migration).
    assert store.folder("s-1_train_0/training/step-1/0123456789abcdef") == tmp_path / (
        "s-1_train_0/training/step-1/0123456789abcdef"
    )
