"""A sample that ends its worker on every claim is failed after max_op_attempts claims, not handed
out again, and the other tenants' samples are served as before (docs/reliability.md, poison row).

The crashes are real claims that never commit: a worker (a new id each time, as a restarted worker
has) claims the sample with a short claim TTL, the claim expires, the sweeper's requeue puts it
back, exactly as after a worker's death."""

from __future__ import annotations

import time
import uuid

from sqlalchemy import update

from app.db.engine import Database
from app.db.models import Op
from app.domain.ops import SampleOp
from app.queue import claim, futures, submit
from app.queue.claim import PoisonSample

MAX_ATTEMPTS = 3
A, B = "tenant-a", "tenant-b"


def _sampler(db: Database, tenant: str) -> tuple[str, str]:
    with db.write() as s:
        session_id = submit.create_session(s, tenant, sdk_version=None, tags=[], user_metadata={}, display_name=None)
        sampler = submit.create_sampler(
            s, tenant, session_id=session_id, sampling_session_seq_id=0, base_model="m", model_path=None
        )
        return tenant, sampler.sampler_id


def _sample(db: Database, sampler: tuple[str, str], seq: int) -> str:
    with db.write() as s:
        row = submit.get_sampler(s, *sampler)
        return submit.submit_sample(s, row, seq, SampleOp(prompt=(1, 2, seq + 3))).request_id


def _worker() -> str:
    # A fresh id: claim_sample's round-robin memory is per worker id and lives in the module.
    return f"w-{uuid.uuid4().hex[:8]}"


def _crash_on(db: Database, request_id: str, times: int) -> None:
    """`times` workers each claim the sample and die with it: the claim expires, the sweeper requeues it."""
    for _ in range(times):
        with db.write() as s:
            taken = claim.claim_sample(s, _worker(), claim_ttl=0.05)
        assert taken is not None and taken.request_id == request_id
        time.sleep(0.15)
        with db.write() as s:
            assert claim.requeue_expired_samples(s) == 1


def _next(db: Database, worker: str) -> tuple[list[PoisonSample], str | None]:
    """One worker step, as runner._sample_once does it: fail the poison, claim, one transaction."""
    with db.write() as s:
        poisoned = claim.fail_poison_samples(s, MAX_ATTEMPTS)
        claimed = claim.claim_sample(s, worker, claim_ttl=30, max_attempts=MAX_ATTEMPTS)
    return poisoned, None if claimed is None else claimed.request_id


def test_a_sample_that_ended_max_attempts_workers_is_failed_and_the_next_tenant_is_served(db: Database) -> None:
    sampler_a, sampler_b = _sampler(db, A), _sampler(db, B)
    poison = _sample(db, sampler_a, 0)
    b1 = _sample(db, sampler_b, 0)
    _crash_on(db, poison, MAX_ATTEMPTS)  # tenant-a's turn comes first (name order) every time

    worker = _worker()
    poisoned, served = _next(db, worker)
    message = (
        f"this sample was attempted {MAX_ATTEMPTS} times and each attempt ended its worker; it is failed "
        "so that it cannot take down more workers (see docs/reliability.md)"
    )
    assert poisoned == [PoisonSample(poison, A, MAX_ATTEMPTS, message)]
    assert served == b1
    assert _next(db, worker) == ([], None)  # the poison sample is never handed out again

    # What the client's future reads (the API serves this view): a server failure with the reason.
    with db.read() as s:
        view = futures.get_future(s, A, poison)
        row = s.get(Op, poison)
    assert (view.status, view.error_category, view.error_message) == ("failed", "server", message)
    assert row is not None and (row.attempt, row.claimed_by, row.claim_expires_at) == (MAX_ATTEMPTS, None, None)


def test_below_the_limit_a_sample_runs_again_and_the_round_robin_order_is_kept(db: Database) -> None:
    """Failing the poison takes no other sample's turn: with the poison gone, the order between
    tenants is the round-robin one (a's next sample, b's, a's, b's), and a sample that ended
    fewer than max_op_attempts workers is simply claimed again."""
    sampler_a, sampler_b = _sampler(db, A), _sampler(db, B)
    poison = _sample(db, sampler_a, 0)
    a1, a2 = _sample(db, sampler_a, 1), _sample(db, sampler_a, 2)
    b1, b2 = _sample(db, sampler_b, 0), _sample(db, sampler_b, 1)
    _crash_on(db, poison, MAX_ATTEMPTS - 1)

    worker = _worker()
    assert _next(db, worker) == ([], poison)  # two crashes: still below the limit, so it runs again
    with db.write() as s:  # and it ends a third worker: its claim lapses, the sweeper requeues it
        s.execute(update(Op).where(Op.request_id == poison).values(claim_expires_at=0.0))
        assert claim.requeue_expired_samples(s) == 1

    served = []
    other = _worker()
    poisoned, first = _next(db, other)
    assert [p.request_id for p in poisoned] == [poison]
    served.append(first)
    for _ in range(4):
        _, request_id = _next(db, other)
        served.append(request_id)
    assert served == [a1, b1, a2, b2, None]


def test_claim_sample_never_hands_out_a_sample_at_the_limit(db: Database) -> None:
    """Even before anything failed it (the sweeper requeued it after fail_poison_samples looked),
    claim_sample with the limit skips the poison sample and serves the next tenant's."""
    sampler_a, sampler_b = _sampler(db, A), _sampler(db, B)
    poison = _sample(db, sampler_a, 0)
    b1 = _sample(db, sampler_b, 0)
    _crash_on(db, poison, MAX_ATTEMPTS)
    with db.write() as s:
        taken = claim.claim_sample(s, _worker(), claim_ttl=30, max_attempts=MAX_ATTEMPTS)
    assert taken is not None and taken.request_id == b1
    with db.read() as s:
        row = s.get(Op, poison)
    assert row is not None and (row.status, row.attempt) == ("queued", MAX_ATTEMPTS)
