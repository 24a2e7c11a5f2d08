"""forward_backward: input validation, micro-batching, and the loss loop.

Conventions (tinker-protocol.md §6.3): position i of `tokens` predicts `target_tokens[i]`; every loss
is *summed* over every token of every datum (not averaged), so splitting a batch across calls and
accumulating gradients gives the same update as one big call. The per-token objectives (cross
entropy and the RL losses) are in rl_losses.py; docs/losses.md documents them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel

from app.domain.ops import (
    LOSS_SPECS,
    Datum,
    ForwardBackwardOp,
    loss_input_names,
    resolve_loss_config,
    unexpected_inputs_message,
)
from app.domain.results import ForwardBackwardResult
from app.domain.tensors import Array
from workers.engine import rl_losses
from workers.engine.errors import OpInputError
from workers.engine.logits import decoder_hidden, target_logprobs

# Padded tokens per micro-batch: bounds activation memory whatever the request's batch size.
MICRO_BATCH_TOKENS = 8192

# Array data is little-endian whatever the host's byte order (app/domain/tensors.py).
_WIRE_DTYPE: dict[str, np.dtype] = {"int64": np.dtype("<i8"), "float32": np.dtype("<f4")}
_NATIVE_DTYPE: dict[str, np.dtype] = {"int64": np.dtype(np.int64), "float32": np.dtype(np.float32)}
# Float inputs that cross_entropy checks when present although it reads only `weights`.
_CHECKED_IF_PRESENT = ("weights", "logprobs", "advantages")


@dataclass(frozen=True)
class PreparedDatum:
    tokens: torch.Tensor  # int64 [N]
    targets: torch.Tensor  # int64 [N]
    inputs: dict[str, torch.Tensor]  # float32 [N] each: exactly the inputs the loss reads


@dataclass(frozen=True)
class PreparedBatch:
    """A validated op: nothing about it can fail before the model runs."""

    loss_fn: str
    config: dict[str, float]
    data: list[PreparedDatum]


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


def prepare_data(op: ForwardBackwardOp, vocab_size: int, max_len: int) -> PreparedBatch:
    """Validate the loss, its config and every datum before anything runs, so a bad op leaves the
    run's state untouched."""
    try:
        config = resolve_loss_config(op.loss_fn, op.loss_fn_config)
    except ValueError as exc:
        raise OpInputError(str(exc)) from None
    if not op.data:
        raise OpInputError("forward_backward needs at least one datum")
    data = [_prepare(i, datum, op.loss_fn, vocab_size, max_len) for i, datum in enumerate(op.data)]
    return PreparedBatch(loss_fn=op.loss_fn, config=config, data=data)


def _prepare(index: int, datum: Datum, loss_fn: str, vocab_size: int, max_len: int) -> PreparedDatum:
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
    spec = LOSS_SPECS[loss_fn]
    given = datum.loss_fn_inputs
    missing = [name for name in ("target_tokens", *spec.required) if name not in given]
    if missing:
        names = ", ".join(f"loss_fn_inputs[{name!r}]" for name in missing)
        raise OpInputError(f"datum {index}: {loss_fn} needs {names}")
    if spec.strict:
        extra = sorted(set(given) - loss_input_names(loss_fn))
        if extra:
            raise OpInputError(f"datum {index}: {unexpected_inputs_message(loss_fn, extra)}")
    targets = _array(index, "target_tokens", given["target_tokens"], "int64", n)
    if targets.min() < 0 or targets.max() >= vocab_size:
        raise OpInputError(
            f"datum {index}: target_tokens must be in [0, {vocab_size}), got {_bad(targets, vocab_size)}"
        )
    inputs: dict[str, torch.Tensor] = {}
    for name in sorted(set(given) & {*spec.required, *spec.optional, *_CHECKED_IF_PRESENT}):
        values = _array(index, name, given[name], "float32", n)
        if not np.isfinite(values).all():
            raise OpInputError(f"datum {index}: {name} must be finite (found NaN or infinity)")
        if name == "sequence_ratio_mask" and not np.isin(values, (0.0, 1.0)).all():
            raise OpInputError(f"datum {index}: sequence_ratio_mask values must be 0 or 1")
        if name in spec.required or name in spec.optional:
            inputs[name] = torch.from_numpy(values)
    # Optional inputs get their defaults here, so every datum of a batch has the same inputs.
    if loss_fn == "cross_entropy" and "weights" not in inputs:
        inputs["weights"] = torch.ones(n, dtype=torch.float32)
    if loss_fn == "gspo" and "sequence_ratio_mask" not in inputs:
        # The tokens that carry an advantage: prompt positions (advantage 0) are not the sequence.
        inputs["sequence_ratio_mask"] = (inputs["advantages"] != 0).to(torch.float32)
    return PreparedDatum(tokens=torch.from_numpy(tokens), targets=torch.from_numpy(targets), inputs=inputs)


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


