"""Training metrics from the stored op results: forward_backward's (loss:sum and the loss
function's others) and optim_step's (grad_norm, learning_rate...), each placed at the optimizer
step it belongs to."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from app.dashboard.queries import MetricOp

_KEY = b'"metrics":'


def parse_metrics(tail: bytes | None) -> dict[str, float] | None:
    """The metrics dict at the end of a result's JSON, from its tail (queries.metric_ops): the
    result ends with `"metrics":{...}}`. None when the tail holds no complete metrics object
    (a result dropped by retention, or a metrics dict larger than the tail)."""
    if tail is None:
        return None
    at = tail.rfind(_KEY)
    if at < 0 or not tail.endswith(b"}"):
        return None
    try:
        value = json.loads(tail[at + len(_KEY) : -1])
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    return {str(k): float(v) for k, v in value.items() if isinstance(v, int | float) and math.isfinite(v)}


@dataclass
class MetricRow:
    seq: int
    step: int
    kind: str
    metrics: dict[str, float] | None


@dataclass
class RunMetrics:
    rows: list[MetricRow] = field(default_factory=list)
    # metric name -> [(step, value)], in seq order
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    # Ops shown without metrics: their result was dropped by retention (docs/dashboard.md).
    missing: int = 0


def run_metrics(ops: list[MetricOp], optimizer_steps: int) -> RunMetrics:
    """Steps are 0-based, as in a training loop's `for step in range(n)`: the forward_backward
    ops before the first optim_step and that optim_step are step 0. The window may start in the
    middle of a run, so steps are counted back from the run's optimizer_steps (the number of
    optim_step ops applied), newest op first: forward_backward ops after the last optim_step
    belong to the step not yet taken."""
    out = RunMetrics()
    step = optimizer_steps
    placed: list[MetricRow] = []
    for op in reversed(ops):
        if op.kind == "optim_step":
            step -= 1
        placed.append(MetricRow(op.seq, max(step, 0), op.kind, parse_metrics(op.result_tail)))
    out.rows = list(reversed(placed))
    for row in out.rows:
        if row.metrics is None:
            out.missing += 1
            continue
        for name, value in row.metrics.items():
            out.series.setdefault(f"{row.kind} {name}", []).append((row.step, value))
    return out
