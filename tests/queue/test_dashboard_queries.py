"""The dashboard's reads on real databases (SQLite and PostgreSQL): metrics come back from the tail
of a large stored result, steps are counted from the run's optimizer steps, and every read is
scoped to its tenant. The pages themselves are tested in a browser (tests/e2e/test_dashboard.py)."""

from __future__ import annotations

from sqlalchemy import update

from app.dashboard import queries
from app.dashboard.metrics import parse_metrics, run_metrics
from app.db.engine import Database
from app.db.models import Op, Run
from app.domain.ops import AdamParams, Datum, ForwardBackwardOp, LoraConfig, OptimStepOp
from app.domain.results import ForwardBackwardResult, OptimStepResult, result_bytes
from app.domain.tensors import Array
from app.queue import submit

# A result far larger than the tail the dashboard reads: 50,000 logprobs.
LOGPROBS = Array.from_list([-0.5] * 50_000, "float32")


def _datum() -> Datum:
    return Datum(tokens=(1, 2, 3), loss_fn_inputs={"target_tokens": Array.from_list([2, 3, 4], "int64")})


def _fb() -> ForwardBackwardOp:
    return ForwardBackwardOp(data=(_datum(),), loss_fn="cross_entropy")


def _run(db: Database, tenant: str, steps: int) -> str:
    """A run whose ops ran: `steps` pairs of forward_backward (loss 10 - step) and optim_step
    (grad_norm step / 10), committed as a worker does (result, status, applied_seq, steps)."""
    with db.write() as s:
        session_id = submit.create_session(s, tenant, sdk_version=None, tags=[], user_metadata={}, display_name=None)
        run = submit.create_run(
            s, tenant, session_id=session_id, model_seq_id=0, base_model="m", lora=LoraConfig(rank=2), user_metadata={}
        )
        results: dict[str, bytes] = {}
        for step in range(steps):
            fb = submit.submit_run_op(s, run, 2 * step + 1, _fb())
            results[fb.request_id] = result_bytes(
                ForwardBackwardResult(outputs=({"logprobs": LOGPROBS},), metrics={"loss:sum": 10.0 - step})
            )
            opt = submit.submit_run_op(s, run, 2 * step + 2, OptimStepOp(adam=AdamParams(learning_rate=0.01)))
            results[opt.request_id] = result_bytes(
                OptimStepResult(metrics={"grad_norm": step / 10, "learning_rate": 0.01})
            )
        run_id = run.run_id
    with db.write() as s:
        for request_id, result in results.items():
            s.execute(update(Op).where(Op.request_id == request_id).values(status="succeeded", result=result))
        s.execute(update(Run).where(Run.run_id == run_id).values(optimizer_steps=steps, applied_seq=2 * steps))
    return run_id


def test_metrics_from_the_result_tail(db: Database) -> None:
    run_id = _run(db, "a", steps=3)
    with db.read() as s:
        ops = queries.metric_ops(s, run_id)
        run = queries.run(s, "a", run_id)
    assert run is not None
    assert [op.kind for op in ops] == ["forward_backward", "optim_step"] * 3
    assert all(op.result_tail is not None and len(op.result_tail) <= queries.RESULT_TAIL_BYTES for op in ops)
    metrics = run_metrics(ops, run.optimizer_steps)
    assert metrics.series["forward_backward loss:sum"] == [(0, 10.0), (1, 9.0), (2, 8.0)]
    assert metrics.series["optim_step grad_norm"] == [(0, 0.0), (1, 0.1), (2, 0.2)]
    assert metrics.missing == 0


def test_steps_count_back_from_the_run(db: Database) -> None:
    """A forward_backward after the last optim_step feeds the step not taken yet; a result that
    retention dropped is counted, not plotted."""
    run_id = _run(db, "a", steps=2)
    with db.write() as s:
        run = s.get(Run, run_id)
        assert run is not None
        extra = submit.submit_run_op(s, run, 5, _fb())
        s.execute(update(Op).where(Op.request_id == extra.request_id).values(status="succeeded", result=None))
    with db.read() as s:
        metrics = run_metrics(queries.metric_ops(s, run_id), 2)
    assert [(r.seq, r.step) for r in metrics.rows] == [(1, 0), (2, 0), (3, 1), (4, 1), (5, 2)]
    assert metrics.missing == 1 and metrics.rows[-1].metrics is None


def test_reads_are_scoped_to_the_tenant(db: Database) -> None:
    run_a = _run(db, "a", steps=1)
    run_b = _run(db, "b", steps=1)
    with db.write() as s:
        run = s.get(Run, run_b)
        assert run is not None
        submit.submit_run_op(s, run, 3, OptimStepOp(adam=AdamParams(learning_rate=0.01)))  # waits in the queue
    with db.read() as s:
        assert [r.run_id for r in queries.runs(s, "a")] == [run_a]
        assert {r.run_id for r in queries.runs(s, None)} == {run_a, run_b}
        assert queries.run(s, "a", run_b) is None and queries.run(s, None, run_b) is not None
        groups, capped = queries.queue(s, "a")
        assert groups == [] and not capped
        groups, _ = queries.queue(s, None)
    assert [(g.base_model, g.tenant, g.queued, g.kinds) for g in groups] == [("m", "b", 1, {"optim_step": 1})]


def test_parse_metrics_refuses_what_it_cannot_read() -> None:
    assert parse_metrics(None) is None
    assert parse_metrics(b'5]}],"metrics":{"loss:sum":1.5,"x":NaN}}') == {"loss:sum": 1.5}
    assert parse_metrics(b'"metrics":{"loss:sum":1.5') is None  # cut: the dict outgrew the tail
    assert parse_metrics(b"no metrics here}") is None
