"""Small builders shared by the engine tests."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace

import pytest
import torch

from app.domain.models import BUILTIN_TINY_MODEL
from app.domain.ops import Datum, ForwardBackwardOp, LoraConfig
from app.domain.tensors import Array
from workers.engine import TorchEngine

TINY = BUILTIN_TINY_MODEL

# TUFT_TEST_DEVICE=cuda runs the engine suite on a GPU (docs/performance.md says how).
DEVICE = os.environ.get("TUFT_TEST_DEVICE", "cpu")
ON_GPU = DEVICE != "cpu"


def ref_tol(cpu: float) -> float:
    """Absolute tolerance for a logprob compared with the float32 CPU reference model, or between
    two differently batched computations. On a GPU the engine keeps base weights in bfloat16
    (docs/configuration.md), whose logits carry about 3 significant digits: a logit near 10 is off
    by up to ~0.04, so agreement there is 0.1 nats. A real bug (a shifted position, a wrong token,
    a missing adapter) is off by whole nats, so the looser bound still catches it."""
    return 0.1 if ON_GPU else cpu


def datum(seq: Sequence[int], weights: Sequence[float] | None = None) -> Datum:
    """A next-token-prediction datum for the full sequence `seq`: inputs seq[:-1], targets seq[1:]."""
    inputs: dict[str, Array] = {"target_tokens": Array.from_list(list(seq[1:]), "int64")}
    if weights is not None:
        inputs["weights"] = Array.from_list(list(weights), "float32")
    return Datum(tokens=tuple(seq[:-1]), loss_fn_inputs=inputs)


def fb(*data: Datum, forward_only: bool = False, loss_fn: str = "cross_entropy") -> ForwardBackwardOp:
    return ForwardBackwardOp(data=data, loss_fn=loss_fn, forward_only=forward_only)


def lora(rank: int = 8, seed: int | None = 1, **targets: bool) -> LoraConfig:
    return LoraConfig(rank=rank, seed=seed, **targets)


def same_grads(a: Mapping[str, torch.Tensor | None], b: Mapping[str, torch.Tensor | None]) -> bool:
    """Bitwise-equal gradients (None where none accumulated)."""
    if a.keys() != b.keys():
        return False
    for key, ga in a.items():
        gb = b[key]
        if ga is None or gb is None:
            if ga is not gb:
                return False
        elif not torch.equal(ga, gb):
            return False
    return True


def set_micro_batch_tokens(monkeypatch: pytest.MonkeyPatch, engine: TorchEngine, tokens: int) -> None:
    """Force the tiny model's micro-batch budget on a shared engine for one test (it must have
    loaded the model, e.g. by creating a run)."""
    batcher = engine._slots[TINY].batcher
    monkeypatch.setattr(batcher, "config", replace(batcher.config, micro_batch_tokens=tokens))
