"""Readiness (`GET /readyz`): the server answers what it announces (docs/deployment.md).

`/healthz` is liveness: the process serves and its database answers. Ready means more: every
tokenizer get_info would name can be loaded now (the built-in model's folder is built by the
worker as it starts), and, in the embedded mode, where `tuft launch` runs the only worker, that
worker is registered and heartbeating. Until then get_info answers 503 rather than name a
tokenizer that is not there (app/api/catalog.py), and `tuft launch` does not print "ready".
"""

from __future__ import annotations

from sqlalchemy import func, select, text

from app.api.state import AppState
from app.db.engine import db_now
from app.db.models import Worker


def waiting_for(state: AppState) -> list[str]:
    """What the server still waits for; empty when ready. A database error propagates (503)."""
    pending = state.catalog.tokenizer_pending()
    waiting = [f"the tokenizer of {name} (built by the worker as it starts)" for name in pending]
    with state.db.read() as s:
        s.execute(text("SELECT 1"))
        if state.settings.embedded:
            live = s.execute(
                select(func.count())
                .select_from(Worker)
                .where(
                    Worker.stopped_at.is_(None),
                    Worker.heartbeat_at >= db_now(s) - state.settings.lease_ttl_seconds,
                )
            ).scalar_one()
            if not live:
                waiting.append("a worker (tuft launch starts one)")
    return waiting
