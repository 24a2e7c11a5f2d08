"""forward_backward: input validation and the loss of each micro-batch (microbatch.py splits the op).

Conventions (tinker-protocol.md §6.3): position i of `tokens` predicts `target_tokens[i]`; every loss
is *summed* over every token of every datum (not averaged), so splitting a batch across calls and
accumulating gradients gives the same update as one big call. The per-token objectives (cross
entropy and the RL losses) are in rl_losses.py; docs/losses.md documents them.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

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
from app.domain.provenance import SAMPLED_MASK
from app.domain.results import ForwardBackwardResult
from app.domain.tensors import Array
from workers.engine import rl_losses
from workers.engine.errors import OpInputError
from workers.engine.logits import decoder_hidden, target_logprobs
from workers.engine.lora_rows import routed
from workers.engine.microbatch import MicroBatcher

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
        if name in ("sequence_ratio_mask", SAMPLED_MASK) and not np.isin(values, (0.0, 1.0)).all():
            raise OpInputError(f"datum {index}: {name} values must be 0 or 1")
        if name in spec.required or name in spec.optional:
            inputs[name] = torch.from_numpy(values)
    # Optional inputs get their defaults here, so every datum of a batch has the same inputs.
    if loss_fn == "cross_entropy" and "weights" not in inputs:
        inputs["weights"] = torch.ones(n, dtype=torch.float32)
    if loss_fn == "stable_reinforce":
        # Accepted for the cookbook's sake, never read: the recorded logprobs replace it.
        inputs.pop("logprobs", None)
    if SAMPLED_MASK in inputs and bool(((inputs["advantages"] != 0) & (inputs[SAMPLED_MASK] == 0)).any()):
        # The API resolved these from the sampling records and checked the same (app/domain/provenance.py).
        raise OpInputError(
            f"datum {index}: {loss_fn} trains only sampled tokens, but a non-sampled one has an advantage"
        )
    if loss_fn == "gspo" and "sequence_ratio_mask" not in inputs:
        # The tokens that carry an advantage: prompt positions (advantage 0) are not the sequence.
        inputs["sequence_ratio_mask"] = (inputs["advantages"] != 0).to(torch.float32)
    return PreparedDatum(tokens=torch.from_numpy(tokens), targets=torch.from_numpy(targets), inputs=inputs)


def _bad(values: np.ndarray, vocab_size: int) -> int:
    return int(values[(values < 0) | (values >= vocab_size)][0])


def run_loss(
    model: PreTrainedModel,
    batch: PreparedBatch,
    forward_only: bool,
    batcher: MicroBatcher,
    budget: int | None = None,
) -> ForwardBackwardResult:
    """Forward (and, unless forward_only, backward into .grad, accumulating) over all datums.

    The caller has activated the run's adapter. `batcher` splits the datums into micro-batches
    (microbatch.py: by a token budget, longest first, retried smaller after an out-of-memory
    error); each is backpropagated as soon as it is computed, to free its activations. Results are
    kept per datum and reduced in the op's datum order, so they do not depend on the split beyond
    the float rounding of the model's own arithmetic.

    A non-finite loss (an importance ratio that overflows, say) fails the op with OpInputError
    before its backward pass, and the gradients of earlier micro-batches are rolled back: the run's
    state is as before the op. With forward_only the values are reported as they are.
    """
    per = run_datums(model, batch, forward_only, batcher, budget)
    return assemble(batch.loss_fn, per, range(len(batch.data)))


@dataclass
class DatumResults:
    """Per datum of a batch: its logprobs, its loss and its ratio statistics."""

    outputs: list[torch.Tensor | None]
    losses: list[float]
    stats: dict[str, list[float]]


def run_datums(
    model: PreTrainedModel,
    batch: PreparedBatch,
    forward_only: bool,
    batcher: MicroBatcher,
    budget: int | None = None,
    adapter_of: Sequence[str] | None = None,
    only: Sequence[int] | None = None,
) -> DatumResults:
    """run_loss's work, without reducing it to one result. `adapter_of` (multi_run.py): the LoRA
    adapter each datum goes through, inside a RowRouter.batch; None: the active adapter. `only`
    (data_parallel.py: one rank's share): run just the datums at these indices; the others' slots
    stay empty and results keep the op's indices."""
    n = len(batch.data)
    per = DatumResults([None] * n, [0.0] * n, {"ratio_mean": [0.0] * n, "clip_fraction": [0.0] * n})
    indices = list(range(n)) if only is None else list(only)
    if not indices:
        return per

    def step(group: list[int]) -> None:
        _micro_batch(model, batch, [indices[j] for j in group], forward_only, per, adapter_of)

    batcher.run([batch.data[i].tokens.shape[0] for i in indices], step, forward_only, budget)
    return per


def assemble(loss_fn: str, per: DatumResults, indices: Sequence[int]) -> ForwardBackwardResult:
    """One op's result from the datums at `indices` (in the op's order)."""
    metrics = {"loss:sum": _sum([per.losses[i] for i in indices])}
    for key in rl_losses.EXTRA_METRICS[loss_fn]:
        # Means over datums, so the SDK's datum-weighted merge of chunked requests stays exact.
        metrics[key] = _sum([per.stats[key.split(":")[0]][i] for i in indices]) / len(indices)
    outputs = [per.outputs[i] for i in indices]
    return ForwardBackwardResult(
        outputs=tuple({"logprobs": _to_array(lp)} for lp in outputs if lp is not None),
        metrics=metrics,
    )


def _micro_batch(
    model: PreTrainedModel,
    batch: PreparedBatch,
    group: list[int],
    forward_only: bool,
    per: DatumResults,
    adapter_of: Sequence[str] | None = None,
) -> None:
    """One micro-batch: datums right-padded into rows. Writes the datums' logprobs, loss and ratio
    statistics at their indices.

    No attention mask: in a causal decoder a real position attends only to earlier positions, all
    real, so right padding cannot reach it (position ids are 0.. either way). An explicit mask
    would also cost speed: SDPA then cannot take its causal flash kernel and falls back to one that
    reads a [rows, 1, T, T] mask (bench/engine_ablation.py).

    With `adapter_of`, rows are ordered run by run (stable; the padded width is the same), the
    decoder runs routed by row segments and each run's tokens are projected through its own
    unembedding adapter (lora_rows.py); the context stays open across the backward, which may
    recompute layers."""
    data = batch.data
    device = next(model.parameters()).device
    rows_context: AbstractContextManager[Any] = contextlib.nullcontext()
    runs: list[tuple[str, int]] = []  # (adapter, tokens) in row order
    if adapter_of is not None:
        first_seen = {name: k for k, name in enumerate(dict.fromkeys(adapter_of[i] for i in group))}
        group = sorted(group, key=lambda i: first_seen[adapter_of[i]])
        segments, row = [], 0
        for name in first_seen:
            count = sum(1 for i in group if adapter_of[i] == name)
            segments.append((name, row, row + count))
            runs.append((name, sum(data[i].tokens.shape[0] for i in group if adapter_of[i] == name)))
            row += count
        rows_context = routed(segments)
    lengths = [data[i].tokens.shape[0] for i in group]
    width = max(lengths)
    ids = torch.zeros(len(group), width, dtype=torch.int64)
    for row, i in enumerate(group):
        ids[row, : lengths[row]] = data[i].tokens
    # The real positions of the flattened [rows * width] batch, datum after datum, computed here on
    # the host: indexing with a device-side boolean mask would make the CPU wait for the whole
    # decoder forward (to count the mask) before it could queue the vocabulary projection.
    positions = torch.cat([torch.arange(n) + row * width for row, n in enumerate(lengths)])
    with rows_context:
        hidden = decoder_hidden(model, ids.to(device))
        targets = torch.cat([data[i].targets for i in group]).to(device)
        every = hidden.reshape(-1, hidden.shape[-1])
        flat_hidden = every if len(positions) == every.shape[0] else every.index_select(0, positions.to(device))
        if adapter_of is None:
            logprobs = target_logprobs(model, flat_hidden, targets)
        else:
            pieces, start = [], 0
            for name, count in runs:
                head = functools.partial(routed, [(name, 0, count)])
                end = start + count
                pieces.append(target_logprobs(model, flat_hidden[start:end], targets[start:end], head))
                start = end
            logprobs = torch.cat(pieces)
        terms = rl_losses.OBJECTIVES[batch.loss_fn](
            rl_losses.Batch(
                logprobs=logprobs,
                inputs={
                    name: torch.cat([data[i].inputs[name] for i in group]).to(device) for name in data[group[0]].inputs
                },
                segment=torch.repeat_interleave(torch.arange(len(group)), torch.tensor(lengths)).to(device),
                datums=len(group),
                config=batch.config,
            )
        )
        loss = terms.token_loss.sum()
        if not forward_only:
            loss.backward()
    # One device-to-host copy for the whole micro-batch (logprobs, each datum's loss, the total),
    # read after the backward was queued: reading the loss first made the CPU wait for the forward
    # before it could launch a single backward kernel, and a copy per datum waited once per datum.
    datum_losses = torch.stack([piece.sum() for piece in terms.token_loss.detach().split(lengths)])
    host = torch.cat([logprobs.detach().float(), datum_losses.float(), loss.detach().float().reshape(1)]).cpu()
    total = float(host[-1])
    if not forward_only and not math.isfinite(total):
        # The gradients it added are dropped with the op's (MicroBatcher restores them on any error).
        raise OpInputError(_non_finite_message(batch.loss_fn, terms.token_loss, group, lengths))
    flat = len(logprobs)
    for row, (i, piece) in enumerate(zip(group, host[:flat].split(lengths), strict=True)):
        per.outputs[i] = piece
        per.losses[i] = float(host[flat + row])
    for name, values in (("ratio_mean", terms.ratio_mean), ("clip_fraction", terms.clip_fraction)):
        if values is not None:
            for i, value in zip(group, values.tolist(), strict=True):
                per.stats[name][i] = value


def _sum(values: list[float]) -> float:
    """Exactly rounded, so the total does not depend on the order the micro-batches ran in."""
    return math.fsum(values) if all(math.isfinite(v) for v in values) else sum(values)


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
