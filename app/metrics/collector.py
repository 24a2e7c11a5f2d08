"""The API's metric families, built at scrape time from app/metrics/queries.py.

A custom collector (prometheus_client's documented way to export numbers that live elsewhere)
instead of Counter/Histogram objects fed by each request: the counts live in the database, so a
restarted or added API replica reports the same totals, and nothing has to be kept in step.
Process-local numbers (lease takeovers done by this process's sweeper) are ordinary Counters in
PROCESS_REGISTRY, exported alongside.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from app.db.engine import Database
from app.metrics import queries

PROCESS_REGISTRY = CollectorRegistry(auto_describe=True)
LEASE_TAKEOVERS = Counter(
    "tuft_lease_takeovers",
    "Expired run leases taken back from a dead or stalled worker by this process's sweeper",
    registry=PROCESS_REGISTRY,
)


def record_sweep(expired_leases: int) -> None:
    """Called by the sweeper thread after each pass (app/sweeper.py)."""
    if expired_leases:
        LEASE_TAKEOVERS.inc(expired_leases)


class DatabaseCollector(Collector):
    """Every family read from the database, cached for `cache_seconds` so that several scrapers
    (or a short scrape interval) cost one round of queries per interval."""

    def __init__(self, db: Database, *, lease_ttl: float, cache_seconds: float) -> None:
        self.db = db
        self.lease_ttl = lease_ttl
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._cached: tuple[float, list[Metric]] | None = None

    def describe(self) -> Iterable[Metric]:
        # No describe at registration: collect() would query the database from the constructor.
        return []

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            if self._cached is None or time.monotonic() - self._cached[0] >= self.cache_seconds:
                self._cached = (time.monotonic(), self._build())
            families = self._cached[1]
        yield from families

    def _build(self) -> list[Metric]:
        with self.db.read() as s:
            ops = queries.op_summary(s)
            depth = queries.queue_depth(s)
            runs = queries.runs_by_status(s)
            snaps = queries.snapshots(s)
            worker_rows = queries.workers(s, self.lease_ttl)
        return [
            *_latency(ops.histograms),
            *_queue(depth),
            *_ops(ops.finished),
            _tokens(ops.tokens),
            _runs(runs),
            *_snapshots(snaps),
            *_workers(worker_rows),
        ]


def _latency(rows: list[queries.StageHistogram]) -> list[Metric]:
    family = HistogramMetricFamily(
        "tuft_op_stage_seconds",
        "Op latency per stage from the durable timestamps: queued (submitted to claimed), "
        "running (claimed to committed), delivered (committed to read by a client)",
        labels=["kind", "stage"],
    )
    for h in rows:
        buckets = [(_le(b), float(n)) for b, n in zip(queries.LATENCY_BUCKETS, h.buckets, strict=True)]
        family.add_metric([h.kind, h.stage], [*buckets, ("+Inf", float(h.count))], h.total_seconds)
    return [family]


def _le(bound: float) -> str:
    return repr(float(bound))


def _queue(rows: list[dict[str, Any]]) -> list[Metric]:
    depth = GaugeMetricFamily(
        "tuft_queue_depth",
        "Ops not finished, per base model, tenant and status",
        labels=["base_model", "tenant", "status"],
    )
    oldest = GaugeMetricFamily(
        "tuft_queue_oldest_age_seconds",
        "Age of the oldest unfinished op, per base model, tenant and status",
        labels=["base_model", "tenant", "status"],
    )
    for r in rows:
        labels = [str(r["base_model"]), str(r["tenant"]), str(r["status"])]
        depth.add_metric(labels, float(r["ops"]))
        oldest.add_metric(labels, float(r["oldest_age_seconds"]))
    return [depth, oldest]


def _ops(rows: list[dict[str, Any]]) -> list[Metric]:
    done = CounterMetricFamily(
        "tuft_ops_finished", "Ops that succeeded or failed, per kind (rate() is ops/s)", labels=["kind", "status"]
    )
    failed = CounterMetricFamily(
        "tuft_op_failures",
        "Failed ops per kind and error category (user, server, unknown)",
        labels=["kind", "category"],
    )
    by_status: dict[tuple[str, str], float] = {}
    for r in rows:
        key = (str(r["kind"]), str(r["status"]))
        by_status[key] = by_status.get(key, 0.0) + float(r["ops"])
        if r["status"] == "failed":
            failed.add_metric([str(r["kind"]), str(r["category"]) or "unknown"], float(r["ops"]))
    for (kind, status), n in sorted(by_status.items()):
        done.add_metric([kind, status], n)
    return [done, failed]


def _tokens(rows: list[dict[str, Any]]) -> Metric:
    family = CounterMetricFamily(
        "tuft_tokens",
        "Tokens of succeeded ops per tenant and kind; direction input = trained or prompt, output = sampled",
        labels=["tenant", "kind", "direction"],
    )
    for r in rows:
        for direction in ("input", "output"):
            if r[direction]:
                family.add_metric([str(r["tenant"]), str(r["kind"]), direction], float(r[direction]))
    return family


def _runs(counts: dict[str, int]) -> Metric:
    family = GaugeMetricFamily("tuft_runs", "Training runs per status", labels=["status"])
    for status, n in sorted(counts.items()):
        family.add_metric([status], float(n))
    return family


def _snapshots(snaps: dict[str, float]) -> list[Metric]:
    return [
        GaugeMetricFamily("tuft_snapshots", "Recovery snapshots registered now", value=snaps["count"]),
        GaugeMetricFamily(
            "tuft_snapshot_bytes", "Bytes of the recovery snapshots registered now", value=snaps["bytes"]
        ),
        GaugeMetricFamily(
            "tuft_snapshot_largest_bytes", "Size of the largest registered snapshot", value=snaps["largest_bytes"]
        ),
    ]


def _workers(rows: list[dict[str, Any]]) -> list[Metric]:
    states = GaugeMetricFamily(
        "tuft_workers", "Worker processes per state (dead: heartbeat older than the lease TTL)", labels=["state"]
    )
    age = GaugeMetricFamily(
        "tuft_worker_heartbeat_age_seconds",
        "Seconds since each worker's last heartbeat",
        labels=["worker_id", "device"],
    )
    counts = {"live": 0, "dead": 0, "stopped": 0}
    for r in rows:
        counts[str(r["state"])] += 1
        if r["state"] != "stopped":
            age.add_metric([str(r["worker_id"]), str(r["device"])], float(r["heartbeat_age"]))
    for state, n in counts.items():
        states.add_metric([state], float(n))
    return [states, age]


class _Process(Collector):
    def collect(self) -> Iterator[Metric]:
        yield from PROCESS_REGISTRY.collect()


def build_registry(db: Database, *, lease_ttl: float, cache_seconds: float) -> CollectorRegistry:
    """One registry per app: the database families plus this process's counters."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(db, lease_ttl=lease_ttl, cache_seconds=cache_seconds))
    registry.register(_Process())
    return registry
