"""The owner's wake-up on PostgreSQL (issue 11): a thread LISTENs on `tuft_work` and sets the
runner's wake event when a committed submission names this worker's queue
(app/queue/notify.py). Before, an owned run's next op reached its worker only through Celery
(Redis, ~10 commands and most of the 15 ms from submit to claim measured in docs/performance.md).

Once LISTEN is up, the listener proves the round trip: it sends itself a NOTIFY through the main
database URL (the way the API's INSERT sends one, through a pooler if there is one) and waits for
it on the listen connection. Only then does it mark the worker `listens`, and from then on the API
sends no Celery message for this worker's runs: the NOTIFY is their only wake-up, with the poll
tick (`worker_poll_seconds`) as the safety net. A listen connection that cannot hear (e.g. LISTEN
through a transaction-mode PgBouncer without `database_listen_url`) never passes the check, so
such a worker keeps being rung through Celery. A lost connection clears the mark before the
listener reconnects, and every reconnect wakes the runner once for what it may have missed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from app.db.engine import Database
from app.queue import leases
from app.queue.notify import WORK_CHANNEL

log = logging.getLogger(__name__)

PROBE_SECONDS = 5.0


class WorkListener(threading.Thread):
    def __init__(
        self,
        url: str,
        queue: str,
        wake: threading.Event,
        stop: threading.Event,
        db: Database | None = None,
        worker_id: str | None = None,
        probe_seconds: float = PROBE_SECONDS,
    ) -> None:
        # db/worker_id: where to record `listens`; without them the listener only wakes the runner.
        super().__init__(name="tuft-pg-listen", daemon=True)
        self.dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        self.queue, self.wake, self.stop_event = queue, wake, stop
        self.db, self.worker_id, self.probe_seconds = db, worker_id, probe_seconds
        self.listens = False  # tests read it
        self.probed = threading.Event()  # set after each round-trip check (tests wait on it)

    def run(self) -> None:
        import psycopg

        while not self.stop_event.is_set():
            try:
                with psycopg.connect(
                    self.dsn, autocommit=True, application_name="worker-listen", connect_timeout=10
                ) as conn:
                    conn.execute(f"LISTEN {WORK_CHANNEL}")
                    self.wake.set()  # whatever was submitted while we were not listening
                    self._prove(conn)
                    # The timeout lets the thread see stop; notifications wake it at once.
                    while not self.stop_event.is_set():
                        for note in conn.notifies(timeout=1.0):
                            if note.payload == self.queue:
                                self.wake.set()
            except Exception as exc:
                log.warning("work wake-up (LISTEN %s) lost: %s; polling until it is back", WORK_CHANNEL, exc)
                self._mark(False)
                self.stop_event.wait(1.0)
        self._mark(False)

    def _prove(self, conn: Any) -> None:
        """Mark the worker `listens` if a NOTIFY sent through the main URL reaches this connection."""
        if self.db is None or self.worker_id is None:
            return
        token = f"{self.queue} probe {uuid.uuid4().hex}"
        with self.db.write() as s:
            s.execute(select(func.pg_notify(WORK_CHANNEL, token)))
        deadline = time.monotonic() + self.probe_seconds
        heard = False
        while not heard and time.monotonic() < deadline:
            for note in conn.notifies(timeout=max(0.01, deadline - time.monotonic()), stop_after=1):
                heard = heard or note.payload == token
                if note.payload == self.queue:
                    self.wake.set()
        if not heard:
            log.warning(
                "this worker's LISTEN %s connection did not hear its own NOTIFY within %.0f s (a "
                "transaction-mode pooler? set database_listen_url): it is woken through Celery instead",
                WORK_CHANNEL,
                self.probe_seconds,
            )
        self._mark(heard)
        self.probed.set()

    def _mark(self, listens: bool) -> None:
        if self.db is None or self.worker_id is None or listens == self.listens:
            return
        # Best effort: a mark left set after a lost connection costs at most a poll tick per op.
        with contextlib.suppress(Exception), self.db.write() as s:
            leases.set_listens(s, self.worker_id, listens)
            self.listens = listens
