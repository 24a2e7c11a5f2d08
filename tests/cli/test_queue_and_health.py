"""`tuft queue`, the list filters, `runs list --status` refusing unknown states, workers reported
dead within the lease TTL, and `tuft worker-health` (docs/admin-cli.md), as users run them."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from sqlalchemy import update

from app.db.engine import Database
from app.db.models import Worker
from app.domain.ops import AdamParams, LoraConfig, OptimStepOp
from app.queue import leases, submit

TUFT = [sys.executable, "-m", "app.cli.main"]


def tuft(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TUFT, *args], capture_output=True, text=True, timeout=120)


def _runs(db: Database, tenant: str, base_model: str, n_ops: int) -> str:
    with db.write() as s:
        session_id = submit.create_session(s, tenant, sdk_version=None, tags=[], user_metadata={}, display_name=None)
        run = submit.create_run(
            s,
            tenant,
            session_id=session_id,
            model_seq_id=0,
            base_model=base_model,
            lora=LoraConfig(rank=2),
            user_metadata={},
        )
        for seq in range(1, n_ops + 1):
            submit.submit_run_op(s, run, seq, OptimStepOp(adam=AdamParams(learning_rate=0.001)))
        return run.run_id


def test_queue_and_filters(db: Database, db_url: str, tmp_path: Path) -> None:
    common = ["--data-dir", str(tmp_path), "--database-url", db_url, "--json"]
    a = _runs(db, "acme", "m1", 3)
    b = _runs(db, "beta", "m1", 1)
    c = _runs(db, "acme", "m2", 2)

    rows = json.loads(tuft("queue", *common).stdout)
    assert [(r["base_model"], r["tenant"], r["status"], r["ops"]) for r in rows] == [
        ("m1", "acme", "queued", 3),
        ("m1", "beta", "queued", 1),
        ("m2", "acme", "queued", 2),
    ]
    assert all(r["oldest_age_seconds"] >= 0 for r in rows)
    acme = json.loads(tuft("queue", "--tenant", "acme", *common).stdout)
    assert [(r["base_model"], r["ops"]) for r in acme] == [("m1", 3), ("m2", 2)]
    m1 = json.loads(tuft("queue", "--model", "m1", *common).stdout)
    assert [(r["tenant"], r["ops"]) for r in m1] == [("acme", 3), ("beta", 1)]
    text = tuft("queue", "--data-dir", str(tmp_path), "--database-url", db_url)
    assert text.returncode == 0 and text.stdout.splitlines()[0].split() == [
        "BASE_MODEL",
        "TENANT",
        "STATUS",
        "OPS",
        "OLDEST_AGE_SECONDS",
    ]

    runs = json.loads(tuft("runs", "list", "--tenant", "acme", *common).stdout)
    assert {r["run_id"] for r in runs} == {a, c}
    runs = json.loads(tuft("runs", "list", "--model", "m1", "--status", "active", *common).stdout)
    assert {r["run_id"] for r in runs} == {a, b}
    assert json.loads(tuft("runs", "list", "--status", "paused", *common).stdout) == []

    typo = tuft("runs", "list", "--status", "runing", *common)
    assert typo.returncode == 2 and "invalid choice: 'runing'" in typo.stderr
    assert "active" in typo.stderr and "cancelled" in typo.stderr and "Traceback" not in typo.stderr


def test_workers_dead_within_the_lease_ttl_and_worker_health(db: Database, db_url: str, tmp_path: Path) -> None:
    common = ["--data-dir", str(tmp_path), "--database-url", db_url]
    host = socket.gethostname()
    missing = tuft("worker-health", *common)
    assert missing.returncode == 1 and "state=unregistered" in missing.stdout

    with db.write() as s:
        leases.register_worker(s, worker_id="w-live", host=host, device="cpu", queue="q", pid=1)
        leases.register_worker(s, worker_id="w-other", host="elsewhere", device="cpu", queue="q2", pid=2)
    healthy = tuft("worker-health", *common, "--json")
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert json.loads(healthy.stdout)["worker_id"] == "w-live"

    # 20 s without a heartbeat: past the 15 s lease TTL (the default), well before the sweeper's
    # DEAD_AFTER_TTLS (45 s) would mark it stopped.
    with db.write() as s:
        s.execute(update(Worker).where(Worker.worker_id == "w-live").values(heartbeat_at=Worker.heartbeat_at - 20))
    listed = {w["worker_id"]: w["state"] for w in json.loads(tuft("workers", "list", *common, "--json").stdout)}
    assert listed == {"w-live": "dead", "w-other": "live"}
    stale = tuft("worker-health", *common)
    assert stale.returncode == 1 and "state=dead" in stale.stdout
    assert tuft("worker-health", "--host", "elsewhere", *common).returncode == 0
    assert tuft("worker-health", "--worker-id", "w-live", *common).returncode == 1

    with db.write() as s:
        leases.release_all(s, "w-other")
    stopped = tuft("worker-health", "--worker-id", "w-other", *common)
    assert stopped.returncode == 1 and "state=stopped" in stopped.stdout
