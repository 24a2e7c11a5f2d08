"""What one uncached /metrics scrape costs against a large ops table (docs/metrics.md "Cost").

Fills a fresh PostgreSQL database (built by Alembic) with N finished ops spread over a few tenants,
kinds and runs, then times each query of app/metrics/queries.py and one full collect of the API's
registry. The database is dropped at the end.

    python bench/metrics_cost.py --ops 1000000
"""

from __future__ import annotations

import argparse
import os
import time
import uuid

from prometheus_client import generate_latest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from app.db import migrate
from app.db.engine import Database
from app.metrics import queries
from app.metrics.collector import build_registry

ADMIN = os.environ.get("TUFT_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def fill(db: Database, n_ops: int) -> None:
    with db.write() as s:
        s.execute(
            text(
                "INSERT INTO sessions (session_id, tenant, tags, user_metadata, created_at, last_heartbeat_at) "
                "SELECT 's' || t, 'tenant-' || t, '[]', '{}', 0, 0 FROM generate_series(0, 3) t"
            )
        )
        s.execute(
            text(
                "INSERT INTO runs (run_id, session_id, tenant, model_seq_id, base_model, lora_config, user_metadata,"
                " status, lease_epoch, next_seq, applied_seq, optimizer_steps, created_at, last_request_at) "
                "SELECT 'r' || r, 's' || (r % 4), 'tenant-' || (r % 4), r, 'model-' || (r % 2), '{}', '{}',"
                " 'active', 0, 0, 0, 0, 0, 0 FROM generate_series(0, 63) r"
            )
        )
        # Finished ops: created, started, finished and (mostly) delivered, 0-2 s per stage.
        s.execute(
            text(
                "INSERT INTO ops (request_id, tenant, run_id, seq, kind, mutates, request_sha256, payload, status,"
                " attempt, error_category, input_tokens, output_tokens, created_at, started_at, finished_at,"
                " delivered_at) "
                "SELECT 'op' || i, 'tenant-' || (i % 4), 'r' || (i % 64), i, "
                " (ARRAY['forward_backward','optim_step','sample','save_weights'])[1 + i % 4], false, '', '',"
                " CASE WHEN i % 50 = 0 THEN 'failed' ELSE 'succeeded' END, 1,"
                " CASE WHEN i % 50 = 0 THEN 'user' END, 100 + i % 900, i % 300,"
                " i * 0.01, i * 0.01 + random() * 2, i * 0.01 + 2 + random() * 2,"
                " CASE WHEN i % 10 = 0 THEN NULL ELSE i * 0.01 + 4 + random() END "
                "FROM generate_series(1, :n) i"
            ),
            {"n": n_ops},
        )
    with db.write() as s:
        s.execute(text("ANALYZE ops"))


def timed(label: str, fn: object) -> None:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    print(f"{label:<22} {time.perf_counter() - start:8.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ops", type=int, default=1_000_000)
    args = parser.parse_args()
    name = f"tuft_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(ADMIN, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = f"{ADMIN.rpartition('/')[0]}/{name}"
    try:
        migrate.upgrade(url)
        db = Database(url, process_name="bench")
        start = time.perf_counter()
        fill(db, args.ops)
        print(f"{args.ops} ops inserted in {time.perf_counter() - start:.1f} s")
        with db.read() as s:
            timed("op_summary", lambda: queries.op_summary(s))
            timed("queue_depth", lambda: queries.queue_depth(s))
            timed("runs_by_status", lambda: queries.runs_by_status(s))
            timed("snapshots", lambda: queries.snapshots(s))
        registry = build_registry(db, lease_ttl=15.0, cache_seconds=0.0)
        for i in range(3):
            timed(f"full scrape #{i + 1}", lambda: generate_latest(registry))
        db.dispose()
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
