"""The worker gives ready forward_backward ops of several runs one engine pass (issue 8 item 4)
and commits each as its own op: same statuses, results and training state as one run at a time
(within float rounding), a user error fails only its own op, and a worker that rebuilds a run
alone afterwards replays it to the same state (within the same rounding).

Batching is on by default on CUDA only; here it is forced on the CPU (EngineConfig.batch_runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.db import migrate
from app.db.engine import Database
from app.db.models import Run
from app.domain.ops import AdamParams, Datum, ForwardBackwardOp, OptimStepOp
from app.domain.results import ForwardBackwardResult, parse_result
from app.domain.tensors import Array
from tests.workers.conftest import make_settings
from tests.workers.test_recovery import new_run, submit_all
from tests.workers.test_resilience import make_runner, wait_terminal
from workers.engine import EngineConfig, TorchEngine

RUNS = 3


def _datum(n: int, offset: int) -> Datum:
    tokens = [(offset * 37 + i * 11) % 700 + 1 for i in range(n + 1)]
    return Datum(tokens=tuple(tokens[:-1]), loss_fn_inputs={"target_tokens": Array.from_list(tokens[1:], "int64")})


def _overflowing(n: int) -> Datum:
    # exp(logprob - sampler logprob) overflows: the loss is not finite, a user error.
    d = _datum(n, 5)
    inputs = dict(d.loss_fn_inputs)
    inputs["logprobs"] = Array.from_list([-1e4] * n, "float32")
    inputs["advantages"] = Array.from_list([1.0] * n, "float32")
    return Datum(tokens=d.tokens, loss_fn_inputs=inputs)


def _ops(run: int) -> list[object]:
    ops: list[object] = []
    for step in range(2):
        data = tuple(_datum(5 + 3 * run + i, run * 100 + step * 10 + i) for i in range(2))
        ops.append(ForwardBackwardOp(data=data, loss_fn="cross_entropy"))
        ops.append(OptimStepOp(adam=AdamParams(learning_rate=2e-2)))
    return ops


def _serve(tmp_path: Path, db_url: str, cache: Path, batch_runs: str) -> tuple[list[list[object]], dict[str, object]]:
    migrate.upgrade(db_url)
    db = Database(db_url)
    settings = make_settings(tmp_path, db_url, snapshot_every_ops=0)
    engine = TorchEngine(settings.models(), cache_dir=cache, config=EngineConfig(batch_runs=batch_runs))
    runner = make_runner(settings, db, engine, f"w-{batch_runs}")
    try:
        runs = [new_run(db) for _ in range(RUNS)]
        # The last run's first op is bad (a user error found only by the pass itself), and every
        # run's first op is ready at once: they share the first pass.
        bad = ForwardBackwardOp(data=(_overflowing(6),), loss_fn="importance_sampling")
        ids = {run: submit_all(db, run, ([bad] if k == RUNS - 1 else []) + _ops(k)) for k, run in enumerate(runs)}
        rows = {run: wait_terminal(runner, db, request_ids) for run, request_ids in ids.items()}
        statuses = [[r.status for r in rows[run]] for run in runs]
        results: list[list[object]] = [
            [parse_result(r.result) if r.result is not None else r.error_message for r in rows[run]] for run in runs
        ]
        states = {f"{k}": engine.adapter_state(run) for k, run in enumerate(runs)}
        info = {"statuses": statuses, "states": states, "batched": runner.ops_batched, "runs": runs}
        info["rebuild"] = _rebuild(settings, db, cache, runs[0], engine.adapter_state(runs[0]))
        return results, info
    finally:
        runner.stop.set()
        db.dispose()


def _rebuild(settings, db: Database, cache: Path, run_id: str, served: dict[str, torch.Tensor]) -> bool:  # type: ignore[no-untyped-def]
    """Another worker, one op at a time, replays the run from its seed: the same state."""
    with db.read() as s:
        run = s.get(Run, run_id)
        assert run is not None
        epoch, applied = run.lease_epoch, run.applied_seq
    other = make_runner(settings, db, TorchEngine(settings.models(), cache_dir=cache), "rebuilder")
    try:
        assert other.states.ensure(run_id, epoch, applied)
        rebuilt = other.engine.adapter_state(run_id)  # type: ignore[attr-defined]
        for key, value in served.items():
            torch.testing.assert_close(rebuilt[key], value, rtol=1e-3, atol=1e-4)
        return True
    finally:
        other.stop.set()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, engine_cache: Path) -> dict[str, object]:
    root = tmp_path_factory.mktemp("train-batch")
    out: dict[str, object] = {}
    for mode in ("on", "off"):
        url = f"sqlite:///{root / mode}.db"
        out[mode] = _serve(root / mode, url, engine_cache, mode)
    return out


def test_ops_of_several_runs_share_passes_and_each_is_served_as_alone(served: dict[str, object]) -> None:
    (batched, on), (single, off) = served["on"], served["off"]  # type: ignore[misc]
    assert on["batched"] >= 2 and off["batched"] == 0  # the first pass held every run's first op
    assert on["statuses"] == off["statuses"]
    assert on["statuses"][-1] == ["failed"] + ["succeeded"] * 4
    assert all(s == ["succeeded"] * 4 for s in on["statuses"][:-1])
    for run_b, run_s in zip(batched, single, strict=True):
        for b, s in zip(run_b, run_s, strict=True):
            if isinstance(b, ForwardBackwardResult):
                assert isinstance(s, ForwardBackwardResult)
                assert b.metrics["loss:sum"] == pytest.approx(s.metrics["loss:sum"], rel=1e-5)
                for ob, os_ in zip(b.outputs, s.outputs, strict=True):
                    assert ob["logprobs"].tolist() == pytest.approx(os_["logprobs"].tolist(), abs=1e-4)
            elif isinstance(b, str):
                assert b == s and "not finite" in b
    for k in range(RUNS):
        for key, value in on["states"][str(k)].items():
            torch.testing.assert_close(value, off["states"][str(k)][key], rtol=1e-3, atol=1e-4)


def test_a_run_served_in_shared_passes_is_rebuilt_alone_to_its_state(served: dict[str, object]) -> None:
    assert served["on"][1]["rebuild"] is True  # type: ignore[index]
