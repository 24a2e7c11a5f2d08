"""TorchEngine: the verbs the worker runner calls, over torch + transformers + peft.

One base model instance per `ModelSpec`, loaded on first use and shared by every run on it; each run
is a LoRA adapter on that model plus its own AdamW. Calls are serialised by a lock: runs share the
model's modules (the active adapter is global state), so two ops must never interleave.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

import peft
import torch
from torch import nn

from app.domain.models import ModelSpec
from app.domain.ops import ForwardBackwardOp, LoraConfig, OptimStepOp, SampleOp
from app.domain.results import ForwardBackwardResult, OptimStepResult, SampleResult
from workers.engine import checkpoint
from workers.engine.adapters import AdapterHost, adapter_name_for, peft_config_for
from workers.engine.base_models import LoadedModel, config_vocab_size, load_base_model, resolve_dtype
from workers.engine.config import EngineConfig, on_by_policy
from workers.engine.decode import SampleRequest
from workers.engine.decode_state import DecodeStates, cache_limit
from workers.engine.determinism import configure_determinism
from workers.engine.errors import OpInputError, translate_device_errors
from workers.engine.kernels import apply_fused_kernels
from workers.engine.lora_rows import RowRouter
from workers.engine.losses import DatumResults, PreparedBatch, prepare_data, run_datums, run_loss
from workers.engine.microbatch import MicroBatcher, Report
from workers.engine.multi_run import RunBatch, run_together, shareable
from workers.engine.optim import adam_step, new_optimizer, validate_adam
from workers.engine.sampler import Sampler

P = ParamSpec("P")
R = TypeVar("R")


def _serialised(fn: Callable[Concatenate[TorchEngine, P], R]) -> Callable[Concatenate[TorchEngine, P], R]:
    translated = translate_device_errors(fn)

    @functools.wraps(fn)
    def wrapper(self: TorchEngine, *args: P.args, **kwargs: P.kwargs) -> R:
        with self._lock:
            return translated(self, *args, **kwargs)

    return wrapper


@dataclass
class _Run:
    run_id: str
    base_model: str
    lora: LoraConfig
    adapter: str
    params: dict[str, nn.Parameter]  # by PEFT key, sorted: the optimizer's parameter order
    optimizer: torch.optim.AdamW
    peft_config: peft.LoraConfig  # its targets were derived from the model (lora_targets.py)
    steps: int = 0
    # The budget the last forward_backward's micro-batches were planned with (recorded with the op
    # so that a replay splits it the same way: the split decides the float rounding).
    micro_batch_tokens: int | None = None


@dataclass(frozen=True)
class RunExport:
    """A run's training state, copied off the device (see TorchEngine.export_run)."""

    base_model: str
    lora: LoraConfig
    weights: dict[str, torch.Tensor]
    optimizer_state: dict[str, torch.Tensor]
    optimizer_steps: int
    peft_config: peft.LoraConfig


@dataclass
class _Slot:
    loaded: LoadedModel
    host: AdapterHost
    # (adapter folder, mtime_ns, size) -> adapter name: a re-saved folder is a different adapter.
    samplers: OrderedDict[tuple[str, int, int], str]
    # forward_backward's micro-batching; remembers the budget that worked on this model.
    batcher: MicroBatcher
    # Routes rows of a multi-run forward_backward through their runs' adapters (lora_rows.py).
    router: RowRouter
    # The static decode step's buffers and captured graphs, kept across sample calls (decode_state.py).
    decode: DecodeStates
    # Monotonic time of the last call that used the model: an idle model with no run on it is
    # unloaded (unload_idle_models), so a worker does not keep every model it ever served.
    last_used: float = 0.0


