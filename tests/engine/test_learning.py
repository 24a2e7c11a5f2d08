"""End to end on the tiny model: training memorises a sequence and sampling reproduces it."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.domain.ops import AdamParams, OptimStepOp, SampleOp, SamplingParams
from tests.engine.helpers import TINY, datum, fb, lora
from workers.engine import TorchEngine

EOS = 151_643
SEQ = [101, 57, 12, 7, 102, 55, 66, EOS]


@pytest.mark.slow
def test_training_memorises_and_sampling_reproduces(engine: TorchEngine, tmp_path: Path) -> None:
    engine.create_run("learn", TINY, lora(rank=8, seed=0))
    step = OptimStepOp(adam=AdamParams(learning_rate=1e-2))
    losses = []
    for _ in range(30):
        losses.append(engine.forward_backward("learn", fb(datum(SEQ))).metrics["loss:sum"])
        engine.optim_step("learn", step)
    final = engine.forward_backward("learn", fb(datum(SEQ), forward_only=True)).metrics["loss:sum"]
    assert losses[0] > 50  # ~14 nats per token before training
    assert final < 0.05 * losses[0]
    assert engine.optimizer_steps("learn") == 30

    dest = tmp_path / "sampler"
    dest.mkdir()
    engine.save_run("learn", dest, with_optimizer=False)
    greedy = SamplingParams(max_tokens=10, temperature=0.0)
    out = engine.sample(TINY, dest, SampleOp(prompt=(101, 57), params=greedy)).sequences[0]
    # The continuation, EOS included, then a stop.
    assert out.tokens == tuple(SEQ[2:])
    assert out.stop_reason == "stop"
    assert out.logprobs is not None and all(lp > -1.0 for lp in out.logprobs)

    no_eos = greedy.model_copy(update={"stop_at_eos": False})
    longer = engine.sample(TINY, dest, SampleOp(prompt=(101, 57), params=no_eos)).sequences[0]
    assert longer.tokens[:6] == tuple(SEQ[2:]) and len(longer.tokens) == 10
    assert longer.stop_reason == "length"

    # The base model (no adapter) knows nothing of it.
    base = engine.sample(TINY, None, SampleOp(prompt=(101, 57), params=greedy)).sequences[0]
    assert base.tokens[:6] != tuple(SEQ[2:])
