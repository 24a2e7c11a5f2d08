"""A worker's own Prometheus numbers, on its own port (docs/metrics.md "Workers").

Why a port and not rows in the database: GPU memory and utilisation are gauges of this moment,
worth nothing once stale, and a scrape should read them from the process that owns the GPU (a
database row would need a migration, a writer thread and would be one heartbeat old). Durable
numbers (ops, latencies, tokens) are the API's, from the op rows. The cost is one more scrape target
per worker: worker_metrics_port + the GPU index, so workers of one host never clash.

torch.cuda's counters are read at scrape time; on the CPU there are no GPU series at all.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.config import Settings
from workers.engine import progress

log = logging.getLogger(__name__)

# Process-wide: the snapshot writer records here whether or not a listener runs.
REGISTRY = CollectorRegistry(auto_describe=True)
SNAPSHOT_SECONDS = Histogram(
    "tuft_worker_snapshot_seconds",
    "Time to write and register one recovery snapshot (export written, manifest, rename, row)",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
    registry=REGISTRY,
)
SNAPSHOT_BYTES = Histogram(
    "tuft_worker_snapshot_bytes",
    "Size of each recovery snapshot written (adapter and optimizer state)",
    buckets=tuple(float(2**p) for p in range(20, 38, 2)),  # 1 MiB .. 64 GiB
    registry=REGISTRY,
)

# One series per long task in progress (loading a base model, writing a checkpoint), removed when it
# ends: a series stuck below 1 is a task that is slow or hung (workers/engine/progress.py).
LONG_TASK_PROGRESS = Gauge(
    "tuft_worker_long_task_progress",
    "Fraction done of each long task now running in this worker",
    ["task", "name"],
    registry=REGISTRY,
)


def long_task_progress(task: str, name: str, fraction: float | None) -> None:
    """A workers/engine/progress.py listener: the gauge follows each task until it ends."""
    if fraction is not None:
        LONG_TASK_PROGRESS.labels(task=task, name=name).set(fraction)
        return
    with contextlib.suppress(KeyError):  # ended before its first update reached us
        LONG_TASK_PROGRESS.remove(task, name)


def snapshot_written(seconds: float, size_bytes: int) -> None:
    """Called by workers/snapshots.py after a snapshot is registered."""
    SNAPSHOT_SECONDS.observe(seconds)
    SNAPSHOT_BYTES.observe(size_bytes)


class GpuCollector(Collector):
    """torch.cuda memory statistics of this worker's GPU, read at each scrape."""

    def __init__(self, worker_id: str, device: str) -> None:
        self.worker_id = worker_id
        self.cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()

    def collect(self) -> Iterator[Metric]:
        yield _gauge("tuft_worker_info", "This worker (value 1)", 1.0, self.worker_id, "cuda" if self.cuda else "cpu")
        if not self.cuda:
            return
        index = torch.cuda.current_device()
        stats = torch.cuda.memory_stats(index)
        free, total = torch.cuda.mem_get_info(index)
        values = {
            "tuft_worker_gpu_memory_allocated_bytes": (
                "Tensor memory allocated now",
                stats.get("allocated_bytes.all.current", 0),
            ),
            "tuft_worker_gpu_memory_reserved_bytes": (
                "Memory held by the caching allocator",
                stats.get("reserved_bytes.all.current", 0),
            ),
            "tuft_worker_gpu_memory_peak_allocated_bytes": (
                "Peak tensor memory since start",
                stats.get("allocated_bytes.all.peak", 0),
            ),
            "tuft_worker_gpu_memory_total_bytes": ("The GPU's memory", total),
            "tuft_worker_gpu_memory_free_bytes": ("Free on the GPU (all processes)", free),
            "tuft_worker_gpu_oom_total": ("Out-of-memory errors of the caching allocator", stats.get("num_ooms", 0)),
        }
        for name, (text, value) in values.items():
            yield _gauge(name, text, float(value), self.worker_id, f"cuda:{index}")
        utilisation = _utilisation(index)
        if utilisation is not None:
            yield _gauge(
                "tuft_worker_gpu_utilization_ratio",
                "GPU busy over the last sample period (NVML)",
                utilisation / 100.0,
                self.worker_id,
                f"cuda:{index}",
            )


def _gauge(name: str, text: str, value: float, worker_id: str, device: str) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, text, labels=["worker_id", "device"])
    family.add_metric([worker_id, device], value)
    return family


def _utilisation(index: int) -> float | None:
    # torch.cuda.utilization needs NVML (the nvidia-ml-py package); without it there is no series.
    try:
        return float(torch.cuda.utilization(index))
    except Exception:
        return None


class _Recorded(Collector):
    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def build_registry(worker_id: str, device: str) -> CollectorRegistry:
    """What a worker's /metrics shows: its GPU now and what it recorded since it started."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GpuCollector(worker_id, device))
    registry.register(_Recorded())
    return registry


def serve_metrics(settings: Settings, worker_id: str, device: str, gpu: int | None) -> Any:
    """Start the listener when worker_metrics_port is set; returns the server (None otherwise)."""
    if settings.worker_metrics_port is None:
        return None
    registry = build_registry(worker_id, device)
    progress.add_listener(long_task_progress)
    port = settings.worker_metrics_port + (gpu or 0)
    server, _ = start_http_server(port, addr=settings.worker_metrics_host, registry=registry)
    log.info("worker metrics on http://%s:%d/metrics", settings.worker_metrics_host, port)
    return server
