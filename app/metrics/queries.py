"""Read-only aggregates over the durable rows, shared by /metrics, `tuft queue` and whoever else
wants the numbers (the dashboard). Plain dicts and tuples, no Prometheus types.

Every number comes from the database, so every API replica reports the same values and they
survive restarts: op counts and latencies are recomputed from the ops' own timestamps
(created_at, started_at, finished_at, delivered_at), not counted in some process's memory.
The price is a scan of the ops table per call; the collector caches the answer for
metrics_cache_seconds so scrapers cannot multiply it (docs/metrics.md "Cost").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, case, func, literal, select
from sqlalchemy.orm import Session as DbSession

from app.db.engine import db_now
from app.db.models import Op, Run, Sampler, Snapshot, Worker
from app.queue.leases import DEAD_AFTER_TTLS, worker_state

# Seconds. An op waits from milliseconds (an idle worker) to hours (a queue behind a long run), runs
# from ~10 ms (optim_step on the tiny model) to minutes (a big forward_backward or a save), so the
# buckets span 5 ms to 1 h.
LATENCY_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)

# stage -> (from, to): queued = submitted until claimed (the latest claim, after a retry),
# running = claimed until the result committed, delivered = committed until a client read it.
STAGES: dict[str, tuple[Any, Any]] = {
    "queued": (Op.created_at, Op.started_at),
    "running": (Op.started_at, Op.finished_at),
    "delivered": (Op.finished_at, Op.delivered_at),
}

WAITING = ("queued", "running")


@dataclass(frozen=True)
class StageHistogram:
    kind: str
    stage: str
    count: int
    total_seconds: float
    # Cumulative counts, one per LATENCY_BUCKETS bound (the +Inf bucket is `count`).
    buckets: tuple[int, ...]


@dataclass(frozen=True)
class OpSummary:
    """Everything /metrics reports about ops that ran, from one scan of the ops table."""

    histograms: list[StageHistogram]
    finished: list[dict[str, Any]]
    tokens: list[dict[str, Any]]


def op_summary(s: DbSession, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> OpSummary:
    """Stage latencies by kind, finished ops by kind/status/category and tokens by tenant/kind.

    The cost is the scans of the ops table (bench/metrics_cost.py): per stage, each op is put in
    its bucket by one CASE and counted per (kind, bucket), the cumulative counts are summed here;
    cheaper than one SUM(CASE) per bucket, which the database evaluates for every row."""
    histograms: list[StageHistogram] = []
    for stage, (start, end) in STAGES.items():
        # Clamped at 0: the two stamps come from different statements, and a clock step between
        # them must not give a negative latency.
        delta = func.max(end - start, 0) if _sqlite(s) else func.greatest(end - start, 0)
        bucket = case(*((delta <= b, i) for i, b in enumerate(buckets)), else_=len(buckets))
        rows = s.execute(
            select(Op.kind, bucket, func.count(), func.sum(delta))
            .where(start.is_not(None), end.is_not(None))
            .group_by(Op.kind, bucket)
        ).all()
        per_kind: dict[str, list[float]] = {}
        for kind, index, n, total in rows:
            acc = per_kind.setdefault(kind, [0.0] * (len(buckets) + 2))  # per bucket, +Inf, sum
            acc[int(index)] += int(n)
            acc[-1] += float(total or 0.0)
        for kind, acc in sorted(per_kind.items()):
            cumulative = [int(sum(acc[: i + 1])) for i in range(len(buckets))]
            count = int(sum(acc[:-1]))
            histograms.append(StageHistogram(kind, stage, count, acc[-1], tuple(cumulative)))
    rows = s.execute(
        select(
            Op.kind,
            Op.status,
            Op.error_category,
            Op.tenant,
            func.count(),
            func.sum(Op.input_tokens),
            func.sum(Op.output_tokens),
        )
        .where(Op.status.in_(("succeeded", "failed")))
        .group_by(Op.kind, Op.status, Op.error_category, Op.tenant)
    ).all()
    finished: dict[tuple[str, str, str], int] = {}
    token_sums: dict[tuple[str, str], list[int]] = {}
    for kind, status, category, tenant, n, inputs, outputs in rows:
        key = (kind, status, category or "")
        finished[key] = finished.get(key, 0) + int(n)
        if status == "succeeded":
            sums = token_sums.setdefault((tenant, kind), [0, 0])
            sums[0] += int(inputs or 0)
            sums[1] += int(outputs or 0)
    return OpSummary(
        histograms=histograms,
        finished=[{"kind": k, "status": st, "category": c, "ops": n} for (k, st, c), n in sorted(finished.items())],
        tokens=[{"tenant": te, "kind": k, "input": v[0], "output": v[1]} for (te, k), v in sorted(token_sums.items())],
    )


def stage_histograms(s: DbSession, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> list[StageHistogram]:
    """Latency of every op that went through each stage, by op kind."""
    return op_summary(s, buckets).histograms


def _sqlite(s: DbSession) -> bool:
    return s.get_bind().dialect.name == "sqlite"


def _base_model() -> ColumnElement[Any]:
    # A training op's model is its run's, a sample's its sampler's; an op with neither (an
    # OpenAI completion names its model in the payload only) is counted under "".
    return func.coalesce(Run.base_model, Sampler.base_model, literal(""))


def queue_depth(s: DbSession, tenant: str | None = None, base_model: str | None = None) -> list[dict[str, Any]]:
    """Ops not finished yet, per base model, tenant and status (queued or running), with the age of
    the oldest (seconds since it was submitted, by the database clock)."""
    now = db_now(s)
    model = _base_model().label("base_model")
    query = (
        select(model, Op.tenant, Op.status, func.count(), func.min(Op.created_at))
        .select_from(Op)
        .outerjoin(Run, Run.run_id == Op.run_id)
        .outerjoin(Sampler, Sampler.sampler_id == Op.sampler_id)
        .where(Op.status.in_(WAITING))
        .group_by(model, Op.tenant, Op.status)
    )
    if tenant is not None:
        query = query.where(Op.tenant == tenant)
    if base_model is not None:
        query = query.where(_base_model() == base_model)
    rows = [
        {
            "base_model": r[0],
            "tenant": r[1],
            "status": r[2],
            "ops": int(r[3]),
            "oldest_age_seconds": round(max(now - float(r[4]), 0.0), 1),
        }
        for r in s.execute(query).all()
    ]
    return sorted(rows, key=lambda r: (r["base_model"], r["tenant"], r["status"]))


def finished_ops(s: DbSession) -> list[dict[str, Any]]:
    """Ops that reached an end, per kind, status (succeeded or failed) and failure category."""
    return op_summary(s).finished


def tokens(s: DbSession) -> list[dict[str, Any]]:
    """Tokens of succeeded ops per tenant and kind: input (forward_backward/forward data, a
    sample's prompt) and output (sampled), the same columns the usage report reads."""
    return op_summary(s).tokens


def runs_by_status(s: DbSession) -> dict[str, int]:
    return {r[0]: int(r[1]) for r in s.execute(select(Run.status, func.count()).group_by(Run.status)).all()}


def snapshots(s: DbSession) -> dict[str, float]:
    """Registered recovery snapshots now (older ones are deleted as new ones land)."""
    row = s.execute(
        select(
            func.count(),
            func.coalesce(func.sum(Snapshot.size_bytes), 0),
            func.coalesce(func.max(Snapshot.size_bytes), 0),
        )
    ).one()
    return {"count": int(row[0]), "bytes": float(row[1]), "largest_bytes": float(row[2])}


def workers(s: DbSession, lease_ttl: float, include_stopped_for: float | None = None) -> list[dict[str, Any]]:
    """Worker rows with their heartbeat age and state. Stopped workers only while they stopped
    less than `include_stopped_for` seconds ago (default: DEAD_AFTER_TTLS lease TTLs), so months of
    restarts do not pile up as metric series."""
    now = db_now(s)
    keep = lease_ttl * DEAD_AFTER_TTLS if include_stopped_for is None else include_stopped_for
    rows = s.execute(select(Worker).where((Worker.stopped_at.is_(None)) | (Worker.stopped_at >= now - keep))).scalars()
    return [
        {
            "worker_id": w.worker_id,
            "host": w.host,
            "device": w.device,
            "heartbeat_age": max(now - w.heartbeat_at, 0.0),
            "state": worker_state(w.stopped_at, now - w.heartbeat_at, lease_ttl),
        }
        for w in rows
    ]
