"""Inline SVG, drawn on the server: a line chart per metric and an op timeline. No JavaScript
and no chart library, so the page works offline and under any strict Content-Security-Policy."""

from __future__ import annotations

from html import escape

from app.db.models import Op

WIDTH, HEIGHT = 520, 180
LEFT, RIGHT, TOP, BOTTOM = 64, 12, 10, 26
STATUS_COLOURS = {"succeeded": "#2e7d32", "failed": "#c62828", "running": "#1565c0", "queued": "#9e9e9e"}


def _num(value: float) -> str:
    return f"{value:.6g}"


def line_chart(name: str, points: list[tuple[int, float]]) -> str:
    """`points` are (step, value); each point is a circle carrying its step and value as data
    attributes and a tooltip, so the numbers can be read back exactly."""
    if not points:
        return ""
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:  # a constant (a fixed learning rate): centre it
        pad = abs(y0) * 0.1 or 1.0
        y0, y1 = y0 - pad, y1 + pad
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * plot_w

    def sy(y: float) -> float:
        return TOP + (1 - (y - y0) / (y1 - y0)) * plot_h

    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    dots = "".join(
        f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" data-step="{x}" data-value="{_num(y)}">'
        f"<title>step {x}: {_num(y)}</title></circle>"
        for x, y in points
    )
    axes = (
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}" class="axis"/>'
        f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{LEFT + plot_w}" y2="{TOP + plot_h}" class="axis"/>'
        f'<text x="{LEFT - 4}" y="{TOP + 8}" text-anchor="end">{_num(y1)}</text>'
        f'<text x="{LEFT - 4}" y="{TOP + plot_h}" text-anchor="end">{_num(y0)}</text>'
        f'<text x="{LEFT}" y="{HEIGHT - 8}">step {x0}</text>'
        f'<text x="{LEFT + plot_w}" y="{HEIGHT - 8}" text-anchor="end">step {max(xs)}</text>'
    )
    return (
        f'<figure class="chart" data-metric="{escape(name)}"><figcaption>{escape(name)}</figcaption>'
        f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" '
        f'aria-label="{escape(name)} over steps">{axes}<polyline points="{line}"/>{dots}</svg></figure>'
    )


TIMELINE_WIDTH, TIMELINE_LEFT = 760, 170


def _op_label(op: Op) -> str:
    return f"{'-' if op.seq is None else op.seq} {op.kind}"


def timeline(ops: list[Op], now: float) -> str:
    """One row per op: a light bar while it waited in the queue (created to started), a dark one
    while it ran (started to finished); an op still pending runs to `now`."""
    if not ops:
        return ""
    t0 = min(op.created_at for op in ops)
    t1 = max(max(op.finished_at or now, op.started_at or 0.0) for op in ops)
    span = max(t1 - t0, 1e-3)
    # Rows shrink as ops add up (at most queries.OPS_LIMIT), labelled while there is room.
    row_h = max(4, min(14, 700 // len(ops)))
    plot_w = TIMELINE_WIDTH - TIMELINE_LEFT - RIGHT
    height = TOP + len(ops) * row_h + BOTTOM

    def sx(t: float) -> float:
        return TIMELINE_LEFT + (t - t0) / span * plot_w

    bars = []
    for i, op in enumerate(ops):
        y = TOP + i * row_h
        colour = STATUS_COLOURS.get(op.status, "#555")
        started = op.started_at if op.started_at is not None else (op.finished_at or now)
        end = op.finished_at if op.finished_at is not None else now
        label = escape(f"{_op_label(op)} {op.status}")
        text = (
            f'<text x="{TIMELINE_LEFT - 4}" y="{y + row_h - 3}" text-anchor="end">{escape(_op_label(op))}</text>'
            if row_h >= 10
            else ""
        )
        bars.append(
            f'<g data-seq="{"" if op.seq is None else op.seq}"><title>{label}</title>{text}'
            f'<rect x="{sx(op.created_at):.1f}" y="{y}" width="{max(sx(started) - sx(op.created_at), 0.5):.1f}" '
            f'height="{row_h - 1}" fill="{colour}" opacity="0.3"/>'
            f'<rect x="{sx(started):.1f}" y="{y}" width="{max(sx(end) - sx(started), 0.5):.1f}" '
            f'height="{row_h - 1}" fill="{colour}"/></g>'
        )
    axis = (
        f'<text x="{TIMELINE_LEFT}" y="{height - 8}">0 s</text>'
        f'<text x="{TIMELINE_LEFT + plot_w}" y="{height - 8}" text-anchor="end">{span:.3g} s</text>'
    )
    return (
        f'<svg class="timeline" viewBox="0 0 {TIMELINE_WIDTH} {height}" width="{TIMELINE_WIDTH}" height="{height}" '
        f'role="img" aria-label="op timeline">{axis}{"".join(bars)}</svg>'
        '<p class="muted">Light: waiting in the queue; dark: running. Green succeeded, red failed, '
        "blue running, grey queued.</p>"
    )
