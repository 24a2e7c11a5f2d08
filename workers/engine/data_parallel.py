"""Data parallelism inside one worker: a forward_backward's datums spread over the GPUs of a host.

docs/architecture.md ("Several GPUs per worker") has the design and the reasons. Rank 0 is the
worker process: it holds a `DataParallelEngine`, which the runner drives like a TorchEngine. Ranks
1..N-1 are processes it spawns (`launch`), each with a TorchEngine of its own on its own GPU (the
base model and every run's adapter replicated), which execute every state-changing call of rank 0,
in the same order:

- forward_backward: each rank runs its share of the datums (`balance`, by tokens) through the
  ordinary engine code; if any rank failed, every rank drops the op's gradients (the op changed
  nothing, as on one GPU); otherwise the op's LoRA gradients are all-reduced (summed: every loss
  is a sum over tokens, so the op's gradient is the sum of its shares'), and rank 0 assembles the
  per-datum outputs and the metrics in the op's datum order, exactly as one process does;
- create_run, drop_run, load_run, optim_step, free_memory, unload_idle_models: every rank makes
  the same call. Equal gradients and weights give equal AdamW updates, so the weights stay equal;
- everything else (save, export, sampling, inspection) runs on rank 0 alone, whose state is the run's.

What a rank runs for one command is in rank_work.py. With `EngineArgs.shard` every rank's engine is
a ShardedEngine (sharded.py): the base model is sharded over the ranks with FSDP2 instead of
replicated, and everything above holds as it is, the passes of a forward_backward run in lockstep.

Commands travel over multiprocessing queues rather than collectives, so an idle follower waits for
the next one without a collective timeout, and rank 0 watches the followers' process handles while
it waits: a rank that died fails the call at once with DeviceFatal (the worker exits; its leases
lapse and its runs move). The failure vote and the gradients go through torch.distributed (NCCL
on GPUs, gloo on the CPU), whose timeout bounds a rank that hangs in a collective.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import socket
import sys
import threading
import time
from datetime import timedelta
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from app.domain.ops import ForwardBackwardOp, LoraConfig, OptimStepOp
from app.domain.results import ForwardBackwardResult, OptimStepResult
from workers.engine.engine import TorchEngine
from workers.engine.errors import DeviceFatal, OpInputError
from workers.engine.losses import DatumResults, assemble
from workers.engine.rank_work import EngineArgs, Failure, balance, execute

__all__ = ["DEFAULT_TIMEOUT_SECONDS", "DataParallelEngine", "EngineArgs", "balance", "launch"]

log = logging.getLogger("tuft.engine")

# Bounds a collective (and a reply) that a live rank never completes. Generous: a forward_backward
# of a large op on a large model legitimately takes minutes.
DEFAULT_TIMEOUT_SECONDS = 900.0
_POLL_SECONDS = 0.1
# The verbs every rank makes (module docstring); forward_backward is the data-parallel one.
MIRRORED = ("create_run", "drop_run", "load_run", "optim_step", "free_memory", "unload_idle_models")


def _follower(
    rank: int,
    world: int,
    init_method: str,
    timeout_s: float,
    args: EngineArgs,
    commands: multiprocessing.Queue,
    replies: multiprocessing.Queue,
) -> None:
    """Rank >= 1: run rank 0's commands until it sends None (or dies: then so do we)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    device = args.rank_device(rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
    )
    engine = args.build(rank)
    while True:
        message = commands.get()
        if message is None:
            break
        verb, payload = message
        failure, value = execute(engine, rank, world, device, verb, payload)
        replies.put((rank, (failure, value)))
        if args.shard and failure is not None and failure.kind == "fatal":
            # Out of step with the other ranks (sharded.py): exit, so that a peer waiting in a
            # collective with us fails now rather than at the timeout.
            replies.close()
            replies.join_thread()
            os._exit(3)
    dist.destroy_process_group()


