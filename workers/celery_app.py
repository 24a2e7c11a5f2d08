"""Celery in the doorbell role only (reliability-design.md §1.8): the one task, `workers.wake`,
sets the runner's wake event and returns. It carries no payload that matters; duplicates, losses
and reorderings are all harmless because the runner reads its work from the database."""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery

_wake_event: threading.Event | None = None


def make_celery(redis_url: str, wake_event: threading.Event) -> Celery:
    global _wake_event
    _wake_event = wake_event
    # Celery logs "received" and "succeeded" at INFO for every task: two lines per doorbell ring,
    # i.e. per op, which at hundreds of ops/s buries everything else in the worker's log.
    for name in ("celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    app = Celery("tuft-worker", broker=redis_url)
    app.conf.update(
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_transport_options={
            "visibility_timeout": 1800,
            "socket_timeout": 30,
            "socket_connect_timeout": 5,
            "health_check_interval": 10,
            "retry_on_timeout": True,
        },
    )

    @app.task(name="workers.wake", ignore_result=True)
    def wake(run_id: Any = None) -> None:
        if _wake_event is not None:
            _wake_event.set()

    return app
