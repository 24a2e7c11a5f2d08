"""forward_backward_many: ops of several runs in one pass, each row through its own adapter, give
each run what it would get alone (issue 8 item 4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.domain.models import builtin_tiny_spec
from app.domain.ops import AdamParams, Datum, ForwardBackwardOp, OptimStepOp
from app.domain.tensors import Array
from tests.engine.helpers import DEVICE, ON_GPU, TINY, datum, fb, lora, ref_tol
from workers.engine import EngineConfig, TorchEngine
from workers.engine.errors import OpInputError

RUNS = ("a", "b", "c")


def _engine(cache_dir: Path, batch_runs: str) -> TorchEngine:
    engine = TorchEngine(
        [builtin_tiny_spec()], device=DEVICE, cache_dir=cache_dir, config=EngineConfig(batch_runs=batch_runs)
    )
    for k, run in enumerate(RUNS):
        engine.create_run(run, TINY, lora(rank=4, seed=10 + k))
        # One step each, so every adapter's B is non-zero and the runs really differ.
        engine.forward_backward(run, fb(datum([1, 2, 3, 4, 5 + k])))
        engine.optim_step(run, OptimStepOp(adam=AdamParams(learning_rate=0.05)))
    return engine


def _ops() -> list[tuple[str, ForwardBackwardOp]]:
    # Different lengths and datum counts per run, so rows of one micro-batch have different widths.
    return [
        ("a", fb(datum([5, 9, 14, 3, 7, 8, 2]), datum([4, 4, 6]))),
        ("b", fb(datum([11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]))),
        ("c", fb(datum([3, 1, 4, 1, 5]), datum([9, 2, 6, 5, 3, 5]), datum([8, 9]))),
    ]


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> None:
    """Within float32 rounding on the CPU; on a GPU (bf16 base weights, other kernels for other
    shapes) the same direction and size, which a row through the wrong adapter would not have."""
    if not ON_GPU:
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
        return
    g, w = got.flatten().double(), want.flatten().double()
    if w.norm() == 0:
        assert g.norm() <= 1e-6
        return
    assert torch.nn.functional.cosine_similarity(g, w, dim=0) > 0.99
    assert abs(float(g.norm() / w.norm()) - 1) < 0.05


def _logprobs(result: object) -> list[list[float]]:
    return [list(out["logprobs"].tolist()) for out in result.outputs]  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def together_and_alone(cache_dir: Path) -> tuple[TorchEngine, list[object], TorchEngine, list[object]]:
    together = _engine(cache_dir, "on")
    alone = _engine(cache_dir, "off")
    assert together.batches_runs() and not alone.batches_runs()
    return together, together.forward_backward_many(_ops()), alone, alone.forward_backward_many(_ops())


def test_each_run_gets_the_results_it_would_get_alone(together_and_alone) -> None:
    _, batched, _, single = together_and_alone
    assert len(batched) == len(single) == len(RUNS)
    for b, s, (_, op) in zip(batched, single, _ops(), strict=True):
        assert len(b.outputs) == len(op.data)
        for lb, ls, d in zip(_logprobs(b), _logprobs(s), op.data, strict=True):
            assert len(lb) == len(d.tokens)
            assert lb == pytest.approx(ls, abs=ref_tol(1e-5))
        assert b.metrics["loss:sum"] == pytest.approx(s.metrics["loss:sum"], rel=1e-2 if ON_GPU else 1e-5)
    # The runs' adapters differ, so a row sent through the wrong adapter would show here.
    assert batched[0].metrics["loss:sum"] != pytest.approx(batched[2].metrics["loss:sum"], rel=1e-3)


def test_each_run_gets_only_its_own_gradients(together_and_alone) -> None:
    together, _, alone, _ = together_and_alone
    for run in RUNS:
        got, want = together.adapter_grads(run), alone.adapter_grads(run)
        assert got.keys() == want.keys()
        for key, g in got.items():
            assert g is not None and want[key] is not None, key
            # The sums over rows run in another order (other padding, other matmul shapes).
            _close(g, want[key], rtol=1e-4, atol=1e-5)
        assert any(bool(g.abs().sum() > 0) for g in got.values() if g is not None)


def test_then_each_run_steps_and_keeps_learning(together_and_alone) -> None:
    together, _, alone, _ = together_and_alone
    for engine in (together, alone):
        for run in RUNS:
            engine.optim_step(run, OptimStepOp(adam=AdamParams(learning_rate=0.05)))
    for run in RUNS:
        for key, w in together.adapter_state(run).items():
            # Adam divides by sqrt(v): near-zero gradients amplify their rounding; 1e-4 is 0.2%
            # of one step at lr 0.05, where a wrong adapter would be off by whole steps.
            _close(w, alone.adapter_state(run)[key], rtol=1e-3, atol=1e-4)
    # A few more batched steps on the same data: every run's own loss goes down.
    first = [r.metrics["loss:sum"] for r in together.forward_backward_many(_ops())]
    for run in RUNS:
        together.optim_step(run, OptimStepOp(adam=AdamParams(learning_rate=0.05)))
    for _ in range(3):
        together.forward_backward_many(_ops())
        for run in RUNS:
            together.optim_step(run, OptimStepOp(adam=AdamParams(learning_rate=0.05)))
    last = [r.metrics["loss:sum"] for r in together.forward_backward_many(_ops())]
    assert all(b < a for a, b in zip(first, last, strict=True)), (first, last)


def _is_op(tokens: list[int], sampler_logprob: float) -> ForwardBackwardOp:
    n = len(tokens) - 1
    d = datum(tokens)
    inputs = dict(d.loss_fn_inputs)
    inputs["logprobs"] = Array.from_list([sampler_logprob] * n, "float32")
    inputs["advantages"] = Array.from_list([1.0] * n, "float32")
    return ForwardBackwardOp(data=(Datum(tokens=d.tokens, loss_fn_inputs=inputs),), loss_fn="importance_sampling")


def test_an_op_that_fails_mid_pass_fails_alone_and_the_others_are_served(cache_dir: Path) -> None:
    together = _engine(cache_dir, "on")
    alone = _engine(cache_dir, "off")
    # b's sampler logprobs make exp(logprob - sampler logprob) overflow: its loss is not finite,
    # found only once the shared pass has run (and has added every run's gradients).
    ops = [("a", _is_op([5, 9, 14, 3], -2.0)), ("b", _is_op([4, 4, 6, 1], -1e4)), ("c", _is_op([8, 9, 2], -3.0))]
    results = together.forward_backward_many(ops)
    assert isinstance(results[1], OpInputError) and "not finite" in str(results[1])
    assert together.adapter_grads("b") == alone.adapter_grads("b")  # none: nothing was applied to b
    singles = alone.forward_backward_many(ops)
    for k in (0, 2):
        assert results[k].metrics["loss:sum"] == pytest.approx(
            singles[k].metrics["loss:sum"], rel=1e-2 if ON_GPU else 1e-6
        )
        for key, g in together.adapter_grads(RUNS[k]).items():
            _close(g, alone.adapter_grads(RUNS[k])[key], rtol=1e-4, atol=1e-5)
