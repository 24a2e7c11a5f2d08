"""A base model sharded over the ranks of a worker with FSDP2 (`worker_shard: fsdp`): each rank
holds 1/N of every decoder layer's frozen weights, so a model larger than one GPU can train.

docs/architecture.md ("Several GPUs per worker") has the design. In short:

- `shard_model`: `fully_shard` on every decoder layer, then on the decoder as the root. The
  embedding, the final norm and the LM head stay whole on every rank (FSDP2's `ignored_params`):
  the engine calls the LM head outside the decoder's forward (chunked logits, logits.py), where an
  FSDP-managed weight would still be a shard, and they are a few percent of a large model.
- PEFT injects each run's LoRA layers after the sharding, as it does on one process: A and B are
  plain tensors that FSDP does not manage, replicated on every rank. So the data-parallel machinery
  (data_parallel.py, rank_work.py) is unchanged on top: each rank runs a share of the datums, the
  LoRA gradients are all-reduced by our code, every rank makes the same optim_step, and rank 0's
  copy of the adapter is the run's (save, export and snapshots need no gathering).
- Every forward through the sharded decoder is a collective (one all-gather per layer, another in
  backward), so the ranks run their micro-batches in lockstep (`LockstepBatcher`): they agree on
  the budget and the checkpointing switch, and a rank with fewer micro-batches (or no datum) runs
  one-token passes until every rank has run as many as the busiest one.
- There is no out-of-memory retry: a rank whose pass fails mid-way (out of memory, a device error)
  has left its peers inside a collective, so it fails with DeviceFatal and the worker restarts.
- Sampling is refused: a decode is a forward per token, which every rank would have to run in
  lockstep; a sharded worker trains, and samples come from a worker that holds the model whole.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from app.domain.ops import ForwardBackwardOp, SampleOp
from app.domain.results import ForwardBackwardResult, SampleResult
from workers.engine.config import on_by_policy
from workers.engine.decode import SampleRequest
from workers.engine.determinism import configure_determinism
from workers.engine.engine import TorchEngine, _Slot
from workers.engine.errors import DeviceFatal, OpInputError
from workers.engine.kernels import apply_fused_kernels
from workers.engine.logits import decoder_hidden
from workers.engine.losses import DatumResults
from workers.engine.memory import activation_checkpointing, free_bytes, token_costs, tokens_that_fit
from workers.engine.microbatch import MicroBatcher, Report, _GradStash, plan

SAMPLING_REFUSED = (
    "sampling is not served by a worker whose base model is sharded over its GPUs (worker_shard: fsdp); "
    "sample on a worker that holds the model whole, from a saved adapter"
)


def shard_model(model: nn.Module, device: torch.device) -> None:
    """Shard `model`'s decoder layers over the default process group (in place), the decoder as
    FSDP's root, and move what stays whole to `device`. The model may sit in host memory: each
    layer reaches the device as this rank's shard only."""
    from torch.distributed.fsdp import fully_shard

    decoder = model.get_decoder()  # type: ignore[operator]
    layers = list(decoder.layers)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    whole = {p for p in model.parameters() if id(p) not in in_layers}
    for layer in layers:
        fully_shard(layer)
    # The root gathers nothing (its own weights are ignored), but it makes the layers one FSDP
    # tree: one lazy init, and each layer's all-gather prefetched while the previous one runs.
    fully_shard(decoder, ignored_params=whole)
    _move_unsharded(model, device)


