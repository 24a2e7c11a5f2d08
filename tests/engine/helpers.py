"""Small builders shared by the engine tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from app.domain.models import BUILTIN_TINY_MODEL
from app.domain.ops import Datum, ForwardBackwardOp, LoraConfig
from app.domain.tensors import Array

TINY = BUILTIN_TINY_MODEL


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
