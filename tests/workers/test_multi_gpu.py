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
from app.domain.models import ModelSpec, builtin_tiny_spec
from workers.__main__ import parse_args
from workers.multi_gpu import parse_gpus, resolve_shard, weight_bytes_bf16


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


def test_cli_and_settings_carry_the_shard_mode(tmp_path: Path) -> None:
    assert build_parser().parse_args(["worker", "--gpus", "0,1", "--shard", "fsdp"]).shard == "fsdp"
    assert parse_args(["--shard", "replicate"]).shard == "replicate"
    with pytest.raises(SystemExit):
        parse_args(["--shard", "tensor"])
    config = tmp_path / "tuft.yaml"
    config.write_text("worker_shard: fsdp\n")
    assert load_settings(config).worker_shard == "fsdp"
    assert load_settings().worker_shard == "auto"


def test_auto_shards_a_model_larger_than_half_a_gpu(tmp_path: Path) -> None:
    """The size comes from the safetensors headers alone: a float32 tensor of 1000 x 500 counts as
    1 MB of bf16 weights whatever the file holds."""
    import torch
    from safetensors.torch import save_file

    model = tmp_path / "model"
    model.mkdir()
    save_file({"a": torch.zeros(1000, 500), "b": torch.zeros(10)}, str(model / "model.safetensors"))
    spec = ModelSpec(model_name="m", model_path=str(model))
    assert weight_bytes_bf16(spec) == 2 * (500_000 + 10)
    assert weight_bytes_bf16(builtin_tiny_spec()) == 0
    assert resolve_shard("auto", [builtin_tiny_spec(), spec], device_bytes=2_000_000) is True
    assert resolve_shard("auto", [spec], device_bytes=2_100_000) is False
    assert resolve_shard("fsdp", [builtin_tiny_spec()], device_bytes=10**12) is True
    assert resolve_shard("replicate", [spec], device_bytes=1) is False
    with pytest.raises(ValueError, match="worker_shard"):
        resolve_shard("tp", [spec], device_bytes=1)


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
