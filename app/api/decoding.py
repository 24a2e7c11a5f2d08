"""Request bodies are decoded off the event loop, a bounded number at once (docs/robustness.md).

Inflating zstd, parsing protobuf or JSON and building ops is CPU work that grows with the body:
on the event loop, one tenant's large or hostile bodies would stall every other request of the
process (health checks, polls, other tenants' submissions). Here each decode runs in a thread:

- at most `decode_threads` decodes run at once per process (the rest wait their turn), which also
  bounds the memory decoding can take to about that many inflated bodies;
- one tenant runs at most half of them, so another tenant always finds a free one;
- one tenant may have `decode_queue_per_tenant` requests in here (decoding, waiting, or still
  uploading their body); the next gets 429 with Retry-After, which the SDK backs off and retries.

Everything here runs on the event loop's thread, so the per-tenant counters need no lock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

import anyio
import anyio.to_thread
from fastapi import Request

T = TypeVar("T")

# Seconds a refused request is told to wait; decodes take milliseconds to a few seconds.
RETRY_AFTER_SECONDS = 1


class DecodeBusy(Exception):
    """The tenant already has its share of requests being decoded: 429 (main.py)."""

    def __init__(self, tenant: str, limit: int) -> None:
        self.message = (
            f"too many requests of tenant {tenant!r} are being decoded at once (limit {limit}); "
            f"retry after {RETRY_AFTER_SECONDS} s"
        )
        super().__init__(self.message)


@dataclass
class _Tenant:
    running: anyio.CapacityLimiter
    inside: int = 0


class DecodeGate:
    """One per API process (created in the app's lifespan, inside the event loop)."""

    def __init__(self, threads: int, queue_per_tenant: int) -> None:
        self.threads = anyio.CapacityLimiter(threads)
        self._running_per_tenant = max(1, threads // 2)
        self._queue_per_tenant = queue_per_tenant
        self._tenants: dict[str, _Tenant] = {}

    def inside(self, tenant: str) -> int:
        entry = self._tenants.get(tenant)
        return 0 if entry is None else entry.inside

    @asynccontextmanager
    async def _slot(self, tenant: str) -> AsyncIterator[_Tenant]:
        entry = self._tenants.get(tenant)
        if entry is None:
            entry = self._tenants[tenant] = _Tenant(anyio.CapacityLimiter(self._running_per_tenant))
        if entry.inside >= self._queue_per_tenant:
            raise DecodeBusy(tenant, self._queue_per_tenant)
        entry.inside += 1
        try:
            yield entry
        finally:
            entry.inside -= 1
            if entry.inside == 0:
                self._tenants.pop(tenant, None)

    async def decode(self, request: Request, tenant: str, decode: Callable[[bytes], T]) -> T:
        """Read the body and run `decode(body)` in a thread. The slot is taken before the body is
        read, so one tenant's uploads in flight are bounded too."""
        async with self._slot(tenant) as entry:
            body = await request.body()
            async with entry.running:
                return await anyio.to_thread.run_sync(decode, body, limiter=self.threads)


def gate_of(request: Request) -> DecodeGate:
    gate: DecodeGate = request.app.state.tuft.decode_gate
    return gate
