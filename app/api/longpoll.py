"""One poller resolves every waiting retrieve_future (layout-and-style.md §3 item 14).

Waiters register an asyncio future; while any exist, one query per tick (`IN (...)` over all of
them) finds the finished ones. A poll is held up to `long_poll_seconds` (25 s by default, below the
SDK's 45 s read timeout), then answered try_again, so thousands of polling clients cost one query
per tick instead of one busy loop each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict

from app.db.engine import Database
from app.queue.futures import FutureView, finished_futures

log = logging.getLogger(__name__)


class FuturePoller:
    def __init__(self, db: Database, interval: float) -> None:
        self.db = db
        self.interval = interval
        self._waiters: dict[str, list[asyncio.Future[FutureView]]] = defaultdict(list)
        self._has_waiters = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="tuft-future-poller")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait(self, request_id: str, hold: float) -> FutureView | None:
        fut: asyncio.Future[FutureView] = asyncio.get_running_loop().create_future()
        self._waiters[request_id].append(fut)
        self._has_waiters.set()
        try:
            return await asyncio.wait_for(fut, hold)
        except TimeoutError:
            return None
        finally:
            # An abandoned poll (client gone, timeout) removes itself.
            waiters = self._waiters.get(request_id)
            if waiters is not None:
                if fut in waiters:
                    waiters.remove(fut)
                if not waiters:
                    del self._waiters[request_id]

    async def _run(self) -> None:
        while True:
            if not self._waiters:
                self._has_waiters.clear()
                await self._has_waiters.wait()
            ids = list(self._waiters)
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
            await asyncio.sleep(self.interval)

    def _query(self, ids: list[str]) -> dict[str, FutureView]:
        with self.db.read() as s:
            return finished_futures(s, ids)
