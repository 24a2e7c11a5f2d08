"""One poller resolves every waiting retrieve_future (layout-and-style.md §3 item 14).

Waiters register an asyncio future; one query (`IN (...)`) finds the finished ones. It runs when a
push says a result was committed (`kick`: a PostgreSQL NOTIFY naming the op, or a worker's
datagram naming none, app/api/pushes.py), asking only for the ops a push named, and every
`interval` while anyone waits, asking for all of them: the safety net for a lost push, or a result
committed by something that does not push (issue 11; before, the poll tick alone cost a waiting
client ~35 ms per op). A poll is held up to `long_poll_seconds` (25 s by default, below the SDK's
45 s read timeout), then answered try_again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterable

from app.db.engine import Database
from app.queue.futures import FutureView, finished_futures

log = logging.getLogger(__name__)


class FuturePoller:
    def __init__(self, db: Database, interval: float) -> None:
        self.db = db
        self.interval = interval
        self._waiters: dict[str, list[asyncio.Future[FutureView]]] = defaultdict(list)
        self._has_waiters = asyncio.Event()
        self._kicked = asyncio.Event()
        self._pushed: set[str] = set()  # named by pushes since the last query
        self._everything = False  # an unnamed push: ask for every waiter
        self._task: asyncio.Task[None] | None = None
        self.queries = 0  # tests and the bench read it
        self.answered = 0  # queries whose answers were handed out (tests wait on it)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="tuft-future-poller")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def kick(self, request_ids: Iterable[str] | None = None) -> None:
        """A push (on the event loop): these ops, or some unnamed ones, reached a terminal state.
        Only a push for an op someone here waits for costs a query, and that query asks for the
        pushed ops alone: with 1,000 polls waiting, asking for all of them on every push cost a
        1,000-id lookup per result (bench/load_1000.py)."""
        if request_ids is None:
            self._everything = True
            self._kicked.set()
            return
        named = [r for r in request_ids if r in self._waiters]
        if named:
            self._pushed.update(named)
            self._kicked.set()

    def watch(self, request_id: str) -> asyncio.Future[FutureView]:
        """Register a waiter before looking the op up, so a push between the lookup and the wait
        is not missed. Pair with `forget`."""
        fut: asyncio.Future[FutureView] = asyncio.get_running_loop().create_future()
        self._waiters[request_id].append(fut)
        self._has_waiters.set()
        return fut

    def forget(self, request_id: str, fut: asyncio.Future[FutureView]) -> None:
        # An abandoned poll (client gone, timeout) removes itself.
        waiters = self._waiters.get(request_id)
        if waiters is not None:
            if fut in waiters:
                waiters.remove(fut)
            if not waiters:
                del self._waiters[request_id]

    async def wait(self, request_id: str, hold: float) -> FutureView | None:
        fut = self.watch(request_id)
        try:
            return await self.hold(fut, hold)
        finally:
            self.forget(request_id, fut)

    @staticmethod
    async def hold(fut: asyncio.Future[FutureView], hold: float) -> FutureView | None:
        try:
            return await asyncio.wait_for(fut, hold)
        except TimeoutError:
            return None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last_sweep = loop.time()
        while True:
            if not self._waiters:
                self._has_waiters.clear()
                await self._has_waiters.wait()
                last_sweep = loop.time()
            # The safety net runs on its own clock: a steady stream of pushes must not postpone it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kicked.wait(), max(0.0, last_sweep + self.interval - loop.time()))
            self._kicked.clear()
            if self._everything or loop.time() >= last_sweep + self.interval:
                ids = list(self._waiters)
                last_sweep = loop.time()
            else:
                ids = [r for r in self._pushed if r in self._waiters]
            self._everything = False
            self._pushed.clear()
            if not ids:
                continue
            try:
                done = await asyncio.to_thread(self._query, ids)
            except Exception as exc:
                log.warning("future poller query failed: %s", exc)
                done = {}
                await asyncio.sleep(1.0)
            for request_id, view in done.items():
                for fut in self._waiters.pop(request_id, []):
                    if not fut.done():
                        fut.set_result(view)
            self.answered += 1

    def _query(self, ids: list[str]) -> dict[str, FutureView]:
        self.queries += 1
        with self.db.read() as s:
            return finished_futures(s, ids)
