"""Checkpoint downloads with the real SDK and its `tinker` CLI against a live server
(docs/downloads.md). The same file runs under both SDKs of the matrix (Makefile: test-sdk-old):
0.38 exports with save_weights_external and downloads per-file signed links; 0.25 downloads a
signed tar of any checkpoint. Each test skips under the SDK it does not apply to.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import tinker
from tinker import types

from tests.e2e.server import LiveServer
from tests.e2e.test_training import client_for, memorise_datum, new_training

SDK = tuple(int(p) for p in tinker.__version__.split(".")[:2])
pytestmark = pytest.mark.e2e
only_038 = pytest.mark.skipif(SDK < (0, 38), reason="save_weights_external and per-file links are SDK 0.38")
only_025 = pytest.mark.skipif(SDK >= (0, 38), reason="checkpoint archives are SDK 0.25 (0.38 exports instead)")

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
RANK = 8


def _train(training: tinker.TrainingClient, steps: int = 2) -> None:
    for _ in range(steps):
        training.forward_backward([memorise_datum()], "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=120)


def _cli(server: LiveServer, *args: str) -> dict[str, Any]:
    """`tinker --format json ...` of the running SDK's own venv, configured through its env vars."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("TINKER_", "TUFT_"))},
        "TINKER_BASE_URL": server.url,
        "TINKER_API_KEY": "tml-local-dev-key",
        "TINKER_TELEMETRY": "0",
    }
    cli = Path(sys.executable).parent / "tinker"
    done = subprocess.run(
        [str(cli), "--format", "json", *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{server.logs()}"
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from the file's own header (8-byte length, then JSON)."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header.pop("__metadata__", None)
    assert 8 + length + max(t["data_offsets"][1] for t in header.values()) == len(raw)
    return {name: t["shape"] for name, t in header.items()}


def _assert_peft_adapter(folder: Path, server_copy: Path) -> None:
    """A loadable PEFT LoRA adapter of rank RANK, byte-identical to the server's files."""
    assert {p.name for p in folder.iterdir()} >= ADAPTER_FILES, list(folder.iterdir())
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["base_model_name_or_path"]) == ("LORA", RANK, "tuft/tiny-qwen3")
    shapes = _safetensors_shapes(folder / "adapter_model.safetensors")
    lora_a = {k: v for k, v in shapes.items() if k.endswith(".lora_A.weight")}
    lora_b = {k: v for k, v in shapes.items() if k.endswith(".lora_B.weight")}
    assert lora_a and len(lora_a) == len(lora_b), sorted(shapes)
    assert all(k.startswith("base_model.model.") for k in shapes), sorted(shapes)
    assert all(shape[0] == RANK for shape in lora_a.values()), lora_a
    assert all(shape[-1] == RANK for shape in lora_b.values()), lora_b
    for name in ADAPTER_FILES:
        assert (folder / name).read_bytes() == (server_copy / name).read_bytes(), name


def _server_folder(server: LiveServer, run_id: str, kind: str, name: str) -> Path:
    """The one save of that checkpoint: checkpoints/<run>/<kind>/<name>/<save>."""
    saves = list((server.data_dir / "checkpoints" / run_id.replace(":", "_") / kind / name).iterdir())
    assert len(saves) == 1, saves
    return saves[0]


@only_038
def test_save_weights_external_and_cli_download(embedded_server: LiveServer, tmp_path: Path) -> None:
    client = client_for(embedded_server)
    training = new_training(client)
    _train(training)
    exported = training.save_weights_external("final").result(timeout=120)
    assert exported.path == f"tinker://{training.model_id}/external_weights/final"
    # The same adapter save_weights_for_sampler writes at the same point of the run.
    training.save_weights_for_sampler("same-point").result(timeout=120)
    external_copy = _server_folder(embedded_server, training.model_id, "external", "final")
    _assert_peft_adapter(external_copy, _server_folder(embedded_server, training.model_id, "sampler", "same-point"))

    rest = tinker.RestClient(base_url=embedded_server.url, api_key="tml-local-dev-key")
    links = rest.get_external_weights_urls(exported.path).result(timeout=60)
    assert set(links.urls) >= ADAPTER_FILES, links.urls
    assert links.expires > datetime.now(UTC)
    with urllib.request.urlopen(links.urls["adapter_model.safetensors"], timeout=60) as r:
        assert r.read() == (external_copy / "adapter_model.safetensors").read_bytes()

    out = _cli(embedded_server, "checkpoint", "download", exported.path, "--output", str(tmp_path / "out"))
    destination = Path(out["destination"])
    assert destination == tmp_path / "out" / f"{training.model_id}_external_weights_final"
    _assert_peft_adapter(destination, external_copy)
    assert out["file_size_bytes"] == sum(p.stat().st_size for p in destination.iterdir())


@only_038
def test_cli_downloads_a_training_checkpoint_through_a_temporary_export(
    embedded_server: LiveServer, tmp_path: Path
) -> None:
    """0.38's CLI loads the state into a new run, exports it, downloads the links and deletes the
    export: create-from-state, save_weights_external, external_weights_urls, TTL and DELETE."""
    client = client_for(embedded_server)
    training = new_training(client)
    _train(training)
    state = training.save_state("state").result(timeout=120)
    training.save_weights_for_sampler("reference").result(timeout=120)

    out = _cli(embedded_server, "checkpoint", "download", state.path, "--output", str(tmp_path))
    destination = Path(out["destination"])
    assert destination.name == f"{training.model_id}_weights_state"
    _assert_peft_adapter(destination, _server_folder(embedded_server, training.model_id, "sampler", "reference"))
    # The temporary export is gone.
    assert not list(embedded_server.data_dir.glob("checkpoints/*/external/download"))


@only_025
def test_archive_url_and_cli_download(embedded_server: LiveServer, tmp_path: Path) -> None:
    assert tinker.__version__ == "0.25.0"
    client = client_for(embedded_server)
    training = new_training(client)
    _train(training)
    sampler = training.save_weights_for_sampler("for-download").result(timeout=120)
    server_copy = _server_folder(embedded_server, training.model_id, "sampler", "for-download")

    rest = client.create_rest_client()
    link = rest.get_checkpoint_archive_url(training.model_id, "sampler_weights/for-download").result(timeout=60)
    assert link.url.startswith(f"{embedded_server.url}/api/v1/downloads/"), link.url
    assert link.expires.timestamp() > time.time()
    with urllib.request.urlopen(link.url, timeout=60) as r, tarfile.open(fileobj=io.BytesIO(r.read())) as tar:
        names = set(tar.getnames())
    assert names >= ADAPTER_FILES | {"checkpoint_complete"}, names

    out = _cli(embedded_server, "checkpoint", "download", sampler.path, "--output", str(tmp_path / "out"))
    destination = Path(out["destination"])
    assert destination == tmp_path / "out" / f"{training.model_id}_sampler_weights_for-download"
    assert (destination / "checkpoint_complete").exists()
    _assert_peft_adapter(destination, server_copy)
