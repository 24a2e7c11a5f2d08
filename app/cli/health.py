"""`tuft worker-health`: a container healthcheck for a worker (compose.yaml, docs/deployment.md).

Healthy means the worker of this host (its newest registration; a container has one worker and its
own hostname) is registered, not stopped, and beat within the lease TTL: past that its leases may
be taken over, so a worker that cannot beat does no useful work even if its process lives on (a
hung GPU call, a lost database connection). Reads one row; exit 0 healthy, 1 not.
"""

from __future__ import annotations

import argparse
import json
import socket
from typing import Any

from sqlalchemy import select

from app.config import Settings
from app.db.engine import Database, db_now
from app.db.models import Worker
from app.queue.leases import worker_state


def add_parser(sub: Any, add_common: Any) -> None:
    p = sub.add_parser("worker-health", help="exit 0 when this host's worker heartbeats within the lease TTL")
    add_common(p)
    p.add_argument("--worker-id", default=None, help="check this worker (default: the newest one of this host)")
    p.add_argument("--host", default=None, help="the worker's host name (default: this one's)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def worker_health(settings: Settings, args: argparse.Namespace) -> int:
    db = Database(settings.resolved_database_url(), process_name="cli")
    try:
        with db.read() as s:
            query = select(Worker).order_by(Worker.started_at.desc()).limit(1)
            if args.worker_id:
                query = query.where(Worker.worker_id == args.worker_id)
            else:
                query = query.where(Worker.host == (args.host or socket.gethostname()))
            worker = s.execute(query).scalar_one_or_none()
            now = db_now(s)
    finally:
        db.dispose()
    if worker is None:
        report: dict[str, Any] = {"healthy": False, "state": "unregistered", "worker_id": args.worker_id}
    else:
        age = now - worker.heartbeat_at
        state = worker_state(worker.stopped_at, age, settings.lease_ttl_seconds)
        report = {
            "healthy": state == "live",
            "state": state,
            "worker_id": worker.worker_id,
            "heartbeat_age": round(age, 1),
        }
    print(json.dumps(report) if args.json else " ".join(f"{k}={v}" for k, v in report.items() if v is not None))
    return 0 if report["healthy"] else 1
