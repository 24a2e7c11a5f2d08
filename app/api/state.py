"""Everything a request handler needs, built once per app in create_app()."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy.orm import Session as DbSession

from app.api.catalog import ModelCatalog
from app.api.decoding import DecodeGate
from app.api.longpoll import FuturePoller
from app.auth import KeyResolver
from app.config import Settings
from app.db.engine import Database
from app.doorbell import Doorbell
from app.queue.submit import Wakeup

T = TypeVar("T")


@dataclass
class AppState:
    settings: Settings
    db: Database
    doorbell: Doorbell
    catalog: ModelCatalog
    keys: KeyResolver
    poller: FuturePoller
    decode_gate: DecodeGate  # request bodies are decoded through it (app/api/decoding.py)

    def submit(self, work: Callable[[DbSession], tuple[T, list[Wakeup]]]) -> T:
        """One unit of work for a submission: commit, then ring (never before: a worker woken
        before the commit could find nothing and go back to sleep)."""
        with self.db.write() as s:
            value, wakeups = work(s)
        if wakeups:
            self.doorbell.ring(wakeups)
        return value
