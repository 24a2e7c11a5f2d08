"""The engine's sampling verbs (TorchEngine.sample / sample_many): requests grouped by base model
and adapter, sampler adapters loaded from saved folders (an LRU per model), decoded by decode.py.

TorchEngine owns one Sampler and calls it under its own lock; the Sampler never locks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from app.domain.results import SampleResult
from workers.engine import checkpoint
from workers.engine.adapters import adapter_name_for
from workers.engine.config import EngineConfig, on_by_policy
from workers.engine.decode import SampleJob, SampleRequest, adapter_chunks, decode_batch
from workers.engine.decode_graph import GraphMode
from workers.engine.errors import OpInputError
from workers.engine.lora_rows import RowRouter
from workers.engine.sampling import resolve_max_tokens

if TYPE_CHECKING:
    from workers.engine.engine import _Slot

SAMPLER_ADAPTER_CACHE = 8  # sampler adapters kept loaded (LRU); each costs only its LoRA weights

Outcomes = list[SampleResult | OpInputError | None]


class Sampler:
    """Sampling over the engine's loaded base models.

    config: the engine's current EngineConfig (read on every call, so a changed config applies).
    slot: the engine's loaded model for a base model name (loading it on first use; OpInputError
    for a name the engine does not serve).
    """

    def __init__(self, config: Callable[[], EngineConfig], device: torch.device, slot: Callable[[str], _Slot]) -> None:
        self._config = config
        self._device = device
        self._slot = slot

    def sample_many(self, requests: Sequence[SampleRequest]) -> list[SampleResult | OpInputError]:
        out: Outcomes = [None] * len(requests)
        by_model: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            by_model.setdefault(request.base_model, []).append(i)
        for base_model, indices in by_model.items():
            try:
                slot = self._slot(base_model)
            except OpInputError as exc:
                out = [exc if i in indices else r for i, r in enumerate(out)]
                continue
            for chunk in adapter_chunks([requests[i].adapter for i in indices], indices, SAMPLER_ADAPTER_CACHE):
                self._sample_chunk(slot, base_model, [(i, requests[i]) for i in chunk], out)
        return [r for r in out if r is not None]

    def batches_samples(self) -> bool:
        """Whether the runner should hand the engine several samples at once (EngineConfig)."""
        return on_by_policy(self._config().batch_samples, self._device)

    def graph_mode(self) -> GraphMode:
        """How decode_batch steps (EngineConfig.decode_graphs): captured in CUDA graphs on CUDA,
        the same static step uncaptured on the CPU, or decode.py's own step."""
        policy, cuda = self._config().decode_graphs, self._device.type == "cuda"
        if policy == "off" or (policy == "auto" and not cuda):
            return "off"
        return "capture" if cuda else "eager"

    def _sample_chunk(
        self, slot: _Slot, base_model: str, chunk: list[tuple[int, SampleRequest]], out: Outcomes
    ) -> None:
        jobs: list[tuple[int, SampleJob]] = []
        for i, request in chunk:
            try:
                max_tokens = resolve_max_tokens(request.op, slot.loaded.vocab_size, slot.loaded.spec.max_model_len)
                name = None if request.adapter is None else self.adapter(slot, base_model, Path(request.adapter))
            except OpInputError as exc:
                out[i] = exc
                continue
            jobs.append((i, SampleJob(request.op, max_tokens, name)))
        # Base-model requests decode as a batch of their own: routing adds an adapter to every row.
        self._decode(slot, [(i, j) for i, j in jobs if j.adapter is None], None, out)
        tuned = [(i, j) for i, j in jobs if j.adapter is not None]
        names = sorted({job.adapter for _, job in tuned if job.adapter is not None})
        if len(names) > 1:
            # Rows are routed through their adapters when every LoRA layer is a plain linear one;
            # otherwise each adapter's requests decode as a batch of their own.
            slot.host.activate(names[0])
            if not slot.router.supported():
                for name in names:
                    self._decode(slot, [(i, j) for i, j in tuned if j.adapter == name], None, out)
                return
        self._decode(slot, tuned, slot.router if len(names) > 1 else None, out)

    def _decode(self, slot: _Slot, jobs: list[tuple[int, SampleJob]], router: RowRouter | None, out: Outcomes) -> None:
        if not jobs:
            return
        results = decode_batch(
            slot.loaded, [job for _, job in jobs], slot.host.activate, router, self.graph_mode(), slot.decode
        )
        for (i, _), result in zip(jobs, results, strict=True):
            out[i] = result

    def adapter(self, slot: _Slot, base_model: str, folder: Path) -> str:
        """The name of the sampler adapter loaded from `folder` (loading it, LRU-evicting another)."""
        weights_file = folder / checkpoint.ADAPTER_WEIGHTS
        try:
            stat = weights_file.stat()
        except FileNotFoundError:
            raise OpInputError(f"no adapter weights at {folder}") from None
        key = (str(folder.resolve()), stat.st_mtime_ns, stat.st_size)
        name = slot.samplers.get(key)
        if name is not None:
            slot.samplers.move_to_end(key)
            return name
        if (folder / checkpoint.RUN_FILE).is_file():
            saved_base, _ = checkpoint.read_checkpoint_config(folder)
            if saved_base != base_model:
                raise OpInputError(f"adapter {folder} was trained on {saved_base!r}, not {base_model!r}")
        config = checkpoint.read_adapter_config(folder)
        weights = checkpoint.read_adapter_weights(folder)
        name = adapter_name_for("s", repr(key))
        try:
            # PEFT raises ValueError for target modules this model does not have.
            slot.host.add(name, config, seed=0)
        except ValueError as exc:
            slot.host.remove(name)
            raise OpInputError(f"adapter {folder} does not fit {base_model}: {exc}") from None
        try:
            slot.host.load_state(name, weights)
        except BaseException:
            slot.host.remove(name)
            raise
        slot.samplers[key] = name
        while len(slot.samplers) > SAMPLER_ADAPTER_CACHE:
            _, evicted = slot.samplers.popitem(last=False)
            slot.decode.forget(evicted)  # graphs reading its weights go before the weights do
            slot.host.remove(evicted)
        return name
