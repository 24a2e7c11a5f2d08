"""Sampling backpressure: refuse new samples while too many are queued or running.

Without it a burst of `sample()` calls piles up as queued rows whose clients time out long before a
worker reaches them. The refusal is a 429 that both SDK versions answer by backing off (1 s, 5 s
for prompts over 128 KiB) and re-submitting the same request (tinker-protocol.md §1.6).

Counts go through the ops (kind, status) index and stop at the limit, so a check costs at most
`limit` index entries. The check and the insert share the request's unit of work without a lock,
so concurrent submissions may overshoot a limit by the number racing; it is a soft bound.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session as DbSession

from app.db.models import Op, Sampler

PENDING = ("queued", "running")


@dataclass(frozen=True)
class SampleQueueLimits:
    """Queued + running sample ops at which a new sample is refused; 0 switches a limit off."""

    total: int = 0
    per_tenant: int = 0


class SampleQueueFull(Exception):
    """Refused for backpressure: nothing was written, and the same request may be sent again."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def pending_samples(s: DbSession, *, tenant: str | None = None, up_to: int | None = None) -> int:
    """Sample ops queued or running (of `tenant`), counted up to `up_to` at most."""
    rows = select(Op.request_id).where(Op.kind == "sample", Op.status.in_(PENDING))
    if tenant is not None:
        rows = rows.where(Op.tenant == tenant)
    if up_to is not None:
        rows = rows.limit(up_to)
    return int(s.execute(select(func.count()).select_from(rows.subquery())).scalar_one())


def admit_sample(s: DbSession, sampler: Sampler, seq: int, limits: SampleQueueLimits) -> None:
    """Raise SampleQueueFull if a new sample must wait. A request already recorded (a client
    retry after a lost reply) is always admitted: it adds nothing to the queue."""
    if not (limits.total or limits.per_tenant):
        return
    known = s.execute(select(Op.request_id).where(Op.sampler_id == sampler.sampler_id, Op.sampler_seq == seq))
    if known.first() is not None:
        return
    admit_new(s, sampler.tenant, limits)


def admit_new(s: DbSession, tenant: str, limits: SampleQueueLimits) -> None:
    """Raise SampleQueueFull if one more sample-kind op (a sample, or an OpenAI-endpoint
    completion, which has no retry to recognise) would exceed a limit."""
    if limits.total and pending_samples(s, up_to=limits.total) >= limits.total:
        raise SampleQueueFull(f"the sampling queue is full ({limits.total} samples queued or running); retry later")
    if limits.per_tenant and pending_samples(s, tenant=tenant, up_to=limits.per_tenant) >= limits.per_tenant:
        raise SampleQueueFull(
            f"this tenant already has {limits.per_tenant} samples queued or running (its limit); retry later"
        )
