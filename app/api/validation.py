"""Checks of op contents against the model, made at submission so bad input never reaches a GPU
worker (the engine checks again: defence in depth). Each failure names what to fix."""

from __future__ import annotations

import math

from app.domain.errors import InvalidInput
from app.domain.ops import (
    LOSS_SPECS,
    SERVER_INPUTS,
    Datum,
    ForwardBackwardOp,
    SampleOp,
    client_input_names,
    resolve_loss_config,
    unexpected_inputs_message,
)


def _check_tokens(tokens: tuple[int, ...], vocab: int, what: str) -> None:
    bad = next((t for t in tokens if t < 0 or t >= vocab), None)
    if bad is not None:
        raise InvalidInput(f"{what}: token id {bad} is outside the vocabulary [0, {vocab})")


# Float inputs checked whenever present, even by a loss that does not read them (cross_entropy).
_FLOAT_INPUTS = ("weights", "advantages", "logprobs")


def _check_datum(i: int, datum: Datum, loss_fn: str, vocab: int, max_len: int) -> None:
    n = len(datum.tokens)
    if n == 0:
        raise InvalidInput(f"datum {i}: model_input is empty")
    if n > max_len:
        raise InvalidInput(f"datum {i}: {n} tokens exceed the model's maximum length {max_len}")
    _check_tokens(datum.tokens, vocab, f"datum {i} model_input")
    inputs = datum.loss_fn_inputs
    spec = LOSS_SPECS[loss_fn]
    # Inputs the server fills in from sampling records come later (routes/training.py).
    server = SERVER_INPUTS.get(loss_fn, ())
    missing = [name for name in ("target_tokens", *spec.required) if name not in inputs and name not in server]
    if missing:
        names = ", ".join(f"loss_fn_inputs[{name!r}]" for name in missing)
        raise InvalidInput(f"datum {i}: {loss_fn} needs {names}")
    if spec.strict:
        extra = sorted(set(inputs) - client_input_names(loss_fn))
        if extra:
            raise InvalidInput(f"datum {i}: {unexpected_inputs_message(loss_fn, extra)}")
    targets = inputs["target_tokens"]
    if targets.dtype != "int64":
        raise InvalidInput(f"datum {i}: target_tokens must be int64, got {targets.dtype}")
    if targets.size != n:
        raise InvalidInput(f"datum {i}: target_tokens has {targets.size} entries for {n} input tokens")
    _check_tokens(tuple(int(t) for t in targets.tolist()), vocab, f"datum {i} target_tokens")
    for name in (*_FLOAT_INPUTS, *(o for o in spec.optional if o not in _FLOAT_INPUTS)):
        arr = inputs.get(name)
        if arr is None:
            continue
        if arr.dtype != "float32":
            raise InvalidInput(f"datum {i}: {name} must be float32, got {arr.dtype}")
        if arr.size != n:
            raise InvalidInput(f"datum {i}: {name} has {arr.size} entries for {n} input tokens")
        values = arr.tolist()
        if not all(math.isfinite(v) for v in values):
            raise InvalidInput(f"datum {i}: {name} contains NaN or infinity")
        if name == "sequence_ratio_mask" and any(v not in (0.0, 1.0) for v in values):
            raise InvalidInput(f"datum {i}: sequence_ratio_mask values must be 0 or 1")


def check_forward_backward(op: ForwardBackwardOp, *, vocab: int, max_len: int, max_datums: int) -> None:
    try:
        resolve_loss_config(op.loss_fn, op.loss_fn_config)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
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
