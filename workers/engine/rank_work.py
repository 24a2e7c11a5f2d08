"""What every rank of the data-parallel engine runs for one command (data_parallel.py drives it):
the share of a forward_backward, the gradient all-reduce, the other verbs as they are, and
failures in a form that crosses a process boundary."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from app.domain.models import ModelSpec
from app.domain.ops import ForwardBackwardOp
from workers.engine.config import EngineConfig
from workers.engine.engine import TorchEngine
from workers.engine.errors import DeviceFatal, OpInputError, OutOfMemory
from workers.engine.losses import DatumResults
from workers.engine.sharded import ShardedEngine


def balance(lengths: Sequence[int], ranks: int) -> list[list[int]]:
    """Datum indices per rank: longest first, each to the rank with the fewest tokens so far (ties:
    the lowest rank), so the ranks finish together; each share in the op's order."""
    loads = [0] * ranks
    shares: list[list[int]] = [[] for _ in range(ranks)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        rank = min(range(ranks), key=lambda r: (loads[r], r))
        shares[rank].append(i)
        loads[rank] += lengths[i]
    return [sorted(share) for share in shares]


@dataclass(frozen=True)
class EngineArgs:
    """What every rank builds its TorchEngine from. device "cuda": rank r uses cuda:r (the worker
    set CUDA_VISIBLE_DEVICES to its GPUs, so r indexes its --gpus list)."""

    models: list[ModelSpec]
    device: str = "cpu"
    cache_dir: Path | None = None
    dtype: str | None = None
    config: EngineConfig | None = None
    shard: bool = False  # the base models sharded over the ranks with FSDP2 (sharded.py)

    def rank_device(self, rank: int) -> torch.device:
        return torch.device(f"cuda:{rank}") if self.device == "cuda" else torch.device(self.device)

    def build(self, rank: int) -> TorchEngine:
        device = self.rank_device(rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        kind = ShardedEngine if self.shard else TorchEngine
        return kind(self.models, device=str(device), cache_dir=self.cache_dir, dtype=self.dtype, config=self.config)


@dataclass(frozen=True)
class Failure:
    """An exception as it crosses a process boundary (tracebacks and torch types do not pickle well)."""

    kind: str  # "input" | "oom" | "fatal" | "key" | "peer" (another rank failed) | "other"
    message: str

    @staticmethod
    def of(exc: BaseException) -> Failure:
        kinds = ((OpInputError, "input"), (OutOfMemory, "oom"), (DeviceFatal, "fatal"), (KeyError, "key"))
        kind = next((k for cls, k in kinds if isinstance(exc, cls)), "other")
        text = exc.args[0] if kind == "key" and exc.args else str(exc)
        return Failure(kind, text if kind != "other" else f"{type(exc).__name__}: {exc}")

    def exception(self, rank: int) -> Exception:
        where = "" if rank == 0 else f" (on rank {rank})"
        classes: dict[str, type[Exception]] = {"input": OpInputError, "oom": OutOfMemory, "fatal": DeviceFatal}
        if self.kind == "key":
            return KeyError(self.message)
        return classes.get(self.kind, RuntimeError)(self.message + where)


# One rank's share of a forward_backward: (datum index, logprobs, loss, ratio_mean, clip_fraction).
Rows = list[tuple[int, np.ndarray, float, float, float]]


def forward_backward_share(
    engine: TorchEngine,
    rank: int,
    world: int,
    device: torch.device,
    run_id: str,
    op: ForwardBackwardOp,
    budget: int | None,
) -> tuple[Failure | None, Rows, int | None]:
    """This rank's part of a forward_backward; the same collectives, in the same order, on every rank.

    Over a sharded model (sharded.py) the pass itself is collectives, so the ranks first vote on
    whether the op is valid everywhere, and a failure inside the pass other than an invalid op
    (which the batcher raises only once every rank is through) is fatal, with no vote: the peers
    may be waiting in a collective that this rank will never join."""
    share = balance([len(d.tokens) for d in op.data], world)[rank]
    lockstep = isinstance(engine, ShardedEngine)
    failure: Failure | None = None
    params: list[nn.Parameter] = []
    per: DatumResults | None = None
    try:
        params = [] if op.forward_only else engine.trainable_parameters(run_id)
        if isinstance(engine, ShardedEngine):
            engine.check_op(run_id, op)
    except Exception as exc:
        failure = Failure.of(exc)
    if lockstep and _vote(failure, device):
        return failure or Failure("peer", "another rank refused the op"), [], None
    # The op accumulates into fresh gradients, so that only its own are summed across ranks (the
    # earlier ones already were) and a failure anywhere drops them whole.
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    if failure is None:
        try:
            per = engine.forward_backward_share(run_id, op, share, budget)
        except Exception as exc:
            failure = Failure.of(exc)
    out_of_step = lockstep and failure is not None and failure.kind != "input"
    if out_of_step:
        failure = Failure("fatal", failure.message if failure else "")
    if out_of_step or _vote(failure, device):
        for p, grad in zip(params, saved, strict=True):
            p.grad = grad
        return failure, [], None
    if params:
        sum_gradients(params)
        for p, grad in zip(params, saved, strict=True):
            if grad is not None:
                p.grad = grad if p.grad is None else grad.add_(p.grad)
    assert per is not None
    rows: Rows = []
    for i in share:
        logprobs = per.outputs[i]
        assert logprobs is not None
        stats = per.stats
        rows.append((i, logprobs.numpy(), per.losses[i], stats["ratio_mean"][i], stats["clip_fraction"][i]))
    return None, rows, engine.micro_batch_tokens(run_id) if share else None


def _vote(failure: Failure | None, device: torch.device) -> bool:
    """Whether any rank failed (an all-reduce of a failure flag)."""
    vote = torch.tensor([0.0 if failure is None else 1.0], device=device)
    dist.all_reduce(vote, op=dist.ReduceOp.MAX)
    return float(vote) > 0


def sum_gradients(params: list[nn.Parameter]) -> None:
    """All-reduce (sum) the parameters' .grad in one flat buffer. A rank whose share gave a
    parameter no gradient (an empty share) contributes zeros; a per-parameter count rides along,
    so a parameter that no rank's share reached keeps grad None, as in one process."""
    flat = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
        + [torch.tensor([0.0 if p.grad is None else 1.0 for p in params], device=params[0].device)]
    )
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    counts = flat[-len(params) :].tolist()
    offset = 0
    for p, count in zip(params, counts, strict=True):
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype) if count > 0 else None
        offset += n


def execute(engine: TorchEngine, rank: int, world: int, device: torch.device, verb: str, payload: tuple) -> Any:
    """One command on one rank: (failure, value). Followers return no values of mirrored verbs."""
    if verb == "forward_backward":
        failure, rows, budget = forward_backward_share(engine, rank, world, device, *payload)
        return failure, (rows, budget)
    try:
        value = getattr(engine, verb)(*payload)
    except Exception as exc:
        return Failure.of(exc), None
    return None, value if rank == 0 else None
