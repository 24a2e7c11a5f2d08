"""write_checkpoint: files appear atomically at their final folder, and a failed export (a full
disk) leaves nothing behind. The engine is a fake of our own Engine port: only save_run is used."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest

from app.domain.ops import SaveWeightsOp
from app.queue.checkpoints import storage_path_for
from workers.execute import write_checkpoint

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


def _write(root: Path, engine: Any, request_id: str) -> Any:
    op = SaveWeightsOp(checkpoint_kind="training", name="step-1")
    return write_checkpoint(
        engine,
        checkpoint_dir=root,
        storage_path=storage_path_for(RUN, "training", "step-1", request_id),
        run_id=RUN,
        op=op,
        request_id=request_id,
        manifest={"tinker_path": f"tinker://{RUN}/weights/step-1"},
    )


def test_files_land_in_the_save_s_own_folder(tmp_path: Path) -> None:
    saved = _write(tmp_path, Exporter(), "req-a")
    folder = tmp_path / saved.storage_path
    assert saved.size_bytes == 15
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_model.safetensors", "manifest.json", "optimizer.pt"]
    assert json.loads((folder / "manifest.json").read_text())["tinker_path"].endswith("/weights/step-1")
    # Another save of the same name gets another folder beside it; a replay of the same op, the same.
    other = _write(tmp_path, Exporter(), "req-b")
    assert other.storage_path != saved.storage_path and (tmp_path / saved.storage_path).is_dir()
    assert _write(tmp_path, Exporter(), "req-a").storage_path == saved.storage_path
    assert len(list(folder.parent.iterdir())) == 2  # no temporary folders left


def test_a_full_disk_leaves_no_partial_folder(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="No space left"):
        _write(tmp_path, Exporter(fail_after_first=True), "req-a")
    name_folder = tmp_path / storage_path_for(RUN, "training", "step-1", "req-a")
    assert not name_folder.exists()
    assert list(name_folder.parent.iterdir()) == []