class TorchEngine:
    """Training and sampling for LoRA runs on the configured base models.

    Errors: OpInputError for invalid ops (state unchanged), OutOfMemory, DeviceFatal; an unknown
    run id is a caller bug and raises KeyError.
    """

    def __init__(
        self,
        models: list[ModelSpec],
        device: str = "cpu",
        cache_dir: Path | None = None,
        dtype: str | None = None,
        config: EngineConfig | None = None,
    ) -> None:
        """Nothing is loaded here (models load on first use), so constructing an engine is cheap.

        cache_dir holds derived files (the built-in tokenizer); None means ~/.cache/tuft.
        dtype: "float32" | "bfloat16" | "float16" for base weights; None picks float32 on CPU and
        bfloat16 elsewhere. LoRA weights and optimizer state are always float32.
        config: micro-batching and activation checkpointing (EngineConfig's defaults if None).
        """
        self._config = config or EngineConfig()
        self._specs = {spec.model_name: spec for spec in models}
        self._device = torch.device(device)
        self._dtype = resolve_dtype(dtype, self._device)
        self._cache_dir = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "tuft"
        self._slots: dict[str, _Slot] = {}
        self._runs: dict[str, _Run] = {}
        self._lock = threading.RLock()
        self._sampler = Sampler(lambda: self._config, self._device, self._slot)

    # -- models -------------------------------------------------------------------------------

    def _spec(self, base_model: str) -> ModelSpec:
        try:
            return self._specs[base_model]
        except KeyError:
            raise OpInputError(f"unknown base model {base_model!r}; served: {sorted(self._specs)}") from None

    def _slot(self, base_model: str) -> _Slot:
        spec = self._spec(base_model)
        slot = self._slots.get(base_model)
        if slot is None:
            configure_determinism(self._device, on_by_policy(self._config.deterministic, self._device, cuda=False))
            loaded = load_base_model(spec, self._device, self._dtype, self._cache_dir)
            apply_fused_kernels(loaded.model, self._device, self._config.kernels)
            slot = _Slot(
                loaded=loaded,
                host=AdapterHost(loaded.model, fused=self._config.lora_kernel != "peft"),
                samplers=OrderedDict(),
                batcher=MicroBatcher(loaded.model, self._device, self._config),
                router=RowRouter(loaded.model),
                decode=DecodeStates(cache_limit(self._config.decode_cache_bytes, self._device)),
            )
            self._slots[base_model] = slot
        slot.last_used = time.monotonic()
        return slot

    def _run(self, run_id: str) -> _Run:
        try:
            return self._runs[run_id]
        except KeyError:
            raise KeyError(f"run {run_id!r} is not loaded in this engine") from None

    @_serialised
    def vocab_size(self, base_model: str) -> int:
        slot = self._slots.get(base_model)
        return slot.loaded.vocab_size if slot else config_vocab_size(self._spec(base_model))

    # -- runs ---------------------------------------------------------------------------------

    @_serialised
    def create_run(self, run_id: str, base_model: str, lora: LoraConfig) -> None:
        """Add a LoRA adapter (and its AdamW) for `run_id`; a no-op if it exists with this config."""
        existing = self._runs.get(run_id)
        if existing is not None:
            if existing.base_model == base_model and existing.lora == lora:
                return
            raise OpInputError(f"run {run_id!r} already exists with a different base model or LoRA config")
        spec = self._spec(base_model)
        if lora.rank > spec.max_lora_rank:
            raise OpInputError(f"LoRA rank {lora.rank} exceeds {base_model}'s max_lora_rank {spec.max_lora_rank}")
        slot = self._slot(base_model)
        config = peft_config_for(lora, slot.loaded.model)  # validates rank >= 1 and coverage
        name = adapter_name_for("r", run_id)
        slot.host.add(name, config, seed=lora.seed if lora.seed is not None else 0)
        params = slot.host.params(name)
        optimizer = new_optimizer(list(params.values()))
        self._runs[run_id] = _Run(run_id, base_model, lora, name, params, optimizer, config)

    @_serialised
    def has_run(self, run_id: str) -> bool:
        return run_id in self._runs

    @_serialised
    def drop_run(self, run_id: str) -> None:
        run = self._runs.pop(run_id, None)
        if run is None:
            return
        run.optimizer.state.clear()
        self._slots[run.base_model].host.remove(run.adapter)
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    @_serialised
    def pending_gradients(self, run_id: str) -> bool:
        """True if forward_backward accumulated gradients that no optim_step has consumed yet:
        a snapshot taken now would lose them, so eviction does not snapshot such a run."""
        return any(p.grad is not None for p in self._run(run_id).params.values())

    # -- memory -------------------------------------------------------------------------------

    @_serialised
    def loaded_models(self) -> list[str]:
        return sorted(self._slots)

    @_serialised
    def unload_idle_models(self, idle_seconds: float) -> list[str]:
        """Unload every base model that no run uses and that nothing used for `idle_seconds`
        (0: every model without a run); it loads again on its next use. Returns their names."""
        in_use = {run.base_model for run in self._runs.values()}
        cutoff = time.monotonic() - idle_seconds
        idle = [name for name, slot in self._slots.items() if name not in in_use and slot.last_used <= cutoff]
        for name in idle:
            del self._slots[name]
        if idle:
            self._release_cached()
        return idle

    @_serialised
    def free_memory(self) -> None:
        """After an out-of-memory error: drop everything that is only a cache (models without a
        run, sampler adapters, the decode step's buffers and graphs) and hand the allocator's
        cached blocks back to the device."""
        for name in [n for n in self._slots if n not in {r.base_model for r in self._runs.values()}]:
            del self._slots[name]
        for slot in self._slots.values():
            slot.decode.clear()
            while slot.samplers:
                _, adapter = slot.samplers.popitem(last=False)
                slot.host.remove(adapter)
        self._release_cached()

    def _release_cached(self) -> None:
        gc.collect()  # the model's modules hold reference cycles; free them before empty_cache
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    # -- training -----------------------------------------------------------------------------

    @_serialised
    def forward_backward(
        self, run_id: str, op: ForwardBackwardOp, micro_batch_tokens: int | None = None
    ) -> ForwardBackwardResult:
        """Per-token logprobs of every datum and the op's loss (docs/losses.md), summed over tokens;
        unless forward_only, gradients are *added* to the run's .grad (accumulated until optim_step).

        micro_batch_tokens: plan the micro-batches with this budget instead of the configured or
        memory-derived one (a replay passes what `micro_batch_tokens(run_id)` said the first time)."""
        return self._forward_backward(run_id, op, micro_batch_tokens)

    def _training_pass(self, run_id: str, op: ForwardBackwardOp) -> tuple[_Run, _Slot, PreparedBatch]:
        """Validate the op and make the run's adapter the trainable one (raises OpInputError first)."""
        run = self._run(run_id)
        slot = self._slot(run.base_model)
        data = prepare_data(op, slot.loaded.vocab_size, slot.loaded.spec.max_model_len)
        slot.host.activate(run.adapter, trainable=True)
        run.micro_batch_tokens = None
        return run, slot, data

    def _forward_backward(
        self, run_id: str, op: ForwardBackwardOp, micro_batch_tokens: int | None = None
    ) -> ForwardBackwardResult:
        run, slot, data = self._training_pass(run_id, op)
        with self._autocast():
            result = run_loss(slot.loaded.model, data, op.forward_only, slot.batcher, micro_batch_tokens)
        assert slot.batcher.last is not None
        run.micro_batch_tokens = slot.batcher.last.budget_tokens
        return result

    @_serialised
    def forward_backward_share(
        self, run_id: str, op: ForwardBackwardOp, indices: Sequence[int], micro_batch_tokens: int | None = None
    ) -> DatumResults:
        """forward_backward's work on the datums at `indices` only (one rank's share of the op,
        data_parallel.py), not reduced: per-datum results at the op's indices, gradients added to
        .grad as forward_backward adds them. The whole op is validated, so every rank fails alike."""
        run, slot, data = self._training_pass(run_id, op)
        with self._autocast():
            per = run_datums(slot.loaded.model, data, op.forward_only, slot.batcher, micro_batch_tokens, only=indices)
        run.micro_batch_tokens = slot.batcher.last.budget_tokens if indices and slot.batcher.last else None
        return per

    @_serialised
    def trainable_parameters(self, run_id: str) -> list[nn.Parameter]:
        """The run's LoRA parameters in the optimizer's order (data_parallel.py reduces their .grad)."""
        return list(self._run(run_id).params.values())

    @_serialised
    def forward_backward_many(
        self, items: list[tuple[str, ForwardBackwardOp]]
    ) -> list[ForwardBackwardResult | OpInputError]:
        """forward_backward for ops of different runs, one outcome per op in order: its result, or
        the OpInputError it failed with (that op changed nothing; the others are unaffected).

        Ops of runs on one base model with the same loss, config and forward_only go through one
        pass, each row with its own run's adapter (multi_run.py), when `batches_runs()`; the rest,
        and every op of a batch in which one op failed, run one by one as forward_backward would.
        Each run's gradients and results are those it would get alone, within the float rounding
        of the shared matmuls."""
        outcomes: list[ForwardBackwardResult | OpInputError | None] = [None] * len(items)
        groups: dict[tuple[str, bool], list[tuple[int, RunBatch]]] = {}
        for index, (run_id, op) in enumerate(items):
            run = self._run(run_id)
            slot = self._slot(run.base_model)
            try:
                prepared = prepare_data(op, slot.loaded.vocab_size, slot.loaded.spec.max_model_len)
            except OpInputError as exc:
                outcomes[index] = exc
                continue
            groups.setdefault((run.base_model, op.forward_only), []).append((index, RunBatch(run.adapter, prepared)))
        for (base_model, forward_only), members in groups.items():
            slot = self._slots[base_model]
            batches = [member for _, member in members]
            together = self.batches_runs() and len(members) > 1 and shareable(batches) and slot.router.supported()
            if together:
                try:
                    with self._autocast():
                        results = run_together(slot.loaded.model, slot.router, slot.batcher, batches, forward_only)
                except OpInputError:
                    together = False  # rolled back whole: each op runs again alone below
                else:
                    budget = slot.batcher.last.budget_tokens if slot.batcher.last else None
                    for (index, _), result in zip(members, results, strict=True):
                        outcomes[index] = result
                        self._run(items[index][0]).micro_batch_tokens = budget
            if not together:
                for index, _ in members:
                    try:
                        outcomes[index] = self._forward_backward(*items[index])
                    except OpInputError as exc:
                        outcomes[index] = exc
        return [outcome for outcome in outcomes if outcome is not None]

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        """forward_backward's matmuls in the base weights' dtype on CUDA (EngineConfig.autocast)."""
        policy = self._config.autocast
        low = self._dtype in (torch.bfloat16, torch.float16)
        if policy == "off" or self._device.type != "cuda" or (policy == "auto" and not low):
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self._dtype if low else torch.bfloat16)

    def batches_runs(self) -> bool:
        """Whether forward_backward_many shares passes between runs. "auto": on CUDA, where a pass
        of many short ops costs little more than one; on the CPU each op runs alone, so a replay
        after a crash, which runs ops one by one, reproduces the served result bit for bit there."""
        return on_by_policy(self._config.batch_runs, self._device)

    @_serialised
    def micro_batch_tokens(self, run_id: str) -> int | None:
        """The budget the run's last forward_backward was planned with (None before one)."""
        return self._run(run_id).micro_batch_tokens

    @_serialised
    def micro_batch_report(self, base_model: str) -> Report | None:
        """How the last forward_backward on `base_model` was split (budget, checkpointing, OOM
        retries); None before the first. For benchmarks and logs."""
        slot = self._slots.get(base_model)
        return None if slot is None else slot.batcher.last

    @_serialised
    def optim_step(self, run_id: str, op: OptimStepOp) -> OptimStepResult:
        run = self._run(run_id)
        validate_adam(op.adam)
        grad_norm = adam_step(run.optimizer, list(run.params.values()), op.adam)
        run.steps += 1
        return OptimStepResult(
            metrics={
                "grad_norm": grad_norm,
                "learning_rate": op.adam.learning_rate,
                "optimizer_step": float(run.steps),
            }
        )

    @_serialised
    def optimizer_steps(self, run_id: str) -> int:
        return self._run(run_id).steps

    # -- checkpoints --------------------------------------------------------------------------

    @_serialised
    def save_run(self, run_id: str, dest: Path, with_optimizer: bool) -> int:
        """Write the run as a PEFT adapter folder (+ optimizer state) into empty folder `dest`."""
        run = self._run(run_id)
        return checkpoint.write_checkpoint(
            Path(dest),
            base_model=run.base_model,
            lora=run.lora,
            peft_config=run.peft_config,
            weights={key: p.detach() for key, p in run.params.items()},
            optimizer_state=checkpoint.optimizer_tensors(run.optimizer, run.params) if with_optimizer else None,
            optimizer_steps=run.steps if with_optimizer else 0,
        )

    @_serialised
    def load_run(self, run_id: str, src: Path, with_optimizer: bool) -> None:
        """Replace the run's adapter weights (and optimizer state + step count if with_optimizer)
        with the checkpoint's. Without the optimizer, AdamW restarts from scratch (step 0).
        Pending gradients are discarded either way."""
        run = self._run(run_id)
        src = Path(src)
        base_model, lora = checkpoint.read_checkpoint_config(src)
        if base_model != run.base_model:
            raise OpInputError(f"checkpoint is for base model {base_model!r}, the run uses {run.base_model!r}")
        if (lora.rank, lora.train_attn, lora.train_mlp, lora.train_unembed) != (
            run.lora.rank,
            run.lora.train_attn,
            run.lora.train_mlp,
            run.lora.train_unembed,
        ):
            raise OpInputError(f"checkpoint LoRA config {lora} does not match the run's {run.lora}")
        host = self._slots[run.base_model].host
        weights = checkpoint.read_adapter_weights(src)
        host.check_state(run.adapter, weights)
        optimizer = new_optimizer(list(run.params.values()))
        steps = 0
        if with_optimizer:
            # Restored into a fresh optimizer first, so a bad file leaves the run's optimizer intact.
            checkpoint.restore_optimizer(optimizer, run.params, checkpoint.read_optimizer_state(src))
            steps = checkpoint.read_optimizer_steps(src)
        host.load_state(run.adapter, weights)
        for param in run.params.values():
            param.grad = None
        run.optimizer, run.steps = optimizer, steps

    @_serialised
    def export_run(self, run_id: str) -> RunExport:
        """CPU copies of everything a recovery snapshot holds. This is the only part of a snapshot
        that holds the engine; `write_export` can then run on another thread while ops go on."""
        run = self._run(run_id)
        return RunExport(
            base_model=run.base_model,
            lora=run.lora,
            weights={key: p.detach().to("cpu", copy=True) for key, p in run.params.items()},
            optimizer_state={
                k: v.detach().to("cpu", copy=True)
                for k, v in checkpoint.optimizer_tensors(run.optimizer, run.params).items()
            },
            optimizer_steps=run.steps,
            peft_config=run.peft_config,
        )

    @staticmethod
    def write_export(export: RunExport, dest: Path) -> int:
        """Write an export in the checkpoint format (load_run(..., with_optimizer=True) reads it)."""
        return checkpoint.write_checkpoint(
            Path(dest),
            base_model=export.base_model,
            lora=export.lora,
            peft_config=export.peft_config,
            weights=export.weights,
            optimizer_state=export.optimizer_state,
            optimizer_steps=export.optimizer_steps,
        )

    @staticmethod
    def read_checkpoint_config(src: Path) -> tuple[str, LoraConfig]:
        return checkpoint.read_checkpoint_config(Path(src))

    # -- inspection (recovery checks, tests) ---------------------------------------------------

    @_serialised
    def adapter_state(self, run_id: str) -> dict[str, torch.Tensor]:
        """CPU copies of the run's LoRA weights by PEFT key."""
        return {key: p.detach().to("cpu", copy=True) for key, p in self._run(run_id).params.items()}

    @_serialised
    def adapter_grads(self, run_id: str) -> dict[str, torch.Tensor | None]:
        """CPU copies of the run's accumulated gradients (None where none accumulated)."""
        return {
            key: None if p.grad is None else p.grad.detach().to("cpu", copy=True)
            for key, p in self._run(run_id).params.items()
        }

    @_serialised
    def state_digest(self, run_id: str) -> str:
        """sha256 over the run's weights, optimizer state and step count: equal digests mean a
        bitwise-identical training state (what crash recovery must reproduce)."""
        run = self._run(run_id)
        digest = hashlib.sha256(f"steps={run.steps}".encode())
        tensors = {f"w/{k}": p.detach() for k, p in run.params.items()}
        tensors.update({f"o/{k}": v for k, v in checkpoint.optimizer_tensors(run.optimizer, run.params).items()})
        for key in sorted(tensors):
            value = tensors[key].detach().to("cpu").contiguous()
            digest.update(f"{key}:{value.dtype}:{list(value.shape)}".encode())
            # Raw bytes via a uint8 view: numpy has no bfloat16, and 0-d tensors (Adam's step) can't be viewed.
            digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    # -- sampling (sampler.py) ------------------------------------------------------------------

    @_serialised
    def sample(self, base_model: str, adapter: Path | None, op: SampleOp) -> SampleResult:
        """Sample from the base model (adapter None) or from a saved adapter folder."""
        result = self._sampler.sample_many([SampleRequest(base_model, adapter, op)])[0]
        if isinstance(result, OpInputError):
            raise result
        return result

    @_serialised
    def sample_many(self, requests: Sequence[SampleRequest]) -> list[SampleResult | OpInputError]:
        """Run many sample requests, decoded together per base model (decode.py); one result per
        request, in order. A request that is invalid gets its OpInputError and fails alone."""
        return self._sampler.sample_many(requests)

    def batches_samples(self) -> bool:
        """Whether the runner should hand this engine several samples at once (EngineConfig)."""
        return self._sampler.batches_samples()
