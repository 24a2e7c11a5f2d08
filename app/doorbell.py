"""Wake-ups after commit. Best effort by design: a lost ring costs only the worker's poll tick,
because the database decides what runs (reliability-design.md §0.1). The API never imports the
worker code; it publishes the task by name."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from app.localbell import BellSender, bell_dir
from app.queue.submit import Wakeup

log = logging.getLogger(__name__)

WAKE_TASK = "workers.wake"


class Doorbell(Protocol):
    def ring(self, wakeups: list[Wakeup]) -> None: ...
    def close(self) -> None: ...


class NoopDoorbell:
    """Nothing to ring: workers find the work on their poll tick."""

    def ring(self, wakeups: list[Wakeup]) -> None:
        return None

    def close(self) -> None:
        return None


class LocalDoorbell:
    """No broker (embedded mode): a datagram to each worker of this host (app/localbell.py). Workers
    on other hosts keep finding their work on their poll tick."""

    def __init__(self, data_dir: Path) -> None:
        self._sender = BellSender(bell_dir(data_dir))

    def ring(self, wakeups: list[Wakeup]) -> None:
        if wakeups:
            self._sender.ring()

    def close(self) -> None:
        self._sender.close()


class CeleryDoorbell:
    def __init__(self, redis_url: str) -> None:
        from celery import Celery

        self.app = Celery("tuft-doorbell", broker=redis_url)
        self.app.conf.update(
            task_ignore_result=True,
            broker_connection_retry=False,
            broker_connection_timeout=2,
            broker_transport_options={"socket_connect_timeout": 2, "socket_timeout": 2, "max_retries": 0},
        )
        # Publishing happens off the request path: a slow or dead Redis never delays a response.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tuft-doorbell")

    def ring(self, wakeups: list[Wakeup]) -> None:
        for wakeup in {(w.queue, w.run_id) for w in wakeups}:
            self._pool.submit(self._publish, *wakeup)

    def _publish(self, queue: str, run_id: str | None) -> None:
        try:
            self.app.send_task(WAKE_TASK, args=[run_id], queue=queue, retry=False)
        except Exception as exc:
            log.warning("doorbell for %s on %s lost: %s", run_id, queue, exc)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def make_doorbell(redis_url: str | None, data_dir: Path) -> Doorbell:
    return CeleryDoorbell(redis_url) if redis_url else LocalDoorbell(data_dir)
