"""The owner's wake-up on PostgreSQL (issue 11): a thread LISTENs on `tuft_work` and sets the
runner's wake event when a committed submission names this worker's queue
(app/queue/notify.py). Before, an owned run's next op reached its worker only through Celery
(Redis, ~10 commands and most of the 15 ms from submit to claim measured in docs/performance.md).
A hint like every ring: Celery still rings, and the poll tick stays the safety net."""

from __future__ import annotations

import logging
import threading

from sqlalchemy.engine import make_url

from app.queue.notify import WORK_CHANNEL

log = logging.getLogger(__name__)


class WorkListener(threading.Thread):
    def __init__(self, url: str, queue: str, wake: threading.Event, stop: threading.Event) -> None:
        super().__init__(name="tuft-pg-listen", daemon=True)
        self.dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        self.queue, self.wake, self.stop_event = queue, wake, stop

    def run(self) -> None:
        import psycopg

        while not self.stop_event.is_set():
            try:
                with psycopg.connect(
                    self.dsn, autocommit=True, application_name="worker-listen", connect_timeout=10
                ) as conn:
                    conn.execute(f"LISTEN {WORK_CHANNEL}")
                    self.wake.set()  # whatever was submitted while we were not listening
                    # The timeout lets the thread see stop; notifications wake it at once.
                    while not self.stop_event.is_set():
                        for note in conn.notifies(timeout=1.0):
                            if note.payload == self.queue:
                                self.wake.set()
            except Exception as exc:
                log.warning("work wake-up (LISTEN %s) lost: %s; polling until it is back", WORK_CHANNEL, exc)
                self.stop_event.wait(1.0)
