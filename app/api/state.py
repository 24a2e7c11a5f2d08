"""Everything a request handler needs, built once per app in create_app()."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
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
    # (tenant, run_id) -> base model, which never changes for a run: a forward_backward is checked
    # against its model's vocabulary before its transaction without a read of its own (issue 11).
    base_models: dict[tuple[str, str], str] = field(default_factory=dict)

    def base_model_of(self, tenant: str, run_id: str, read: Callable[[], str]) -> str:
        key = (tenant, run_id)
        model = self.base_models.get(key)
        if model is None:
            model = read()  # raises NotFound for another tenant's or an unknown run: not cached
            if len(self.base_models) >= 100_000:
                self.base_models.clear()
            self.base_models[key] = model
        return model

    def submit(self, work: Callable[[DbSession], tuple[T, list[Wakeup]]]) -> T:
        """One unit of work for a submission: commit, then ring (never before: a worker woken
        before the commit could find nothing and go back to sleep)."""
        with self.db.write() as s:
            value, wakeups = work(s)
        if wakeups:
            self.doorbell.ring(wakeups)
        return value
