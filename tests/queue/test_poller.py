"""The API's future poller (app/api/longpoll.py): a push that names an op asks for that op alone,
and the safety-net sweep over every waiter keeps its own clock while pushes keep coming."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from app.api.longpoll import FuturePoller
from app.db import migrate
from app.db.engine import Database
from app.queue import claim, leases
from tests.queue.test_queue import _commit, _register, _run, _submit


def test_named_pushes_ask_for_their_ops_and_the_sweep_still_comes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'tuft.db'}"
    migrate.upgrade(url)
    db = Database(url, process_name="test")
    try:
        _register(db, "w1")
        done_id = _submit(db, _run(db), 1)  # committed below, never named by a push
        pending_id = _submit(db, _run(db), 1)  # never finishes
        with db.write() as s:
            leases.acquire_runs(s, "w1", 30.0)
        with db.read() as s:
            ready = next(r for r in claim.ready_run_ops(s, "w1") if r.request_id == done_id)
        _commit(db, "w1", ready)

        async def main() -> tuple[bool, float, int]:
            poller = FuturePoller(db, interval=1.5)
            poller.start()
            done, pending = poller.watch(done_id), poller.watch(pending_id)
            start = time.monotonic()
            try:
                # Pushes naming the other op, every 50 ms: each costs a query for that op alone,
                # so the finished op is not found by them...
                for _ in range(10):
                    poller.kick((pending_id,))
                    await asyncio.sleep(0.05)
                early = done.done()
                # ...and they do not postpone the sweep over every waiter, which finds it.
                while not done.done():
                    poller.kick((pending_id,))
                    await asyncio.sleep(0.05)
                    assert time.monotonic() - start < 5.0, "the safety-net sweep never came"
                return early, time.monotonic() - start, poller.queries
            finally:
                poller.forget(done_id, done)
                poller.forget(pending_id, pending)
                await poller.stop()

        early, waited, queries = asyncio.run(main())
        assert not early
        assert 1.0 <= waited <= 3.0  # the sweep's 1.5 s interval (plus a loaded machine's slack)
        assert queries >= 5  # the named pushes were asked about (kicks close together share one query)
    finally:
        db.dispose()
