"""optim_step: AdamW with the op's hyperparameters, clipping, step counting, validation."""

from __future__ import annotations

import math

import pytest
import torch

from app.domain.ops import AdamParams, OptimStepOp
from tests.engine.helpers import TINY, datum, fb, lora, same_grads
from workers.engine import OpInputError, TorchEngine

SEQ = [101, 57, 12, 7, 102, 55, 66]


def _step(engine: TorchEngine, run: str, **adam: float) -> dict[str, float]:
    return engine.optim_step(run, OptimStepOp(adam=AdamParams(**adam))).metrics


def test_step_updates_weights_reports_norm_and_clears_grads(engine: TorchEngine) -> None:
    engine.create_run("opt:basic", TINY, lora())
    before = engine.adapter_state("opt:basic")
    engine.forward_backward("opt:basic", fb(datum(SEQ)))
    grads = engine.adapter_grads("opt:basic")
    expected_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values() if g is not None))
    metrics = _step(engine, "opt:basic", learning_rate=1e-3)
    assert metrics["grad_norm"] == pytest.approx(expected_norm, rel=1e-5)
    assert metrics["learning_rate"] == 1e-3
    assert metrics["optimizer_step"] == 1
    assert engine.optimizer_steps("opt:basic") == 1
    assert all(g is None for g in engine.adapter_grads("opt:basic").values())
    after = engine.adapter_state("opt:basic")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    # Only LoRA B has a gradient on the first step (B = 0 makes A's gradient zero); Adam moves it by ~lr.
    assert changed and all(".lora_B." in k for k in changed)
    delta = max(float((after[k] - before[k]).abs().max()) for k in changed)
    assert delta == pytest.approx(1e-3, rel=1e-3)


def test_clipping_scales_the_update(engine: TorchEngine) -> None:
    for run in ("opt:noclip", "opt:clip"):
        engine.create_run(run, TINY, lora(seed=2))
        for _ in range(2):  # on the 2nd step Adam's update depends on the gradient's scale
            engine.forward_backward(run, fb(datum(SEQ)))
            metrics = _step(engine, run, learning_rate=1e-2, grad_clip_norm=1e-3 if run == "opt:clip" else 0.0)
            assert metrics["grad_norm"] > 1e-3  # reported before clipping
    assert engine.state_digest("opt:noclip") != engine.state_digest("opt:clip")


def test_step_without_gradients_is_harmless(engine: TorchEngine) -> None:
    engine.create_run("opt:nograd", TINY, lora())
    before = engine.adapter_state("opt:nograd")
    metrics = _step(engine, "opt:nograd", learning_rate=1e-2, weight_decay=0.1)
    assert metrics["grad_norm"] == 0.0
    after = engine.adapter_state("opt:nograd")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert engine.optimizer_steps("opt:nograd") == 1


@pytest.mark.parametrize(
    "adam",
    [
        {"learning_rate": -1e-3},
        {"learning_rate": float("nan")},
        {"learning_rate": float("inf")},
        {"beta1": 1.0},
        {"beta2": -0.1},
        {"eps": -1.0},
        {"weight_decay": -0.5},
        {"grad_clip_norm": -1.0},
    ],
)
def test_bad_hyperparameters_are_user_errors(engine: TorchEngine, adam: dict[str, float]) -> None:
    run = f"opt:bad:{sorted(adam.items())}"
    engine.create_run(run, TINY, lora())
    engine.forward_backward(run, fb(datum(SEQ)))
    digest, grads = engine.state_digest(run), engine.adapter_grads(run)
    with pytest.raises(OpInputError):
        _step(engine, run, **adam)
    assert engine.state_digest(run) == digest
    assert engine.optimizer_steps(run) == 0
    after = engine.adapter_grads(run)
    assert same_grads(grads, after)