class DataParallelEngine:
    """Rank 0's engine: a TorchEngine whose state-changing verbs every rank makes (module docstring).

    The runner uses it as it uses a TorchEngine; the verbs not listed here are rank 0's own
    (`__getattr__`). Once a rank has died or a collective failed, every call raises DeviceFatal."""

    def __init__(
        self,
        engine: TorchEngine,
        device: torch.device,
        processes: list[BaseProcess],
        commands: list[multiprocessing.Queue],
        replies: multiprocessing.Queue,
        timeout_s: float,
    ) -> None:
        self.engine = engine
        self.world = len(processes) + 1
        self._device = device
        self._processes = processes
        self._commands = commands
        self._replies = replies
        self._timeout = timeout_s
        self._lock = threading.RLock()
        self._broken: str | None = None
        self._budgets: dict[str, int | None] = {}

    @property
    def pids(self) -> list[int | None]:
        """The followers' process ids, rank 1 first."""
        return [p.pid for p in self._processes]

    def __getattr__(self, name: str) -> Any:
        if name == "engine":  # not set yet (or unpickling): no recursion through ourselves
            raise AttributeError(name)
        return getattr(self.engine, name)

    # -- the runner's verbs ---------------------------------------------------------------------

    def forward_backward(
        self, run_id: str, op: ForwardBackwardOp, micro_batch_tokens: int | None = None
    ) -> ForwardBackwardResult:
        """As TorchEngine.forward_backward, the datums split over the ranks. micro_batch_tokens:
        the budget every rank plans its share with (a replay passes what micro_batch_tokens said)."""
        outcomes = self._everywhere("forward_backward", (run_id, op, micro_batch_tokens))
        n = len(op.data)
        per = DatumResults([None] * n, [0.0] * n, {"ratio_mean": [0.0] * n, "clip_fraction": [0.0] * n})
        budgets = []
        for rows, budget in outcomes:
            for i, logprobs, loss, ratio_mean, clip_fraction in rows:
                per.outputs[i] = torch.from_numpy(logprobs)
                per.losses[i] = loss
                per.stats["ratio_mean"][i] = ratio_mean
                per.stats["clip_fraction"][i] = clip_fraction
            if budget is not None:
                budgets.append(budget)
        # The smallest budget any rank used: a replay that plans every share with it repeats the
        # split of that rank and one no coarser than the others'.
        self._budgets[run_id] = min(budgets) if budgets else None
        return assemble(op.loss_fn, per, range(len(op.data)))

    def forward_backward_many(
        self, items: list[tuple[str, ForwardBackwardOp]]
    ) -> list[ForwardBackwardResult | OpInputError]:
        outcomes: list[ForwardBackwardResult | OpInputError] = []
        for run_id, op in items:
            try:
                outcomes.append(self.forward_backward(run_id, op))
            except OpInputError as exc:
                outcomes.append(exc)
        return outcomes

    def batches_runs(self) -> bool:
        """Multi-run passes are not data-parallel yet: each op is split over the ranks alone."""
        return False

    def micro_batch_tokens(self, run_id: str) -> int | None:
        if not self.engine.has_run(run_id):
            raise KeyError(f"run {run_id!r} is not loaded in this engine")
        return self._budgets.get(run_id)

    def create_run(self, run_id: str, base_model: str, lora: LoraConfig) -> None:
        self._mirror("create_run", run_id, base_model, lora)

    def drop_run(self, run_id: str) -> None:
        self._budgets.pop(run_id, None)
        self._mirror("drop_run", run_id)

    def load_run(self, run_id: str, src: Path, with_optimizer: bool) -> None:
        self._mirror("load_run", run_id, src, with_optimizer)

    def optim_step(self, run_id: str, op: OptimStepOp) -> OptimStepResult:
        result: OptimStepResult = self._mirror("optim_step", run_id, op)
        return result

    def free_memory(self) -> None:
        self._mirror("free_memory")

    def unload_idle_models(self, idle_seconds: float) -> list[str]:
        # Each rank judges idleness by its own clock; a model only a follower kept is only a cache.
        names: list[str] = self._mirror("unload_idle_models", idle_seconds)
        return names

    # -- plumbing -------------------------------------------------------------------------------

    def _mirror(self, verb: str, *payload: Any) -> Any:
        """Every rank makes the call. All succeed, or all fail alike (then rank 0's error is
        raised); ranks that disagree have diverged, which only a restart repairs."""
        assert verb in MIRRORED, verb
        with self._lock:
            self._send(verb, payload)
            mine, value = execute(self.engine, 0, self.world, self._device, verb, payload)
            theirs = self._collect()
        if any((failure is None) != (mine is None) for failure, _ in theirs):
            detail = "; ".join(f"rank {r}: {f.message if f else 'ok'}" for r, (f, _) in enumerate(theirs, 1))
            self._broken = f"ranks diverged on {verb} (rank 0: {mine.message if mine else 'ok'}; {detail})"
            raise DeviceFatal(self._broken)
        if mine is not None:
            raise mine.exception(0)
        return value

    def _everywhere(self, verb: str, payload: tuple) -> list[Any]:
        """A verb whose ranks' failures are voted on inside it: the first failing rank's error is
        raised, else every rank's value is returned, rank 0's first."""
        with self._lock:
            self._send(verb, payload)
            try:
                mine = execute(self.engine, 0, self.world, self._device, verb, payload)
            except RuntimeError as exc:  # a collective failed: a peer died or timed out
                self._check_alive()
                self._broken = f"a collective failed: {exc}"
                raise DeviceFatal(self._broken) from exc
            failure = mine[0]
            if failure is not None and failure.kind == "fatal":
                # Over a sharded model the peers may be waiting in a collective we left: no reply
                # will come, and nothing but a restart brings the ranks back in step.
                self._broken = f"rank 0: {failure.message}"
                raise DeviceFatal(self._broken)
            outcomes = [mine, *self._collect()]
        # The error of a rank that failed by itself, rather than a "peer" rank's echo of it.
        failed = [(rank, f) for rank, (f, _) in enumerate(outcomes) if f is not None]
        for rank, failure in sorted(failed, key=lambda item: item[1].kind == "peer"):
            if failure.kind == "fatal":
                self._broken = f"rank {rank}: {failure.message}"
            raise failure.exception(rank)
        return [value for _, value in outcomes]

    def _send(self, verb: str, payload: tuple) -> None:
        if self._broken is not None:
            raise DeviceFatal(self._broken)
        self._check_alive()
        for commands in self._commands:
            commands.put((verb, payload))

    def _collect(self) -> list[tuple[Failure | None, Any]]:
        got: dict[int, tuple[Failure | None, Any]] = {}
        deadline = time.monotonic() + self._timeout
        while len(got) < len(self._processes):
            try:
                rank, reply = self._replies.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                self._check_alive()
                if time.monotonic() > deadline:
                    self._broken = f"no reply from a rank within {self._timeout:.0f}s"
                    raise DeviceFatal(self._broken) from None
                continue
            got[rank] = reply
        return [got[rank] for rank in sorted(got)]

    def _check_alive(self) -> None:
        for rank, process in enumerate(self._processes, 1):
            if not process.is_alive():
                self._broken = f"rank {rank} (pid {process.pid}) exited with code {process.exitcode}"
                raise DeviceFatal(self._broken)

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the followers and leave the process group (the worker's exit path)."""
        for commands, process in zip(self._commands, self._processes, strict=True):
            if process.is_alive():
                commands.put(None)
        deadline = time.monotonic() + timeout_s
        for process in self._processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(5)
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def launch(args: EngineArgs, world: int, timeout_s: float = DEFAULT_TIMEOUT_SECONDS) -> DataParallelEngine:
    """Start ranks 1..world-1 and join them in a process group; the caller is rank 0. Blocks until
    every rank has joined (their imports take seconds), at most `timeout_s`."""
    if world < 2:
        raise ValueError(f"a data-parallel engine needs at least 2 ranks, got {world}")
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    ctx = multiprocessing.get_context("spawn")
    replies: multiprocessing.Queue = ctx.Queue()
    processes: list[BaseProcess] = []
    commands: list[multiprocessing.Queue] = []
    for rank in range(1, world):
        queue_ = ctx.Queue()
        process = ctx.Process(
            target=_follower,
            args=(rank, world, init_method, timeout_s, args, queue_, replies),
            name=f"tuft-rank-{rank}",
            daemon=True,
        )
        process.start()
        processes.append(process)
        commands.append(queue_)
    device = args.rank_device(0)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, init_method=init_method, rank=0, world_size=world, timeout=timedelta(seconds=timeout_s)
    )
    mode = "base models sharded (FSDP2)" if args.shard else "base models replicated"
    log.info("multi-rank engine: %d ranks on %s, %s (pids %s)", world, args.device, mode, [p.pid for p in processes])
    return DataParallelEngine(args.build(0), device, processes, commands, replies, timeout_s)
