"""Many runs' LoRA adapters in one forward pass: each row of the batch goes through its own run's
adapter (issue 8 item 4, "many runs, one GPU").

PEFT applies its *active* adapters to every row, and its mixed-batch path (`adapter_names=`) is
refused in training mode and gathers rows by index. Here the rows of a batch are grouped by run
(contiguous segments along the first dimension), PEFT's own LoRA addition is switched off for the
pass (no active adapter), and a forward hook on each LoRA layer adds `B_r(A_r(x[rows of r])) *
scaling_r` segment by segment: slices, not gathers, and one base matmul for all rows. PEFT still
owns the adapters' parameters, their names and the checkpoint format (adapters.py).

The segments live in a context variable, read by the hooks when the layer runs, so they must be
set while autograd may *recompute* a layer too (activation checkpointing replays decoder layers in
backward; logits.py replays the vocabulary projection): callers keep the context open across the
backward and give the projection its own context inside the checkpointed function.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

# (adapter name, first row, end row) along the layer input's first dimension; None: PEFT as usual.
Segments = tuple[tuple[str, int, int], ...]
_segments: ContextVar[Segments | None] = ContextVar("tuft_lora_segments", default=None)


@contextmanager
def routed(segments: Sequence[tuple[str, int, int]]) -> Iterator[None]:
    """Route the LoRA layers' inputs by row segments while the block runs."""
    token = _segments.set(tuple(segments))
    try:
        yield
    finally:
        _segments.reset(token)


def _add_segment_deltas(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
    segments = _segments.get()
    if segments is None:
        return None
    assert isinstance(module, LoraLinear)
    x = args[0]
    # In the activations' dtype (bf16 on a GPU): PEFT casts x to the float32 LoRA weights, runs
    # both matmuls in float32 off the tensor cores, scales the [tokens, out] product and casts it
    # back, which on a small model costs more than the base matmul (bench/engine_ablation.py).
    # Here the small weights are cast instead, the scaling is applied to the [tokens, rank]
    # intermediate, and the last matmul adds into the base output inside the GEMM (addmm).
    # Gradients reach the float32 weights through the casts.
    pieces = []
    for adapter, start, end in segments:
        weight_a = module.lora_A[adapter].weight
        weight_b = module.lora_B[adapter].weight
        assert isinstance(weight_a, torch.Tensor) and isinstance(weight_b, torch.Tensor)
        rows = x[start:end]
        low = F.linear(rows, weight_a.to(rows.dtype)) * module.scaling[adapter]
        pieces.append((low, weight_b.to(rows.dtype)))
    if len(pieces) == 1 and segments[0][1] == 0 and pieces[0][0].shape[0] == output.shape[0]:
        low, weight = pieces[0]
        flat = torch.addmm(output.reshape(-1, output.shape[-1]), low.reshape(-1, low.shape[-1]), weight.t())
        return flat.reshape(output.shape)
    delta = torch.cat([F.linear(low, weight) for low, weight in pieces])
    return output + delta.to(output.dtype)


class RowRouter:
    """Switches a pass of a PEFT-wrapped model into routed mode, hooking its LoRA layers for the
    duration."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model

    def _layers(self) -> list[BaseTunerLayer]:
        return [m for m in self._model.modules() if isinstance(m, BaseTunerLayer)]

    def supported(self) -> bool:
        """Only plain LoRA on linear layers is routed (not fused MoE experts, embeddings, DoRA)."""
        layers = self._layers()
        return bool(layers) and all(
            type(m) is LoraLinear and not m.lora_variant and not m.merged and not m.disable_adapters for m in layers
        )

    @contextmanager
    def batch(self, adapters: Sequence[str]) -> Iterator[None]:
        """While open: no adapter is PEFT-active, exactly `adapters`' parameters take gradients, and
        a pass inside `routed(...)` adds each segment's adapter. Restores PEFT's active adapters."""
        layers = self._layers()
        wanted = set(adapters)
        saved = []
        # Hooked only while the batch is open (its backward, and any recompute, run inside it), so
        # single-run passes never pay for the hook.
        hooks = []
        for layer in layers:
            assert isinstance(layer, LoraLinear)
            hooks.append(layer.register_forward_hook(_add_segment_deltas))
            saved.append((layer, layer._active_adapter))
            layer._active_adapter = []
            for name in layer.lora_A:
                trainable = name in wanted
                layer.lora_A[name].weight.requires_grad_(trainable)
                layer.lora_B[name].weight.requires_grad_(trainable)
        try:
            yield
        finally:
            for layer, active in saved:
                layer._active_adapter = active
            for hook in hooks:
                hook.remove()
