"""HTML of the dashboard pages, as plain f-strings: every value from the database goes through
escape(). Links are relative (`base` climbs back to the dashboard's root), so the pages work
under whatever path prefix a reverse proxy puts in front of the API."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from html import escape
from urllib.parse import quote

from app.api.routes.rest import SEGMENT
from app.dashboard import charts
from app.dashboard.metrics import RunMetrics
from app.dashboard.queries import OPS_LIMIT, QueueGroup
from app.db.models import Checkpoint, Op, Run, Worker
from app.queue.leases import worker_state

STYLE = """
body{font:14px system-ui,sans-serif;margin:0;color:#222}
header{background:#263238;color:#fff;padding:8px 16px;display:flex;gap:16px;align-items:center}
header a{color:#fff}header form{margin-left:auto}main{padding:8px 16px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 6px;text-align:left}
th{background:#f5f5f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.charts{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0}figcaption{font-weight:600}
svg text{font-size:10px;fill:#555}svg .axis{stroke:#999}polyline{fill:none;stroke:#1565c0;stroke-width:1.5}
circle{fill:#1565c0}.status-active{color:#2e7d32}.status-blocked,.status-failed{color:#c62828}
.muted{color:#777}
"""


def cell(value: object, *, num: bool = False) -> str:
    text = "-" if value is None or value == "" else str(value)
    return f'<td class="num">{escape(text)}</td>' if num else f"<td>{escape(text)}</td>"


def table(cls: str, headers: Sequence[str], rows: Iterable[str]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + " UTC"


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def run_link(base: str, run_id: str) -> str:
    return f'<a href="{base}runs/{quote(run_id, safe="")}">{escape(run_id)}</a>'


def layout(base: str, title: str, who: str, body: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)} · TuFT</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>
<body><header><strong>TuFT</strong><a href="{base}">Runs</a><a href="{base}checkpoints">Checkpoints</a>
<a href="{base}queue">Queue</a><a href="{base}workers">Workers</a>
<form method="post" action="{base}logout"><span class="who">{escape(who)}</span>
<button type="submit">Log out</button></form></header>
<main><h1>{escape(title)}</h1>{body}</main></body></html>"""


def login(base: str, error: str | None = None) -> str:
    message = f'<p class="error" role="alert">{escape(error)}</p>' if error else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Log in · TuFT</title><style>{STYLE}</style></head>
<body><main><h1>TuFT dashboard</h1>{message}
<form method="post" action="{base}login"><label>API key
<input type="password" name="key" autocomplete="current-password" required size="50"></label>
<button type="submit">Log in</button></form>
<p class="muted">The key is kept in an HttpOnly cookie for this dashboard only.</p></main></body></html>"""


def runs_page(base: str, rows: list[Run], now: float, limit: int) -> str:
    headers = ["run", "tenant", "base model", "status", "reason", "optimizer steps", "applied seq"]
    headers += ["owner worker", "created", "idle s"]
    body = (
        f'<tr data-run="{escape(r.run_id)}"><td>{run_link(base, r.run_id)}</td>{cell(r.tenant)}{cell(r.base_model)}'
        f'<td class="status status-{escape(r.status)}">{escape(r.status)}</td>{cell(r.status_reason)}'
        f"{cell(r.optimizer_steps, num=True)}{cell(r.applied_seq, num=True)}{cell(r.owner_worker)}"
        f"{cell(when(r.created_at))}{cell(f'{now - r.last_request_at:.0f}', num=True)}</tr>"
        for r in rows
    )
    note = f'<p class="muted">The {limit} newest runs are shown.</p>' if len(rows) >= limit else ""
    return table("runs", headers, body) + note if rows else "<p>No runs yet.</p>"


def checkpoint_table(base: str, rows: list[Checkpoint]) -> str:
    if not rows:
        return "<p>No checkpoints.</p>"
    headers = ["name", "kind", "run", "tinker path", "bytes", "optimizer", "created", "expires"]
    body = (
        f'<tr data-name="{escape(c.name)}">{cell(c.name)}{cell(c.kind)}<td>{run_link(base, c.run_id)}</td>'
        f"{cell(f'tinker://{c.run_id}/{SEGMENT.get(c.kind, c.kind)}/{c.name}')}{cell(c.size_bytes, num=True)}"
        f"{cell('yes' if c.with_optimizer else 'no')}{cell(when(c.created_at))}{cell(when(c.expires_at))}</tr>"
        for c in rows
    )
    return table("checkpoints", headers, body)


def metric_section(metrics: RunMetrics) -> str:
    if not metrics.rows:
        return "<p>No forward_backward or optim_step results yet.</p>"
    figures = "".join(charts.line_chart(name, points) for name, points in sorted(metrics.series.items()))
    names = sorted({n for r in metrics.rows for n in (r.metrics or {})})
    body = "".join(
        f'<tr data-seq="{r.seq}" data-kind="{escape(r.kind)}">{cell(r.seq, num=True)}{cell(r.step, num=True)}'
        f"{cell(r.kind)}"
        + "".join(f'<td class="num" data-metric="{escape(n)}">{escape(_metric(r.metrics, n))}</td>' for n in names)
        + "</tr>"
        for r in metrics.rows
    )
    missing = (
        f'<p class="muted">{metrics.missing} ops no longer hold their result (retention): not plotted.</p>'
        if metrics.missing
        else ""
    )
    return (
        f'<div class="charts">{figures}</div>{missing}<details><summary>Metrics by op</summary>'
        f"{table('metrics', ['seq', 'step', 'kind', *names], [body])}</details>"
    )


def _metric(values: dict[str, float] | None, name: str) -> str:
    if values is None:
        return "(pruned)"
    return "" if name not in values else f"{values[name]:.6g}"


def _span(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else end - start


def timeline_section(ops: list[Op], now: float, limit: int) -> str:
    if not ops:
        return "<p>No ops.</p>"
    headers = ["seq", "kind", "status", "attempt", "queued", "started", "finished", "waited s", "ran s", "error"]
    body = (
        f'<tr data-seq="{op.seq}">{cell(op.seq, num=True)}{cell(op.kind)}'
        f'<td class="status status-{escape(op.status)}">{escape(op.status)}</td>{cell(op.attempt, num=True)}'
        f"{cell(when(op.created_at))}{cell(when(op.started_at))}{cell(when(op.finished_at))}"
        f"{cell(seconds(_span(op.created_at, op.started_at)), num=True)}"
        f"{cell(seconds(_span(op.started_at, op.finished_at)), num=True)}"
        f"{cell(op.error_message)}</tr>"
        for op in ops
    )
    note = f'<p class="muted">The {limit} newest ops of the run.</p>' if len(ops) >= limit else ""
    return charts.timeline(ops, now) + note + f"<details><summary>Ops</summary>{table('ops', headers, body)}</details>"


def run_page(base: str, run: Run, metrics: RunMetrics, ops: list[Op], ckpts: list[Checkpoint], now: float) -> str:
    facts = [
        ("tenant", run.tenant),
        ("base model", run.base_model),
        ("status", run.status),
        ("reason", run.status_reason),
        ("LoRA rank", run.lora_config.get("rank")),
        ("optimizer steps", run.optimizer_steps),
        ("applied seq / next seq", f"{run.applied_seq} / {run.next_seq}"),
        ("owner worker", run.owner_worker),
        ("last snapshot seq", run.last_snapshot_seq),
        ("created", when(run.created_at)),
        ("last request", when(run.last_request_at)),
    ]
    rows = "".join(f"<tr><th>{escape(k)}</th>{cell(v)}</tr>" for k, v in facts)
    return (
        f'<table class="facts" data-run="{escape(run.run_id)}">{rows}</table>'
        f"<h2>Metrics</h2>{metric_section(metrics)}"
        f"<h2>Op timeline</h2>{timeline_section(ops, now, OPS_LIMIT)}"
        f"<h2>Checkpoints</h2>{checkpoint_table(base, ckpts)}"
    )


def workers_page(base: str, rows: list[Worker], held: dict[str, list[str]], now: float, lease_ttl: float) -> str:
    if not rows:
        return "<p>No worker has registered.</p>"
    headers = ["worker", "host", "device", "queue", "pid", "state", "heartbeat age s", "started", "runs held"]
    body = (
        f'<tr data-worker="{escape(w.worker_id)}">{cell(w.worker_id)}{cell(w.host)}{cell(w.device)}{cell(w.queue)}'
        f"{cell(w.pid, num=True)}{cell(worker_state(w.stopped_at, now - w.heartbeat_at, lease_ttl))}"
        f"{cell(f'{now - w.heartbeat_at:.1f}', num=True)}{cell(when(w.started_at))}"
        f"<td>{', '.join(run_link(base, r) for r in held.get(w.worker_id, [])) or '-'}</td></tr>"
        for w in rows
    )
    # The heartbeat rows hold no GPU figures; each worker exports them on its own /metrics.
    note = (
        '<p class="muted">GPU memory is not in the database: each worker serves it on its own /metrics '
        "(tuft_worker_gpu_memory_* with <code>worker_metrics_port</code> set; docs/dashboard.md).</p>"
    )
    return table("workers", headers, body) + note


def queue_page(groups: list[QueueGroup], capped: bool, now: float, limit: int) -> str:
    if not groups:
        return "<p>No ops are waiting.</p>"
    headers = ["base model", "tenant", "queued", "running", "oldest queued age s", "queued by kind"]
    body = (
        f'<tr data-model="{escape(g.base_model)}" data-tenant="{escape(g.tenant)}">{cell(g.base_model)}'
        f"{cell(g.tenant)}{cell(g.queued, num=True)}{cell(g.running, num=True)}"
        f"{cell(None if g.oldest_queued_at is None else f'{now - g.oldest_queued_at:.1f}', num=True)}"
        f"{cell(', '.join(f'{k} {n}' for k, n in sorted((g.kinds or {}).items())))}</tr>"
        for g in groups
    )
    note = f'<p class="muted">Counted over the {limit} oldest pending ops: more are waiting.</p>' if capped else ""
    return table("queue", headers, body) + note
