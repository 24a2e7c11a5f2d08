"""forward_backward with cross_entropy: values, gradient accumulation, purity of forward_only."""

from __future__ import annotations

from typing import Literal

import pytest
import torch

from app.domain.ops import AdamParams, Datum, OptimStepOp
from app.domain.results import ForwardBackwardResult
from app.domain.tensors import Array
from tests.engine.helpers import TINY, datum, fb, lora, ref_tol, same_grads
from workers.engine import OpInputError, TorchEngine, build_tiny_model

SEQ_A = [101, 57, 12, 7, 102, 55, 66]
SEQ_B = [3, 1000, 151_000, 42]


def _logprobs(result: ForwardBackwardResult) -> list[torch.Tensor]:
    return [torch.tensor(out["logprobs"].tolist()) for out in result.outputs]


def _reference_logprobs(seq: list[int]) -> torch.Tensor:
    """Independent path: the plain HF model's full logits (a fresh adapter is the identity)."""
    model = build_tiny_model()
    with torch.no_grad():
        logits = model(torch.tensor([seq[:-1]])).logits[0].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(seq[1:]).unsqueeze(-1)).squeeze(-1)


def test_outputs_and_loss_are_weighted_sums(engine: TorchEngine) -> None:
    engine.create_run("fb:values", TINY, lora())
    w_a = [1.0, 0.0, 2.0, 0.5, 1.0, 1.0]
    w_b = [0.0, 1.0, 1.0]
    result = engine.forward_backward("fb:values", fb(datum(SEQ_A, w_a), datum(SEQ_B, w_b)))
    lp_a, lp_b = _logprobs(result)
    assert result.outputs[0]["logprobs"].dtype == "float32"
    assert result.outputs[0]["logprobs"].shape == (6,) and result.outputs[1]["logprobs"].shape == (3,)
    torch.testing.assert_close(lp_a, _reference_logprobs(SEQ_A), atol=ref_tol(1e-5), rtol=1e-5)
    torch.testing.assert_close(lp_b, _reference_logprobs(SEQ_B), atol=ref_tol(1e-5), rtol=1e-5)
    expected = -(lp_a * torch.tensor(w_a)).sum() - (lp_b * torch.tensor(w_b)).sum()
    assert result.metrics.keys() == {"loss:sum"}
    assert result.metrics["loss:sum"] == pytest.approx(float(expected), rel=1e-5)
    assert all((lp < 0).all() for lp in (lp_a, lp_b))


def test_weights_default_to_one(engine: TorchEngine) -> None:
    engine.create_run("fb:ones", TINY, lora())
    without = engine.forward_backward("fb:ones", fb(datum(SEQ_A), forward_only=True))
    with_ones = engine.forward_backward("fb:ones", fb(datum(SEQ_A, [1.0] * 6), forward_only=True))
    assert without.metrics == with_ones.metrics
    assert without.metrics["loss:sum"] == pytest.approx(-float(_logprobs(without)[0].sum()), rel=1e-6)


def test_forward_only_changes_nothing(engine: TorchEngine) -> None:
    engine.create_run("fb:pure", TINY, lora())
    trained = engine.forward_backward("fb:pure", fb(datum(SEQ_A)))
    digest, grads = engine.state_digest("fb:pure"), engine.adapter_grads("fb:pure")
    forward = engine.forward_backward("fb:pure", fb(datum(SEQ_A), datum(SEQ_B), forward_only=True))
    assert engine.state_digest("fb:pure") == digest
    after = engine.adapter_grads("fb:pure")
    assert same_grads(grads, after)
    assert torch.equal(_logprobs(forward)[0], _logprobs(trained)[0])


def test_gradients_accumulate_across_calls(engine: TorchEngine) -> None:
    for run in ("acc:both", "acc:a", "acc:b", "acc:one-call"):
        engine.create_run(run, TINY, lora(seed=5))
        # One update first, so LoRA B is non-zero and every parameter gets a gradient.
        engine.forward_backward(run, fb(datum([5, 6, 7, 8])))
        engine.optim_step(run, OptimStepOp(adam=AdamParams(learning_rate=1e-2)))
    engine.forward_backward("acc:both", fb(datum(SEQ_A)))
    engine.forward_backward("acc:both", fb(datum(SEQ_B)))
    engine.forward_backward("acc:a", fb(datum(SEQ_A)))
    engine.forward_backward("acc:b", fb(datum(SEQ_B)))
    engine.forward_backward("acc:one-call", fb(datum(SEQ_A), datum(SEQ_B)))
    both, ga, gb, one = (engine.adapter_grads(r) for r in ("acc:both", "acc:a", "acc:b", "acc:one-call"))
    for key, g in both.items():
        assert g is not None
        assert torch.count_nonzero(g) > 0, key
        grad_a, grad_b = ga[key], gb[key]
        assert grad_a is not None and grad_b is not None
        torch.testing.assert_close(g, grad_a + grad_b, atol=1e-6, rtol=1e-5)
        # One padded batch sums in another order than two calls: equal up to float32 rounding.
        scale = float(g.abs().max())
        torch.testing.assert_close(one[key], g, atol=1e-4 * scale, rtol=1e-4)


