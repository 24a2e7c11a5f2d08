"""Pushes that wake the API's long-polls as soon as a result is committed (issue 11).

- PostgreSQL: one connection per API process LISTENs on `tuft_done`; the statement that makes an
  op terminal queues a NOTIFY with its request_id (app/queue/notify.py), delivered on commit.
  The connection needs a session (LISTEN through a transaction-mode PgBouncer loses its
  notifications): `database_listen_url` points it past such a pooler. It reconnects after an
  error; every reconnect kicks the poller once, for what it may have missed.
- SQLite (`tuft launch`): the API listens on a localhost UDP port named in `<data_dir>/wake/*.api`
  and its host's workers send a datagram after each commit (app/localbell.py, API_SUFFIX).

Both only shorten the wait: the poller's own tick (`future_poll_interval`) is the safety net.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from app.api.longpoll import FuturePoller
from app.localbell import API_SUFFIX, announce, bell_dir
from app.queue.notify import CHANNEL

log = logging.getLogger(__name__)


class PgListener:
    def __init__(self, url: str, poller: FuturePoller) -> None:
        # SQLAlchemy's URL (postgresql+psycopg://) as libpq's.
        self.dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        self.poller = poller
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="tuft-pg-listen")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        import psycopg

        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.dsn, autocommit=True, application_name="api-listen", connect_timeout=10
                ) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.poller.kick()  # anything committed while we were not listening
                    async for note in conn.notifies():
                        self.poller.kick((note.payload,))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("result push (LISTEN %s) lost: %s; polling until it is back", CHANNEL, exc)
            await asyncio.sleep(1.0)


class _Kick(asyncio.DatagramProtocol):
    def __init__(self, poller: FuturePoller) -> None:
        self.poller = poller

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.poller.kick()


class DatagramListener:
    def __init__(self, data_dir: Path, poller: FuturePoller) -> None:
        self.folder = bell_dir(data_dir)
        self.poller = poller
        self.file: Path | None = None
        self._transport: asyncio.DatagramTransport | None = None

    async def start(self) -> None:
        try:
            transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
                lambda: _Kick(self.poller), local_addr=("127.0.0.1", 0)
            )
            self._transport = transport
            port = int(transport.get_extra_info("sockname")[1])
            self.file = self.folder / f"{socket.gethostname()}-{os.getpid()}-{port}{API_SUFFIX}"
            announce(self.file, port)
        except OSError as exc:
            log.warning("no result push from local workers (%s); polling every future_poll_interval", exc)

    async def stop(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.unlink()
        if self._transport is not None:
            self._transport.close()


class Pushes:
    """The push source for this API's database."""

    def __init__(self, url: str, data_dir: Path, poller: FuturePoller, listen_url: str | None = None) -> None:
        # listen_url: `database_listen_url`, a session connection where `url` goes through a pooler.
        self._pg = PgListener(listen_url or url, poller) if url.startswith("postgresql") else None
        self._udp = None if self._pg is not None else DatagramListener(data_dir, poller)

    async def start(self) -> None:
        if self._pg is not None:
            self._pg.start()
        if self._udp is not None:
            await self._udp.start()

    async def stop(self) -> None:
        if self._pg is not None:
            await self._pg.stop()
        if self._udp is not None:
            await self._udp.stop()
