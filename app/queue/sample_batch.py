"""Claiming several queued samples in one transaction, for a worker that decodes them as one batch
(workers/sample_batch.py, issue 9).

Each sample is taken by claim.claim_sample, one after the other inside the caller's transaction, so
the batch is exactly the samples that claim_sample would have handed this worker one at a time:
the per-tenant turns (a sample claimed here is running, and holds its turn for the next pick), the
round-robin between tenants and the max_attempts rule all stay as they are. Every sample keeps its
own claim, attempt count, lease renewal and commit; a batch is only a way of computing them.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session as DbSession

from app.db.models import Op
from app.queue.claim import ClaimedSample, claim_sample


@dataclass(frozen=True)
class BatchClaim:
    sample: ClaimedSample
    # Claims so far, this one included: 1 means no earlier claim ended its worker, so the sample is
    # safe to decode next to others. A retried sample may be the one that kills workers; the
    # runner computes it alone, so that it cannot raise its neighbours' attempt counts.
    attempt: int


def claim_samples(
    s: DbSession, worker_id: str, claim_ttl: float, *, count: int, max_attempts: int | None = None
) -> list[BatchClaim]:
    """Up to `count` queued samples, in claim_sample's fair order."""
    claimed: list[BatchClaim] = []
    while len(claimed) < count:
        sample = claim_sample(s, worker_id, claim_ttl, max_attempts=max_attempts)
        if sample is None:
            break
        attempt = s.execute(select(Op.attempt).where(Op.request_id == sample.request_id)).scalar_one()
        claimed.append(BatchClaim(sample, int(attempt)))
    return claimed
