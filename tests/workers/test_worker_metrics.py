"""A worker's own /metrics (workers/metrics.py, docs/metrics.md "Workers"): served on
worker_metrics_port + GPU index, with the snapshots this process wrote (through the real snapshot
writer and the fenced register) and, on the CPU, no GPU series at all. On CUDA the GPU gauges
must be there and agree with torch.cuda."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from app.db.engine import Database
from app.db.models import Snapshot
from app.domain.ops import LoraConfig, OptimStepOp
from app.queue import leases, submit
from tests.workers.conftest import make_settings
from workers import metrics
from workers.snapshots import SnapshotWriter


class _Export:
    """Writes a file of known size in place of an adapter and optimizer export."""

    def export_run(self, run_id: str) -> Any:
        return SimpleNamespace(optimizer_steps=1)

    def write_export(self, export: Any, dest: Path) -> int:
        (dest / "adapter.bin").write_bytes(b"x" * 4096)
        return 4096


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _owned_run(db: Database, worker_id: str) -> tuple[str, int]:
    with db.write() as s:
        session_id = submit.create_session(s, "t", sdk_version=None, tags=[], user_metadata={}, display_name=None)
        run = submit.create_run(
            s, "t", session_id=session_id, model_seq_id=0, base_model="m", lora=LoraConfig(rank=2), user_metadata={}
        )
        submit.submit_run_op(s, run, 1, OptimStepOp())
        leases.register_worker(s, worker_id=worker_id, host="h", device="cpu", queue="q", pid=1)
        (lease,) = leases.acquire_runs(s, worker_id, ttl=60)
        return run.run_id, lease.epoch


def test_worker_metrics_on_cpu(tmp_path: Path, db: Database) -> None:
    port = _free_port()
    settings = make_settings(tmp_path, db.url, worker_metrics_port=port - 1, worker_metrics_host="127.0.0.1")
    before = _count(metrics.REGISTRY, "tuft_worker_snapshot_seconds_count")
    server = metrics.serve_metrics(settings, "w-cpu", "cpu", gpu=1)  # base port + GPU index
    writer = SnapshotWriter(settings, db, _Export(), "w-cpu")
    try:
        run_id, epoch = _owned_run(db, "w-cpu")
        writer._write(run_id, epoch, 1, _Export().export_run(run_id))
        with db.read() as s:
            assert s.get(Snapshot, (run_id, 1)) is not None  # registered, so it was counted
        samples = _scrape(port)
    finally:
        writer.close()
        server.shutdown()
        server.server_close()
    assert samples[("tuft_worker_info", (("device", "cpu"), ("worker_id", "w-cpu")))] == 1
    assert samples[("tuft_worker_snapshot_seconds_count", ())] == before + 1
    assert samples[("tuft_worker_snapshot_bytes_count", ())] == before + 1
    assert samples[("tuft_worker_snapshot_bytes_sum", ())] >= 4096
    assert not [name for name, _ in samples if name.startswith("tuft_worker_gpu_")]


def _count(registry: Any, name: str) -> float:
    return next((s.value for f in registry.collect() for s in f.samples if s.name == name), 0.0)


def test_no_listener_without_a_port(tmp_path: Path, db: Database) -> None:
    assert metrics.serve_metrics(make_settings(tmp_path, db.url), "w", "cpu", gpu=None) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_gauges_on_cuda() -> None:
    held = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")  # 64 MiB stays allocated
    families = {f.name: f for f in metrics.build_registry("w-gpu", "cuda").collect()}
    allocated = families["tuft_worker_gpu_memory_allocated_bytes"].samples[0]
    assert allocated.labels == {"worker_id": "w-gpu", "device": f"cuda:{torch.cuda.current_device()}"}
    assert allocated.value >= held.numel()
    total = families["tuft_worker_gpu_memory_total_bytes"].samples[0].value
    assert total == torch.cuda.get_device_properties(0).total_memory
    assert families["tuft_worker_gpu_memory_reserved_bytes"].samples[0].value >= allocated.value
    del held