def _move_unsharded(model: nn.Module, device: torch.device) -> None:
    """Every parameter and buffer that is not a DTensor shard to `device`, tied weights kept tied
    (one new Parameter per old one)."""
    moved: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or isinstance(param, DTensor) or param.device == device:
                continue
            if id(param) not in moved:
                moved[id(param)] = nn.Parameter(param.detach().to(device), requires_grad=param.requires_grad)
            module._parameters[name] = moved[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and not isinstance(buffer, DTensor) and buffer.device != device:
                module._buffers[name] = buffer.to(device)


def gathered_layer_bytes(model: nn.Module) -> int:
    """Bytes of the largest decoder layer's base weights, whole (as FSDP all-gathers them)."""
    layers = model.get_decoder().layers  # type: ignore[operator]
    return max((sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in layers), default=0)


def _agree_max(values: Sequence[int], device: torch.device) -> list[int]:
    flat = torch.tensor(list(values), dtype=torch.int64, device=device)
    dist.all_reduce(flat, op=dist.ReduceOp.MAX)
    return [int(v) for v in flat.tolist()]


class LockstepBatcher(MicroBatcher):
    """MicroBatcher for a sharded model: every rank runs the same number of passes (module
    docstring). An OpInputError of a micro-batch (a non-finite loss, raised after its backward)
    is raised once every rank has finished, so the ranks stay in step; any other error is fatal."""

    def run(
        self,
        lengths: Sequence[int],
        step: Callable[[list[int]], None],
        forward_only: bool,
        budget: int | None = None,
    ) -> Report:
        checkpointing = bool(lengths) and self._checkpointing(lengths, forward_only)
        if budget is None:
            budget = self._budget(forward_only, checkpointing)
        # One rank checkpointing makes all of them (the smaller budget is the safe one either way).
        flag, negative = _agree_max([int(checkpointing), -budget], self.device)
        checkpointing, budget = bool(flag), -negative
        groups = plan(lengths, budget) if lengths else []
        (passes,) = _agree_max([len(groups)], self.device)
        params = [] if forward_only else [p for p in self.model.parameters() if p.requires_grad]
        stash = _GradStash(params)
        error: OpInputError | None = None
        try:
            with activation_checkpointing(self.model, checkpointing and not forward_only):
                for group in groups:
                    try:
                        step(group)
                    except OpInputError as exc:
                        error = error or exc
                for _ in range(passes - len(groups)):
                    self._idle_pass(params, forward_only)
        except BaseException as exc:
            stash.restore()
            raise DeviceFatal(f"a pass through the sharded model failed on this rank, out of step: {exc}") from exc
        if error is not None:
            stash.restore()
            raise error
        stash.commit()
        self.last = Report(budget, checkpointing, len(groups), 0)
        return self.last

    def _memory_budget(self, forward_only: bool, checkpointing: bool) -> int | None:
        """As MicroBatcher's, less the memory of the gathered layers: FSDP holds the running layer
        whole and prefetches the next one, neither of which is allocated when the budget is set."""
        free = free_bytes(self.device)
        if free is None:
            return None
        costs = token_costs(self.model)
        per_token = costs.forward if forward_only else costs.checkpointed if checkpointing else costs.full
        budget = tokens_that_fit(max(0, free - 2 * gathered_layer_bytes(self.model)), per_token)
        cap = self.caps.get(self._mode(forward_only, checkpointing))
        return budget if cap is None else min(budget, cap)

    def _idle_pass(self, params: list[nn.Parameter], forward_only: bool) -> None:
        """A one-token pass: the same collectives as a micro-batch, no effect on the gradients."""
        ids = torch.zeros((1, 1), dtype=torch.int64, device=self.device)
        if forward_only:
            with torch.no_grad():
                decoder_hidden(self.model, ids)
            return
        saved = [p.grad for p in params]
        hidden = decoder_hidden(self.model, ids)
        if hidden.requires_grad:
            hidden.float().sum().mul(0.0).backward()
        for p, grad in zip(params, saved, strict=True):
            p.grad = grad


class ShardedEngine(TorchEngine):
    """A TorchEngine whose base models are sharded over the process group (module docstring).
    Only a rank of the data-parallel engine uses it: every forward is a collective."""

    def _slot(self, base_model: str) -> _Slot:
        if base_model in self._slots or base_model not in self._specs:
            return super()._slot(base_model)
        with self._lock:
            device = self._device
            configure_determinism(device, on_by_policy(self._config.deterministic, device, cuda=False))
            # Load into host memory (the base class loads onto self._device), then shard onto the
            # device layer by layer, so that no rank ever holds the whole model on its GPU.
            self._device = torch.device("cpu")
            try:
                slot = super()._slot(base_model)
            finally:
                self._device = device
            model = slot.loaded.model
            apply_fused_kernels(model, device, self._config.kernels)  # skipped above: it saw the CPU
            shard_model(model, device)
            slot.batcher = LockstepBatcher(model, device, self._config)
            return slot

    def check_op(self, run_id: str, op: ForwardBackwardOp) -> None:
        """Validate a forward_backward without running it (rank_work.py votes on this before any
        rank enters the sharded pass)."""
        with self._lock:
            self._training_pass(run_id, op)

    def forward_backward_share(
        self, run_id: str, op: ForwardBackwardOp, indices: Sequence[int], micro_batch_tokens: int | None = None
    ) -> DatumResults:
        with self._lock:
            per = super().forward_backward_share(run_id, op, indices, micro_batch_tokens)
            if not indices:  # run_datums skipped the batcher; the peers' passes still need ours
                slot = self._slots[self._runs[run_id].base_model]
                with self._autocast():
                    slot.batcher.run([], lambda group: None, op.forward_only, micro_batch_tokens)
            return per

    def shard_bytes(self, base_model: str) -> tuple[int, int]:
        """(bytes of `base_model`'s weights held on this rank, bytes of the whole model)."""
        with self._lock:
            model = self._slot(base_model).loaded.model
            params = list(dict.fromkeys(model.parameters()))  # tied weights once
            local = sum(
                (p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
                for p in params
                if not p.requires_grad
            )
            whole = sum(p.numel() * p.element_size() for p in params if not p.requires_grad)
            return local, whole

    # -- refused ----------------------------------------------------------------------------------

    def serves_samples(self) -> bool:
        """False: the runner claims no sample requests for this engine (a TorchEngine has no such
        method: it serves them); they wait for a worker that samples (Runner._serves_samples)."""
        return False

    def sample(self, base_model: str, adapter: Path | None, op: SampleOp) -> SampleResult:
        raise OpInputError(SAMPLING_REFUSED)

    def sample_many(self, requests: Sequence[SampleRequest]) -> list[SampleResult | OpInputError]:
        return [OpInputError(SAMPLING_REFUSED) for _ in requests]

    def batches_runs(self) -> bool:
        return False

    def forward_backward(
        self, run_id: str, op: ForwardBackwardOp, micro_batch_tokens: int | None = None
    ) -> ForwardBackwardResult:
        # Alone, this rank would wait in the first all-gather for peers that never come.
        raise RuntimeError("a sharded engine runs forward_backward through DataParallelEngine, on every rank")
