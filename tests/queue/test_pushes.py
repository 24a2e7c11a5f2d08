"""The pushes of issue 11 on PostgreSQL: a committed submission to an owned run wakes its owner
(NOTIFY tuft_work with the owner's queue, heard by workers/pglisten.py), and a committed result
notifies the APIs (NOTIFY tuft_done with the request id); a rolled-back one notifies nobody."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from sqlalchemy.engine import make_url

from app.db import migrate
from app.db.engine import Database
from app.domain.ops import AdamParams, OptimStepOp
from app.queue import claim, leases, submit
from app.queue.notify import CHANNEL
from tests.queue.test_queue import TENANT, _commit, _register, _run, _submit
from workers.pglisten import WorkListener

pytestmark = [pytest.mark.postgres]


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def test_owned_runs_op_wakes_its_owner_and_its_result_is_pushed(pg_url: str) -> None:
    migrate.upgrade(pg_url)
    db = Database(pg_url, process_name="test")
    wake, stop = threading.Event(), threading.Event()
    listener = WorkListener(db.url, "q.w1", wake, stop)
    listener.start()
    try:
        with psycopg.connect(_libpq(pg_url), autocommit=True) as api:
            api.execute(f"LISTEN {CHANNEL}")
            _register(db, "w1")
            run_id = _run(db)
            _submit(db, run_id, 1)  # unowned: rung through Celery's shared queue, not NOTIFY
            with db.write() as s:
                leases.acquire_runs(s, "w1", 30.0)
            deadline = time.monotonic() + 10
            while not wake.is_set() and time.monotonic() < deadline:  # the listener's own first wake
                time.sleep(0.05)
            with db.read() as s:
                (ready,) = claim.ready_run_ops(s, "w1")
            _commit(db, "w1", ready)
            done = [n.payload for n in api.notifies(timeout=2.0, stop_after=1)]
            assert done == [ready.request_id]

            wake.clear()
            _submit(db, run_id, 2)  # owned by w1 now
            assert wake.wait(5.0), "the owner was not woken by the committed submission"

            wake.clear()
            op = OptimStepOp(adam=AdamParams(learning_rate=1e-3))
            with pytest.raises(RuntimeError), db.write() as s:
                submit.submit_run_op(s, submit.get_run(s, TENANT, run_id), 3, op)
                raise RuntimeError("rolled back")
            assert not wake.wait(1.0), "a rolled-back submission woke the owner"
    finally:
        stop.set()
        listener.join(timeout=5)
        db.dispose()
