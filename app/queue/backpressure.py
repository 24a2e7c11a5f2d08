"""Sampling backpressure: refuse new samples while too many are queued or running, sharing the
queue fairly between tenants.

Without it a burst of `sample()` calls piles up as queued rows whose clients time out long before a
worker reaches them. The refusal is a 429 that both SDK versions answer by backing off (1 s, 5 s
for prompts over 128 KiB) and re-submitting the same request (tinker-protocol.md §1.6).

Fair share: a full queue must not lock other tenants out, or one tenant retrying on 429 as fast
as the SDK does keeps every slot that frees up. So while the queue is at `total`, a tenant is
still admitted as long as it holds less than its fair share, max(per_tenant_floor, total /
tenants with samples pending, itself included): a newcomer always gets in, and the tenant that
filled the queue gets nothing more until it is back under its share. The queue can therefore
exceed `total` by the others' shares while a heavy tenant drains (at most about twice `total`).
Service order is fair too (claim.claim_sample), so the newcomer's samples are not stuck behind
the heavy tenant's backlog.

Counts go through the ops (kind, status) index and stop at the limit, so a check costs at most
about `limit` index entries (the tenant count reads the pending samples once). The check and the
insert share the request's unit of work without a lock, so concurrent submissions may overshoot a
limit by the number racing; it is a soft bound.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import distinct, func, select
from sqlalchemy.orm import Session as DbSession

from app.config import Settings
from app.db.models import Op, Sampler

PENDING = ("queued", "running")


@dataclass(frozen=True)
class SampleQueueLimits:
    """Queued + running sample ops at which a new sample is refused; 0 switches a limit off.
    `fair`: a tenant under its fair share of `total` is admitted even when the queue is full."""

    total: int = 0
    per_tenant: int = 0
    fair: bool = True
    per_tenant_floor: int = 8

    @classmethod
    def of(cls, settings: Settings) -> SampleQueueLimits:
        return cls(
            total=settings.max_queued_samples,
            per_tenant=settings.max_queued_samples_per_tenant,
            fair=settings.fair_sample_queue,
            per_tenant_floor=settings.min_queued_samples_per_tenant,
        )


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


def tenants_pending(s: DbSession) -> int:
    """How many tenants have sample ops queued or running."""
    query = select(func.count(distinct(Op.tenant))).where(Op.kind == "sample", Op.status.in_(PENDING))
    return int(s.execute(query).scalar_one())


def fair_share(s: DbSession, limits: SampleQueueLimits, own: int) -> int:
    """The most samples a tenant with `own` pending may have while the queue is full: the total
    split evenly between the tenants with samples pending (itself included), never below the
    floor and never above the total."""
    tenants = tenants_pending(s) + (0 if own else 1)
    return min(limits.total, max(limits.per_tenant_floor, limits.total // max(tenants, 1), 1))


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
    if limits.per_tenant and pending_samples(s, tenant=tenant, up_to=limits.per_tenant) >= limits.per_tenant:
        raise SampleQueueFull(
            f"this tenant already has {limits.per_tenant} samples queued or running (its limit); retry later"
        )
    if not limits.total or pending_samples(s, up_to=limits.total) < limits.total:
        return
    if limits.fair:
        # Counted up to the total: a share is never larger.
        own = pending_samples(s, tenant=tenant, up_to=limits.total)
        share = fair_share(s, limits, own)
        if own < share:
            return
        raise SampleQueueFull(
            f"the sampling queue is full ({limits.total} samples queued or running) and this tenant "
            f"already has {own}, its fair share; retry later"
        )
    raise SampleQueueFull(f"the sampling queue is full ({limits.total} samples queued or running); retry later")
