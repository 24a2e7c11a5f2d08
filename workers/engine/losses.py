"""forward_backward: input validation and the cross-entropy loss.

Conventions (tinker-protocol.md §6.3): position i of `tokens` predicts `target_tokens[i]`; the loss is
the weighted negative log-likelihood *summed* over every token of every datum (not averaged), so
splitting a batch across calls and accumulating gradients gives the same update as one big call.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel

from app.domain.ops import Datum, ForwardBackwardOp
from app.domain.results import ForwardBackwardResult
from app.domain.tensors import Array
from workers.engine.errors import OpInputError
from workers.engine.logits import decoder_hidden, target_logprobs

SUPPORTED_LOSSES = frozenset({"cross_entropy"})

# Padded tokens per micro-batch: bounds activation memory whatever the request's batch size.
MICRO_BATCH_TOKENS = 8192

# Array data is little-endian whatever the host's byte order (app/domain/tensors.py).
_WIRE_DTYPE: dict[str, np.dtype] = {"int64": np.dtype("<i8"), "float32": np.dtype("<f4")}
_NATIVE_DTYPE: dict[str, np.dtype] = {"int64": np.dtype(np.int64), "float32": np.dtype(np.float32)}


@dataclass(frozen=True)
class PreparedDatum:
    tokens: torch.Tensor  # int64 [N]
    targets: torch.Tensor  # int64 [N]
    weights: torch.Tensor  # float32 [N]


def _array(datum_index: int, name: str, arr: Array, dtype: str, length: int) -> np.ndarray:
    where = f"datum {datum_index}: loss_fn_inputs[{name!r}]"
    if arr.dtype != dtype:
        raise OpInputError(f"{where} must be {dtype}, got {arr.dtype}")
    try:
        arr.check()
    except ValueError as exc:
        raise OpInputError(f"{where}: {exc}") from None
    if arr.shape != (length,):
        raise OpInputError(f"{where} has shape {list(arr.shape)}, expected [{length}] (one per input token)")
    # Copy into native byte order (and a writable buffer, which torch.from_numpy wants).
    return np.frombuffer(arr.data, dtype=_WIRE_DTYPE[dtype]).astype(_NATIVE_DTYPE[dtype])


def prepare_data(op: ForwardBackwardOp, vocab_size: int, max_len: int) -> list[PreparedDatum]:
    """Validate every datum before anything runs, so a bad op leaves the run's state untouched."""
    if op.loss_fn not in SUPPORTED_LOSSES:
        raise OpInputError(f"unknown loss {op.loss_fn!r}; supported: {sorted(SUPPORTED_LOSSES)}")
    if not op.data:
        raise OpInputError("forward_backward needs at least one datum")
    return [_prepare(i, datum, vocab_size, max_len) for i, datum in enumerate(op.data)]


def _prepare(index: int, datum: Datum, vocab_size: int, max_len: int) -> PreparedDatum:
    n = len(datum.tokens)
    if n < 1:
        raise OpInputError(f"datum {index}: empty token sequence")
    if n > max_len:
        raise OpInputError(f"datum {index}: {n} tokens exceed the model's max length {max_len}")
    try:
        tokens = np.asarray(datum.tokens, dtype=np.int64)
    except OverflowError:
        raise OpInputError(f"datum {index}: token id out of int64 range") from None
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise OpInputError(f"datum {index}: token ids must be in [0, {vocab_size}), got {_bad(tokens, vocab_size)}")
    if "target_tokens" not in datum.loss_fn_inputs:
        raise OpInputError(f"datum {index}: cross_entropy needs loss_fn_inputs['target_tokens']")
    targets = _array(index, "target_tokens", datum.loss_fn_inputs["target_tokens"], "int64", n)
    if targets.min() < 0 or targets.max() >= vocab_size:
        raise OpInputError(
            f"datum {index}: target_tokens must be in [0, {vocab_size}), got {_bad(targets, vocab_size)}"
        )
    if "weights" in datum.loss_fn_inputs:
        weights = _array(index, "weights", datum.loss_fn_inputs["weights"], "float32", n)
        if not np.isfinite(weights).all():
            raise OpInputError(f"datum {index}: weights must be finite")
    else:
        weights = np.ones(n, dtype=np.float32)
    return PreparedDatum(
        tokens=torch.from_numpy(tokens),
        targets=torch.from_numpy(targets),
        weights=torch.from_numpy(weights),
    )


def _bad(values: np.ndarray, vocab_size: int) -> int:
    return int(values[(values < 0) | (values >= vocab_size)][0])


def _micro_batches(data: list[PreparedDatum]) -> list[list[int]]:
    """Consecutive datums grouped so each group's padded size stays under MICRO_BATCH_TOKENS."""
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, datum in enumerate(data):
        n = datum.tokens.shape[0]
        if current and max(longest, n) * (len(current) + 1) > MICRO_BATCH_TOKENS:
            groups.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        groups.append(current)
    return groups


def run_cross_entropy(model: PreTrainedModel, data: list[PreparedDatum], forward_only: bool) -> ForwardBackwardResult:
    """Forward (and, unless forward_only, backward into .grad, accumulating) over all datums.

    The caller has activated the run's adapter. Datums are right-padded into micro-batches; with
    causal attention the padding is invisible to real positions, and the mask keeps it that way for
    any model. Each micro-batch is backpropagated as soon as it is computed, to free its activations.
    """
    device = next(model.parameters()).device
    outputs: list[torch.Tensor | None] = [None] * len(data)
    total = 0.0
    with torch.set_grad_enabled(not forward_only):
        for group in _micro_batches(data):
            lengths = [data[i].tokens.shape[0] for i in group]
            width = max(lengths)
            ids = torch.zeros(len(group), width, dtype=torch.int64)
            mask = torch.zeros(len(group), width, dtype=torch.int64)
            for row, i in enumerate(group):
                ids[row, : lengths[row]] = data[i].tokens
                mask[row, : lengths[row]] = 1
            hidden = decoder_hidden(model, ids.to(device), mask.to(device))
            valid = mask.to(device).bool()
            targets = torch.cat([data[i].targets for i in group]).to(device)
            weights = torch.cat([data[i].weights for i in group]).to(device)
            # Boolean indexing walks rows in order, so the flat tokens are datum after datum.
            logprobs = target_logprobs(model, hidden[valid], targets)
            loss = -(logprobs * weights).sum()
            if not forward_only:
                loss.backward()
            total += float(loss.detach())
            for i, piece in zip(group, logprobs.detach().split(lengths), strict=True):
                outputs[i] = piece.to("cpu", torch.float32)
    return ForwardBackwardResult(
        outputs=tuple({"logprobs": _to_array(lp)} for lp in outputs if lp is not None),
        metrics={"loss:sum": total},
    )


def _to_array(values: torch.Tensor) -> Array:
    data = values.numpy().astype("<f4").tobytes()
    return Array(dtype="float32", shape=(values.shape[0],), data=data)
