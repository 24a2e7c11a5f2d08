"""Upgrading a POPULATED database built by each published form of revision 0001 (issue 7 item 12).

0001 shipped in three texts (first release 1a22913, then dc58f48, then bc23a50 = today's file); a
database stamped "0001" may have any of their schemas. Each test builds one with the old text (kept
verbatim from git history in published_0001/), fills it with representative rows, runs `tuft db
upgrade`'s code, and checks the schema equals the models, the rows are intact, the widened columns
take 64-bit values, and the API serves the old rows and takes new work. SQLite and PostgreSQL.
Also: a process refuses a schema it does not know, and `tuft db upgrade` says so without a traceback.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import text

from app.db import migrate
from app.db.engine import Database
from app.domain.results import OptimStepResult, result_bytes
from tests.api.helpers import make_settings, running_app

PUBLISHED = Path(__file__).parent / "published_0001"
FORMS = {
    "first_release": PUBLISHED / "first_release_1a22913.py.txt",
    "second_release": PUBLISHED / "second_release_dc58f48.py.txt",
    "current_0001": migrate.MIGRATIONS_DIR / "versions" / "2026_11_26_0001_initial_schema.py",
}
REPO = Path(__file__).resolve().parents[2]
RESULT = result_bytes(OptimStepResult(metrics={"optimizer_step": 1.0}))
PAYLOAD = b'{"kind":"optim_step","adam_params":{"learning_rate":0.01}}'


def build_published(url: str, form: Path, tmp: Path) -> None:
    """Migrate an empty database with one old text of 0001 alone (as that release did)."""
    scripts = tmp / "old_migrations"
    (scripts / "versions").mkdir(parents=True)
    for name in ("env.py", "script.py.mako"):
        shutil.copy(migrate.MIGRATIONS_DIR / name, scripts / name)
    shutil.copy(form, scripts / "versions" / "2026_11_26_0001_initial_schema.py")
    cfg = migrate.alembic_config(url)
    cfg.set_main_option("script_location", str(scripts))
    command.upgrade(cfg, "0001")


def populate(db: Database) -> None:
    """One of everything, with the columns every published form has."""
    rows = [
        "INSERT INTO api_keys (key_hash, key_prefix, name, tenant, created_at) "
        "VALUES ('" + "ab" * 32 + "', 'tml-abcd', 'ops', 'default', 1.0)",
        "INSERT INTO sessions (session_id, tenant, sdk_version, tags, user_metadata, created_at, last_heartbeat_at) "
        "VALUES ('sess-old', 'default', '0.38.0', '[\"legacy\"]', '{\"team\": \"a\"}', 1.0, 2.0)",
        "INSERT INTO workers (worker_id, host, device, queue, pid, started_at, heartbeat_at, stopped_at) "
        "VALUES ('w-old', 'h', 'cpu', 'gpu.h.0', 42, 1.0, 2.0, 3.0)",
        "INSERT INTO runs (run_id, session_id, tenant, model_seq_id, base_model, lora_config, user_metadata, status, "
        "lease_epoch, next_seq, applied_seq, optimizer_steps, last_snapshot_seq, created_at, last_request_at) "
        "VALUES ('run-old', 'sess-old', 'default', 0, 'tuft/tiny-qwen3', '{\"rank\": 4}', '{}', 'active', "
        "3, 3, 2, 1, 2, 1.0, 2.0)",
        "INSERT INTO samplers (sampler_id, session_id, tenant, base_model, model_path, created_at) "
        "VALUES ('samp-old', 'sess-old', 'default', 'tuft/tiny-qwen3', NULL, 1.0)",
        "INSERT INTO checkpoints (tenant, run_id, kind, name, storage_path, base_model, lora_config, with_optimizer, "
        "ephemeral, size_bytes, public, created_by_op, created_at) VALUES ('default', 'run-old', 'training', 'c1', "
        "'run-old/training/c1/r1', 'tuft/tiny-qwen3', '{\"rank\": 4}', true, false, 123456, false, 'req-2', 1.0)",
        "INSERT INTO snapshots (run_id, applied_seq, epoch, storage_path, optimizer_steps, size_bytes, "
        "manifest_sha256, created_at) VALUES ('run-old', 2, 3, 'run-old/2', 1, 999, '" + "cd" * 32 + "', 1.0)",
    ]
    op = (
        "INSERT INTO ops (request_id, tenant, run_id, seq, sampler_id, sampler_seq, kind, mutates, request_sha256, "
        "payload, status, attempt, result, created_at, finished_at) VALUES (:rid, 'default', :run, :seq, :sampler, "
        ":sseq, :kind, :mutates, :sha, :payload, 'succeeded', 1, :result, 1.0, 2.0)"
    )
    with db.write() as s:
        for sql in rows:
            s.execute(text(sql))
        for rid, run, seq, sampler, sseq, kind, mutates in (
            ("req-1", "run-old", 1, None, None, "optim_step", True),
            ("req-2", "run-old", 2, None, None, "save_weights", False),
            ("req-s", None, None, "samp-old", 1, "sample", False),
        ):
            s.execute(
                text(op),
                {
                    "rid": rid,
                    "run": run,
                    "seq": seq,
                    "sampler": sampler,
                    "sseq": sseq,
                    "kind": kind,
                    "mutates": mutates,
                    "sha": "ef" * 32,
                    "payload": PAYLOAD,
                    "result": RESULT,
                },
            )


@pytest.mark.parametrize("form", list(FORMS))
def test_upgrade_a_populated_database_from_each_published_0001(db_url: str, tmp_path: Path, form: str) -> None:
    build_published(db_url, FORMS[form], tmp_path)
    db = Database(db_url, process_name="test")
    try:
        populate(db)
        assert migrate.schema_status(db_url) == "behind"
        migrate.safe_upgrade(db_url)
        assert migrate.schema_status(db_url) == "current"
        migrate.check(db_url)  # the upgraded schema is exactly what the models say
        migrate.safe_upgrade(db_url)  # and upgrading again is a no-op

        with db.read() as s:
            run = s.execute(text("SELECT next_seq, applied_seq, lease_epoch, status, status_reason FROM runs")).one()
            assert tuple(run) == (3, 2, 3, "active", None)
            ops = s.execute(
                text(
                    "SELECT request_id, seq, payload, result, delivered_at, payload_pruned_at "
                    "FROM ops ORDER BY request_id"
                )
            ).all()
            assert [(o[0], o[1]) for o in ops] == [("req-1", 1), ("req-2", 2), ("req-s", None)]
            assert all(bytes(o[2]) == PAYLOAD and bytes(o[3]) == RESULT and o[4] is None and o[5] is None for o in ops)
            assert s.execute(text("SELECT size_bytes FROM checkpoints")).scalar_one() == 123456
            assert s.execute(text("SELECT tags FROM sessions")).scalar_one() in (["legacy"], '["legacy"]')
            assert s.execute(text("SELECT count(*) FROM singletons")).scalar_one() == 0
        with db.write() as s:
            # The columns the first release made 32-bit take 64-bit values now.
            s.execute(text("UPDATE ops SET sampler_seq = :big WHERE request_id = 'req-s'"), {"big": 2**40})
            s.execute(text("UPDATE checkpoints SET size_bytes = :big"), {"big": 2**40})
    finally:
        db.dispose()

    # The server works on it: serves the old rows and takes new work.
    settings = make_settings(tmp_path / "data", db_url)
    with running_app(settings) as api:
        shown = api.get("/api/v1/training_runs/run-old")
        assert shown.status_code == 200, shown.text
        assert shown.json()["training_run_id"] == "run-old"
        future = api.post("/api/v1/retrieve_future", {"request_id": "req-1"})
        assert future.status_code == 200, future.text
        assert future.json()["metrics"] == {"optimizer_step": 1.0}
        listed = api.get("/api/v1/training_runs/run-old/checkpoints")
        assert listed.status_code == 200 and [c["checkpoint_id"] for c in listed.json()["checkpoints"]], listed.text
        new_model = api.model()
        assert new_model != "run-old"


def _tuft(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli.main", *args], capture_output=True, text=True, cwd=REPO, timeout=120
    )


def test_a_newer_schema_is_refused_with_a_clear_message(db_url: str, tmp_path: Path) -> None:
    """A database a newer release migrated (revision 9999): `tuft db upgrade`, `tuft api`, a
    worker and the admin commands all exit 2 with one clear line, no traceback, and change nothing."""
    migrate.upgrade(db_url)
    db = Database(db_url, process_name="test")
    try:
        with db.write() as s:
            s.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    finally:
        db.dispose()
    assert migrate.schema_status(db_url) == "newer"
    common = ["--database-url", db_url, "--data-dir", str(tmp_path / "data")]
    for args in (
        ["db", "upgrade", *common],
        ["api", *common, "--port", "1"],
        ["worker", *common, "--device", "cpu"],
        ["runs", "list", *common],
        ["keys", "list", *common],
    ):
        out = _tuft(*args)
        assert out.returncode == 2, (args, out.returncode, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr, out.stderr
        assert "revision 9999, which this release does not know" in out.stderr, out.stderr
    db = Database(db_url, process_name="test")
    try:
        with db.read() as s:
            assert s.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == "9999"
    finally:
        db.dispose()


def test_an_api_refuses_an_older_schema(db_url: str, tmp_path: Path) -> None:
    migrate.upgrade(db_url, "0002")
    out = _tuft("api", "--database-url", db_url, "--data-dir", str(tmp_path / "data"), "--port", "1")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "run `tuft db upgrade` first" in out.stderr, out.stderr
