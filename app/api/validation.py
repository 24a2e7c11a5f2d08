"""Checks of op contents against the model, made at submission so bad input never reaches a GPU
worker (the engine checks again: defence in depth). Each failure names what to fix."""

from __future__ import annotations

import math

from app.domain.errors import InvalidInput
from app.domain.ops import KNOWN_LOSSES, Datum, ForwardBackwardOp, SampleOp


def _check_tokens(tokens: tuple[int, ...], vocab: int, what: str) -> None:
    bad = next((t for t in tokens if t < 0 or t >= vocab), None)
    if bad is not None:
        raise InvalidInput(f"{what}: token id {bad} is outside the vocabulary [0, {vocab})")


def _check_datum(i: int, datum: Datum, loss_fn: str, vocab: int, max_len: int) -> None:
    n = len(datum.tokens)
    if n == 0:
        raise InvalidInput(f"datum {i}: model_input is empty")
    if n > max_len:
        raise InvalidInput(f"datum {i}: {n} tokens exceed the model's maximum length {max_len}")
    _check_tokens(datum.tokens, vocab, f"datum {i} model_input")
    inputs = datum.loss_fn_inputs
    if loss_fn == "cross_entropy" and "target_tokens" not in inputs:
        raise InvalidInput(f"datum {i}: cross_entropy needs loss_fn_inputs['target_tokens']")
    targets = inputs.get("target_tokens")
    if targets is not None:
        if targets.dtype != "int64":
            raise InvalidInput(f"datum {i}: target_tokens must be int64, got {targets.dtype}")
        if targets.size != n:
            raise InvalidInput(f"datum {i}: target_tokens has {targets.size} entries for {n} input tokens")
        _check_tokens(tuple(int(t) for t in targets.tolist()), vocab, f"datum {i} target_tokens")
    for name in ("weights", "advantages", "logprobs"):
        arr = inputs.get(name)
        if arr is None:
            continue
        if arr.dtype != "float32":
            raise InvalidInput(f"datum {i}: {name} must be float32, got {arr.dtype}")
        if arr.size != n:
            raise InvalidInput(f"datum {i}: {name} has {arr.size} entries for {n} input tokens")
        if not all(math.isfinite(v) for v in arr.tolist()):
            raise InvalidInput(f"datum {i}: {name} contains NaN or infinity")


def check_forward_backward(op: ForwardBackwardOp, *, vocab: int, max_len: int, max_datums: int) -> None:
    if op.loss_fn not in KNOWN_LOSSES:
        raise InvalidInput(f"unknown loss function {op.loss_fn!r}; supported: {sorted(KNOWN_LOSSES)}")
    if not op.data:
        raise InvalidInput("forward_backward needs at least one datum")
    if len(op.data) > max_datums:
        raise InvalidInput(f"{len(op.data)} datums exceed the per-request limit {max_datums}")
    for i, datum in enumerate(op.data):
        _check_datum(i, datum, op.loss_fn, vocab, max_len)


def check_sample(op: SampleOp, *, vocab: int, max_len: int, max_samples: int) -> None:
    if not op.prompt:
        raise InvalidInput("the prompt is empty")
    _check_tokens(op.prompt, vocab, "prompt")
    if not 1 <= op.num_samples <= max_samples:
        raise InvalidInput(f"num_samples must be between 1 and {max_samples}, got {op.num_samples}")
    max_tokens = op.params.max_tokens or 0
    if len(op.prompt) + max_tokens > max_len:
        raise InvalidInput(
            f"prompt ({len(op.prompt)} tokens) plus max_tokens ({max_tokens}) "
            f"exceed the model's maximum length {max_len}"
        )
    if op.topk_prompt_logprobs < 0 or op.topk_prompt_logprobs > 100:
        raise InvalidInput("topk_prompt_logprobs must be between 0 and 100")
    _check_tokens(op.params.stop_tokens, vocab, "stop token")