def run_loss(model: PreTrainedModel, batch: PreparedBatch, forward_only: bool) -> ForwardBackwardResult:
    """Forward (and, unless forward_only, backward into .grad, accumulating) over all datums.

    The caller has activated the run's adapter. Datums are right-padded into micro-batches; with
    causal attention the padding is invisible to real positions, and the mask keeps it that way for
    any model. Each micro-batch is backpropagated as soon as it is computed, to free its activations.

    A non-finite loss (an importance ratio that overflows, say) fails the op with OpInputError
    before its backward pass, and the gradients of earlier micro-batches are rolled back: the run's
    state is as before the op. With forward_only the values are reported as they are.
    """
    data = batch.data
    objective = rl_losses.OBJECTIVES[batch.loss_fn]
    extra_metrics = rl_losses.EXTRA_METRICS[batch.loss_fn]
    device = next(model.parameters()).device
    groups = _micro_batches(data)
    rollback = _GradRollback(model, enabled=not forward_only and len(groups) > 1)
    outputs: list[torch.Tensor | None] = [None] * len(data)
    total = 0.0
    sums = {"ratio_mean": 0.0, "clip_fraction": 0.0}
    with torch.set_grad_enabled(not forward_only):
        for group in groups:
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
            # Boolean indexing walks rows in order, so the flat tokens are datum after datum.
            logprobs = target_logprobs(model, hidden[valid], targets)
            terms = objective(
                rl_losses.Batch(
                    logprobs=logprobs,
                    inputs={
                        name: torch.cat([data[i].inputs[name] for i in group]).to(device)
                        for name in data[group[0]].inputs
                    },
                    segment=torch.repeat_interleave(torch.arange(len(group)), torch.tensor(lengths)).to(device),
                    datums=len(group),
                    config=batch.config,
                )
            )
            loss = terms.token_loss.sum()
            value = float(loss.detach())
            if not forward_only:
                if not math.isfinite(value):
                    rollback.restore()
                    raise OpInputError(_non_finite_message(batch.loss_fn, terms.token_loss, group, lengths))
                loss.backward()
            total += value
            for name, per_datum in (("ratio_mean", terms.ratio_mean), ("clip_fraction", terms.clip_fraction)):
                if per_datum is not None:
                    sums[name] += float(per_datum.sum())
            for i, piece in zip(group, logprobs.detach().split(lengths), strict=True):
                outputs[i] = piece.to("cpu", torch.float32)
    metrics = {"loss:sum": total}
    for key in extra_metrics:
        # Means over datums, so the SDK's datum-weighted merge of chunked requests stays exact.
        metrics[key] = sums[key.split(":")[0]] / len(data)
    return ForwardBackwardResult(
        outputs=tuple({"logprobs": _to_array(lp)} for lp in outputs if lp is not None),
        metrics=metrics,
    )


# engine.py still calls it by its old name; it runs every loss.


class _GradRollback:
    """Copies of the trainable parameters' .grad, taken only if a later micro-batch might fail
    after an earlier one was backpropagated. After optim_step the gradients are None, so the copy
    is usually free."""

    def __init__(self, model: PreTrainedModel, enabled: bool) -> None:
        self._params = [p for p in model.parameters() if p.requires_grad] if enabled else []
        self._saved = [None if p.grad is None else p.grad.detach().clone() for p in self._params]

    def restore(self) -> None:
        for param, grad in zip(self._params, self._saved, strict=True):
            param.grad = grad


def _non_finite_message(loss_fn: str, token_loss: torch.Tensor, group: list[int], lengths: list[int]) -> str:
    bad = (~torch.isfinite(token_loss.detach())).nonzero()
    flat = int(bad[0]) if bad.numel() else 0
    row = 0
    while row < len(lengths) - 1 and flat >= lengths[row]:
        flat -= lengths[row]
        row += 1
    hint = (
        " (an importance ratio exp(logprob - sampler logprob) overflowed: are loss_fn_inputs['logprobs'] "
        "the sampler's logprobs of these target tokens?)"
        if loss_fn != "cross_entropy"
        else ""
    )
    return f"datum {group[row]}, token {flat}: the {loss_fn} loss is not finite{hint}; no gradient was accumulated"


def _to_array(values: torch.Tensor) -> Array:
    data = values.numpy().astype("<f4").tobytes()
    return Array(dtype="float32", shape=(values.shape[0],), data=data)
