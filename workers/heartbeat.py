"""Lease renewal from its own thread, so a long engine call cannot starve it (reliability-design.md
§2.2, Hatchet #322). Leases found missing were taken over: their engine state is dropped."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from app.db.engine import Database
from app.queue import claim, leases
from workers.faults import fault
from workers.recovery import RunStates

log = logging.getLogger(__name__)


class Heartbeat(threading.Thread):
    def __init__(
        self,
        db: Database,
        worker_id: str,
        *,
        interval: float,
        ttl: float,
        states: RunStates,
        stop: threading.Event,
        on_renewed: Callable[[float], None] | None = None,
    ) -> None:
        super().__init__(name="tuft-heartbeat", daemon=True)
        self.db = db
        self.worker_id = worker_id
        self.interval = interval
        self.ttl = ttl
        self.states = states
        self.stop_event = stop
        self.on_renewed = on_renewed

    def beat(self) -> None:
        started = time.monotonic()
        with self.db.write() as s:
            held = {lease.run_id for lease in leases.heartbeat(s, self.worker_id, self.ttl)}
            claim.renew_sample_claims(s, self.worker_id, self.ttl)
            if held:
                # Inside the transaction, holding the runs' and the worker's row locks: where a
                # paused process used to stall everyone else (issue 7 item 3).
                fault("heartbeat_in_transaction")
        if self.on_renewed is not None:
            self.on_renewed(started)
        lost = self.states.held_runs() - held
        if lost:
            self.states.mark_lost(lost)

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            try:
                self.beat()
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)
