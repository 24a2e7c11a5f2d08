"""`tuft worker --gpus` and `worker_gpus`: parsing and refusal (the ranks themselves are tested in
tests/engine/test_data_parallel.py; a worker over real GPUs needs a multi-GPU machine)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli.main import build_parser
from app.config import load_settings
from workers.__main__ import parse_args
from workers.multi_gpu import parse_gpus


def test_parse_gpus() -> None:
    assert parse_gpus("0,1") == [0, 1]
    assert parse_gpus(" 2, 3 ,5 ") == [2, 3, 5]
    assert parse_gpus([1, 0]) == [1, 0]
    assert parse_gpus(None) is None and parse_gpus("") is None and parse_gpus([]) is None
    for bad in ("0,0", "0,-1", "0;1", "a"):
        with pytest.raises(ValueError):
            parse_gpus(bad)


def test_cli_and_settings_carry_the_gpus(tmp_path: Path) -> None:
    assert build_parser().parse_args(["worker", "--gpus", "0,1"]).gpus == "0,1"
    assert parse_args(["--gpus", "2,3"]).gpus == "2,3"
    config = tmp_path / "tuft.yaml"
    config.write_text("worker_gpus: [0, 1]\n")
    assert load_settings(config).worker_gpus == [0, 1]
    assert load_settings().worker_gpus is None


def test_worker_refuses_a_bad_gpu_list(tmp_path: Path) -> None:
    """Before it touches the database or a GPU (its own process: the worker pins signals)."""
    done = subprocess.run(
        [sys.executable, "-m", "workers", "--gpus", "1,1", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TUFT_SETTINGS_JSON": ""},
    )
    assert done.returncode == 2
    assert "GPU indices must be distinct" in done.stderr
