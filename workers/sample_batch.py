"""Several queued samples through one batched decode (issue 9; TorchEngine.sample_many).

When the engine batches samples (TorchEngine.batches_samples: CUDA by default), the runner claims up
to SAMPLE_BATCH queued samples in one transaction (app/queue/sample_batch.py, claim_sample's fair
order), decodes the first-time ones together and commits each one by itself, exactly as if it had
run alone: each keeps its own claim, attempt count, outcome and fenced commit. Durability is the
single path's: a worker that dies mid-batch commits none of them, their claims lapse, the sweeper
requeues them, and each is computed again (the same seed gives the same tokens; on a GPU the
logprobs agree within bf16 tolerance, as docs/reliability.md "GPU replay" allows).

A sample claimed before (attempt > 1) may be the one that ends workers, so it runs alone and cannot
raise its neighbours' attempt counts towards the poison limit. OpenAI completions, and every sample
of a batch whose decode raised (out of memory, any engine error), take the single path too, which
frees memory, retries, hands back or fails as it always has.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from app.db.models import Sampler
from app.domain.ops import SampleOp, parse_op
from app.domain.results import result_bytes
from app.queue import claim, sample_batch
from app.queue.commit import Outcome
from workers.faults import fault

if TYPE_CHECKING:
    from workers.runner import Runner

log = logging.getLogger(__name__)

SAMPLE_BATCH = 32  # samples claimed at once; a batch of 32 rows keeps a GPU's decode step busy


def sample_together(runner: Runner) -> bool | None:
    """Claim and run a batch of samples; None when the engine does not batch (the single path)."""
    engine: Any = runner.engine
    batches = getattr(engine, "batches_samples", None)
    if batches is None or not batches():
        return None
    limit = runner.settings.max_op_attempts
    with runner.db.write() as s:
        poisoned = claim.fail_poison_samples(s, limit)
        claimed = sample_batch.claim_samples(
            s, runner.worker_id, runner.settings.lease_ttl_seconds, count=SAMPLE_BATCH, max_attempts=limit
        )
    for poison in poisoned:  # logged once committed: a rolled-back transaction failed nothing
        log.error("ALERT poison sample %s (tenant %s): %s", poison.request_id, poison.tenant, poison.message)
    if not claimed:
        return bool(poisoned)
    outcomes = _decode(runner, [c.sample for c in claimed if c.attempt <= 1])
    for c in claimed:
        request_id = c.sample.request_id
        outcome = outcomes[request_id] if request_id in outcomes else runner._sample_outcome(c.sample)
        runner._settle_sample(c.sample, outcome)
    return True


def _decode(runner: Runner, samples: list[claim.ClaimedSample]) -> dict[str, Outcome]:
    """Outcomes of the plain SampleOps among `samples`, decoded as one batch. A sample whose sampler
    or adapter does not resolve is left out (the single path gives it its error), and so is every
    sample when the decode raised."""
    from workers.engine.decode import SampleRequest  # torch, only on a worker that batches

    batch: list[tuple[str, SampleRequest]] = []
    for sample in samples:
        op = parse_op(sample.payload)
        if not isinstance(op, SampleOp):
            continue  # an OpenAI completion
        try:
            with runner.db.read() as s:
                sampler = s.get(Sampler, sample.sampler_id)
                found = None if sampler is None else (sampler.base_model, sampler.model_path)
            if found is None:
                continue
            adapter = runner._resolve_checkpoint_dir(found[1]) if found[1] else None
        except Exception:
            continue
        batch.append((sample.request_id, SampleRequest(found[0], adapter, op)))
    if not batch:
        return {}
    try:
        fault("before_engine_sample")
        results = runner.engine.sample_many([request for _, request in batch])  # type: ignore[attr-defined]
    except runner.fatal_errors:
        raise  # run_forever ends the worker; the claims go back when it releases
    except Exception as exc:
        log.warning(
            "batched decode of %d samples failed (%s: %s); each runs alone", len(batch), type(exc).__name__, exc
        )
        return {}
    outcomes: dict[str, Outcome] = {}
    for (request_id, _), result in zip(batch, results, strict=True):
        if isinstance(result, BaseException):  # the engine's OpInputError: this request alone is invalid
            outcomes[request_id] = Outcome(error_message=str(result), error_category="user")
        else:
            outcomes[request_id] = Outcome(result=result_bytes(result))
    return outcomes
