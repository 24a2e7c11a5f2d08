"""Ready forward_backward ops of several runs through one engine pass (issue 8 item 4).

The runner finds the next op of every run it owns at once (claim.ready_run_ops). When the engine
shares passes between runs (TorchEngine.batches_runs: CUDA), the forward_backward ops among them
are claimed one by one as usual, computed together by `forward_backward_many`, and committed one
by one under the fence exactly as if each had run alone: each op keeps its own claim, attempt
count, outcome and fenced commit, so a lost lease rejects only that run's commit, and a replay
after a crash recomputes each op by itself (within bf16 tolerance of the batched result, which
docs/reliability.md "GPU replay" allows for).

Only runs whose state is already loaded are batched; the rest go the single way, which also
makes room and rebuilds. If the pass raises (out of memory, any engine error), the engine has
rolled every gradient back, and each claimed op is computed alone instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import DBAPIError

from app.domain.ops import ForwardBackwardOp, parse_op
from app.domain.results import result_bytes
from app.queue import claim
from app.queue.claim import ReadyOp
from app.queue.commit import Outcome
from workers.faults import fault
from workers.transient import is_transient

if TYPE_CHECKING:
    from workers.runner import Runner

log = logging.getLogger(__name__)


def run_together(runner: Runner, ready: list[ReadyOp]) -> list[ReadyOp]:
    """Run the batchable forward_backward ops of `ready` in one pass; return the ops left to run."""
    engine: Any = runner.engine
    batches = getattr(engine, "batches_runs", None)
    if batches is None or not batches():
        return ready
    candidates = [
        op
        for op in ready
        if op.kind == "forward_backward"
        and op.status != "failed"
        and op.attempt < runner.settings.max_op_attempts
        and op.run_id not in runner.residency.released
        and engine.has_run(op.run_id)
    ]
    if len(candidates) < 2 or not runner._lease_is_fresh():
        return ready
    claimed: list[tuple[ReadyOp, ForwardBackwardOp]] = []
    for op in candidates:
        try:
            if not runner.states.ensure(op.run_id, op.epoch, op.seq - 1):
                continue
        except Exception as exc:
            if isinstance(exc, DBAPIError) or is_transient(exc) or isinstance(exc, runner.fatal_errors):
                raise
            continue  # left to the single path, which frees memory, retries or blocks the run
        with runner.db.write_relaxed() as s:
            if not claim.claim_run_op(s, runner.worker_id, op):
                continue
            fault("claim_in_transaction")
        domain_op = parse_op(op.payload)
        assert isinstance(domain_op, ForwardBackwardOp)
        claimed.append((op, domain_op))
    done = {op.request_id for op, _ in claimed}
    rest = [op for op in ready if op.request_id not in done]
    if not claimed:
        return rest
    outcomes = _compute(runner, claimed)
    for (op, domain_op), computed in zip(claimed, outcomes, strict=True):
        runner._finish_claimed(op, domain_op, computed)
    return rest


def _compute(
    runner: Runner, claimed: list[tuple[ReadyOp, ForwardBackwardOp]]
) -> list[tuple[Outcome, Callable[[Any], None] | None] | None]:
    """Each op's outcome from one pass; all None (each computed alone) if the pass fails."""
    for op, _ in claimed:
        fault(f"before_engine_{op.kind}")
    try:
        results = runner.engine.forward_backward_many([(op.run_id, domain_op) for op, domain_op in claimed])  # type: ignore[attr-defined]
    except runner.fatal_errors:
        raise
    except Exception as exc:
        log.warning("a pass of %d runs' forward_backward failed (%s); running each alone", len(claimed), exc)
        return [None] * len(claimed)
    outcomes: list[tuple[Outcome, Callable[[Any], None] | None] | None] = []
    for (op, _), result in zip(claimed, results, strict=True):
        fault(f"after_engine_{op.kind}")
        if isinstance(result, runner.user_errors):
            log.info("op %s (%s seq %d) failed on user input: %s", op.request_id, op.run_id, op.seq, result)
            outcomes.append((Outcome(error_message=str(result), error_category="user"), None))
        else:
            split = runner.engine.micro_batch_tokens(op.run_id)
            outcomes.append((Outcome(result=result_bytes(result), micro_batch_tokens=split), None))
    runner.ops_batched += len(claimed)
    log.debug("one pass served %d runs' forward_backward", len(claimed))
    return outcomes