def test_batched_logprobs_match_single_datum_calls(engine: TorchEngine) -> None:
    engine.create_run("fb:batch", TINY, lora())
    batched = _logprobs(engine.forward_backward("fb:batch", fb(datum(SEQ_B), datum(SEQ_A), forward_only=True)))
    single_b = _logprobs(engine.forward_backward("fb:batch", fb(datum(SEQ_B), forward_only=True)))[0]
    single_a = _logprobs(engine.forward_backward("fb:batch", fb(datum(SEQ_A), forward_only=True)))[0]
    torch.testing.assert_close(batched[0], single_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[1], single_a, atol=1e-5, rtol=1e-5)


def test_runs_do_not_share_gradients(engine: TorchEngine) -> None:
    engine.create_run("iso:a", TINY, lora())
    engine.create_run("iso:b", TINY, lora())
    engine.forward_backward("iso:a", fb(datum(SEQ_A)))
    assert all(g is None for g in engine.adapter_grads("iso:b").values())
    assert all(g is not None for g in engine.adapter_grads("iso:a").values())


def _raw(tokens: list[int], inputs: dict[str, Array]) -> Datum:
    return Datum(tokens=tuple(tokens), loss_fn_inputs=inputs)


I64: Literal["int64"] = "int64"
F32: Literal["float32"] = "float32"
GOOD = datum(SEQ_A)
BAD_DATA = {
    "token >= vocab": datum([1, 151_936, 3]),
    "negative token": datum([1, -1, 3]),
    "target >= vocab": _raw([1, 2], {"target_tokens": Array.from_list([2, 200_000], I64)}),
    "negative target": _raw([1, 2], {"target_tokens": Array.from_list([-5, 2], I64)}),
    "targets too short": _raw([1, 2, 3], {"target_tokens": Array.from_list([2, 3], I64)}),
    "weights too long": _raw(
        [1, 2], {"target_tokens": Array.from_list([2, 3], I64), "weights": Array.from_list([1.0] * 3, F32)}
    ),
    "float targets": _raw([1, 2], {"target_tokens": Array.from_list([2.0, 3.0], F32)}),
    "int weights": _raw(
        [1, 2], {"target_tokens": Array.from_list([2, 3], I64), "weights": Array.from_list([1, 1], I64)}
    ),
    "2-d targets": _raw([1, 2], {"target_tokens": Array.from_list([2, 3], I64, shape=(1, 2))}),
    "truncated bytes": _raw([1, 2], {"target_tokens": Array(dtype=I64, shape=(2,), data=b"\x00" * 12)}),
    "nan weight": _raw(
        [1, 2], {"target_tokens": Array.from_list([2, 3], I64), "weights": Array.from_list([1.0, float("nan")], F32)}
    ),
    "missing targets": _raw([1, 2], {"weights": Array.from_list([1.0, 1.0], F32)}),
    "empty tokens": _raw([], {"target_tokens": Array.from_list([], I64)}),
    "too long": datum(list(range(2050))),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_input_is_rejected_before_any_state_changes(engine: TorchEngine, case: str) -> None:
    run = f"bad:{case}"
    engine.create_run(run, TINY, lora())
    engine.forward_backward(run, fb(datum(SEQ_B)))  # some accumulated gradient to protect
    digest, grads = engine.state_digest(run), engine.adapter_grads(run)
    with pytest.raises(OpInputError):
        # The good datum comes first: nothing may run until every datum has been validated.
        engine.forward_backward(run, fb(GOOD, BAD_DATA[case]))
    assert engine.state_digest(run) == digest
    after = engine.adapter_grads(run)
    assert same_grads(grads, after)


def test_unknown_loss_and_empty_batch(engine: TorchEngine) -> None:
    engine.create_run("bad:loss", TINY, lora())
    with pytest.raises(OpInputError, match="unknown loss"):
        engine.forward_backward("bad:loss", fb(GOOD, loss_fn="bogus_loss"))
    with pytest.raises(OpInputError):
        engine.forward_backward("bad:loss", fb())
    assert all(g is None for g in engine.adapter_grads("bad:loss").values())
