"""The pushes of issue 11 on PostgreSQL: a committed submission to an owned run wakes its owner
(NOTIFY tuft_work with the owner's queue, heard by workers/pglisten.py), and a committed result
notifies the APIs (NOTIFY tuft_done with the request id); a rolled-back one notifies nobody."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from app.api.longpoll import FuturePoller
from app.api.pushes import Pushes
from app.db import migrate
from app.db.engine import Database
from app.db.models import Worker
from app.domain.ops import AdamParams, OptimStepOp
from app.queue import claim, leases, submit
from app.queue.notify import CHANNEL
from tests.conftest import PG_ADMIN_URL
from tests.queue.test_queue import TENANT, _commit, _owned_run, _register, _run, _submit
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


def _submit_as_api(db: Database, run_id: str, seq: int) -> submit.Submitted:
    """A submission the way the API makes it (run_for_submit's context decides the wake-up)."""
    with db.write() as s:
        ctx = submit.run_for_submit(s, TENANT, run_id)
        return submit.submit_run_op(s, ctx.run, seq, OptimStepOp(adam=AdamParams(learning_rate=1e-3)), ctx=ctx)


def _listens(db: Database, worker_id: str) -> bool:
    with db.read() as s:
        return bool(s.execute(select(Worker.listens).where(Worker.worker_id == worker_id)).scalar_one())


def test_a_listening_owner_is_woken_by_the_notify_alone(pg_url: str) -> None:
    # Once the owner has heard its own NOTIFY, the API leaves the Celery message out for its runs'
    # ops (Submitted.wakeup None: nothing to ring); until then, and after it stops, it rings.
    migrate.upgrade(pg_url)
    db = Database(pg_url, process_name="test")
    wake, stop = threading.Event(), threading.Event()
    listener = WorkListener(db.url, "q.w1", wake, stop, db=db, worker_id="w1")
    try:
        run_id = _owned_run(db)
        before = _submit_as_api(db, run_id, 2)
        assert before.wakeup is not None and before.wakeup.queue == "q.w1"
        listener.start()
        assert listener.probed.wait(10) and _listens(db, "w1")
        wake.clear()
        quiet = _submit_as_api(db, run_id, 3)
        assert quiet.wakeup is None
        assert wake.wait(5.0), "the listening owner was not woken by the NOTIFY"
    finally:
        stop.set()
        listener.join(timeout=5)
    try:
        assert not _listens(db, "w1")  # a stopped listener clears its mark
        assert _submit_as_api(db, run_id, 4).wakeup == before.wakeup
    finally:
        db.dispose()


def test_a_listener_that_cannot_hear_keeps_the_celery_ring(pg_url: str) -> None:
    # A listen URL on which the worker's own NOTIFY never arrives (here another database; in a
    # deployment LISTEN through a transaction-mode pooler) fails the round-trip check.
    migrate.upgrade(pg_url)
    db = Database(pg_url, process_name="test")
    wake, stop = threading.Event(), threading.Event()
    listener = WorkListener(PG_ADMIN_URL, "q.w1", wake, stop, db=db, worker_id="w1", probe_seconds=0.5)
    try:
        run_id = _owned_run(db)
        listener.start()
        assert listener.probed.wait(10)
        assert not listener.listens and not _listens(db, "w1")
        sub = _submit_as_api(db, run_id, 2)
        assert sub.wakeup is not None and sub.wakeup.queue == "q.w1"
    finally:
        stop.set()
        listener.join(timeout=5)
        db.dispose()


def _listening(url: str, since: float) -> bool:
    """The API's LISTEN connection is up in the database `url` names (started after `since`)."""
    with psycopg.connect(_libpq(PG_ADMIN_URL), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'api-listen' AND datname = %s "
            "AND query LIKE 'LISTEN%%' AND backend_start >= to_timestamp(%s)",
            (make_url(url).database, since),
        ).fetchone()
    return bool(row and row[0])


def _pushed(db: Database, tmp_path: Path, listen_url: str) -> bool:
    """Whether a committed result wakes a waiting poll through the API's listener on `listen_url`,
    with the poller's own tick out of reach (only a push can resolve the wait in time)."""
    _owned_run(db)
    with db.read() as s:
        (ready,) = claim.ready_run_ops(s, "w1")

    async def main() -> bool:
        poller = FuturePoller(db, interval=600.0)
        poller.start()
        pushes = Pushes(db.url, tmp_path, poller, listen_url=listen_url)
        since = time.time() - 1.0
        await pushes.start()
        try:
            waiter = poller.watch(ready.request_id)
            deadline = time.monotonic() + 10
            while not await asyncio.to_thread(_listening, listen_url, since):
                assert time.monotonic() < deadline, "the listener never connected"
                await asyncio.sleep(0.05)
            # A (re)connected listener kicks the poller once for what it may have missed; let that
            # catch-up query finish first, or on a slow machine it can run after the commit below
            # and answer the wait without any push (CI saw exactly that).
            while poller.answered < 1:
                assert time.monotonic() < deadline, "the listener's catch-up query never ran"
                await asyncio.sleep(0.02)
            await asyncio.to_thread(_commit, db, "w1", ready)
            view = await poller.hold(waiter, 3.0)
            return view is not None and view.status == "succeeded"
        finally:
            await pushes.stop()
            await poller.stop()

    return asyncio.run(main())


def test_pushes_arrive_through_a_separate_listen_url(pg_url: str, tmp_path: Path) -> None:
    # database_listen_url (PgBouncer in transaction mode for the pool, LISTEN direct): the listener
    # connects with it, not with database_url. The same database under another spelling of the URL
    # (postgresql:// for postgresql+psycopg://) delivers the push...
    migrate.upgrade(pg_url)
    db = Database(pg_url, process_name="test")
    try:
        assert _pushed(db, tmp_path, pg_url.replace("postgresql+psycopg://", "postgresql://", 1))
    finally:
        db.dispose()


def test_the_listener_uses_the_listen_url_not_the_main_one(pg_url: str, tmp_path: Path) -> None:
    # ...and a listen URL naming another database (NOTIFY is per database) hears nothing, so the
    # push above came through the listen URL.
    migrate.upgrade(pg_url)
    db = Database(pg_url, process_name="test")
    try:
        assert not _pushed(db, tmp_path, PG_ADMIN_URL)
    finally:
        db.dispose()
