"""Many runs' LoRA adapters in one forward pass: each row of the batch goes through its own run's
adapter (issue 8 item 4, "many runs, one GPU").

PEFT applies its *active* adapters to every row, and its mixed-batch path (`adapter_names=`) is
refused in training mode and gathers rows by index. Here the rows of a batch are grouped by run
(contiguous segments along the first dimension), PEFT's own LoRA addition is switched off for the
pass (no active adapter), and each LoRA layer's installed forward (install_forwards) adds
`B_r(A_r(x[rows of r])) * scaling_r` segment by segment in one autograd node (lora_fused.py):
slices, not gathers, and one base matmul for all rows. The same forward serves single-adapter
passes when EngineConfig.lora_kernel is fused. PEFT still owns the adapters' parameters, their
names and the checkpoint format (adapters.py).

The segments live in a context variable, read by the forwards when the layer runs, so they must be
set while autograd may *recompute* a layer too (activation checkpointing replays decoder layers in
backward; logits.py replays the vocabulary projection): callers keep the context open across the
backward and give the projection its own context inside the checkpointed function.
"""

from __future__ import annotations

import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from workers.engine.lora_fused import Piece, lora_linear

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


def _pieces(layer: LoraLinear, x: torch.Tensor, segments: Segments) -> list[Piece]:
    """Segments along x's first dimension, as lora_fused pieces along its flattened rows."""
    per_row = x[0].numel() // x.shape[-1] if x.dim() > 1 else 1
    pieces: list[Piece] = []
    for adapter, start, end in segments:
        weight_a, weight_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        assert isinstance(weight_a, torch.Tensor) and isinstance(weight_b, torch.Tensor)
        pieces.append((weight_a, weight_b, layer.scaling[adapter], start * per_row, end * per_row))
    return pieces


def _plain_adapters(layer: LoraLinear) -> list[str] | None:
    """The active adapters if the fused path computes exactly what PEFT would, else None."""
    if layer.disable_adapters or layer.merged or not isinstance(layer.base_layer, nn.Linear):
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    for name in active:
        dropout = layer.lora_dropout[name]
        if name in layer.lora_variant or (layer.training and not isinstance(dropout, nn.Identity) and dropout.p):
            return None
    return active


def _routed_forward(layer: LoraLinear, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    """Installed as a LoRA layer's forward (RowRouter): the routed segments while `routed(...)` is
    open; otherwise, where `fused` is on and the layer is plain, the active adapter through the
    fused node (lora_fused.py); otherwise PEFT's own forward."""
    base = layer.base_layer
    assert isinstance(base, nn.Linear)
    segments = _segments.get()
    if segments is not None:
        return lora_linear(x, base.weight, base.bias, _pieces(layer, x, segments))
    if getattr(layer, "_tuft_fused", False) and not args and not kwargs:
        active = _plain_adapters(layer)
        if active == []:
            return base(x)
        if active is not None and len(active) == 1:
            rows = x.shape[0] if x.dim() > 1 else 1
            return lora_linear(x, base.weight, base.bias, _pieces(layer, x, ((active[0], 0, rows),)))
    return LoraLinear.forward(layer, x, *args, **kwargs)


def install_forwards(model: nn.Module, fused: bool) -> None:
    """Give every plain LoRA linear layer of `model` the routed forward (idempotent; call after
    adding an adapter, since PEFT may then create new layers). fused: single-adapter passes take the
    fused node too, not only routed ones (EngineConfig.lora_kernel)."""
    for layer in model.modules():
        if type(layer) is LoraLinear and isinstance(layer.base_layer, nn.Linear):
            # Instance attributes, so PEFT's class and other models' layers stay untouched.
            attributes = vars(layer)
            attributes.setdefault("forward", types.MethodType(_routed_forward, layer))
            attributes["_tuft_fused"] = fused


class RowRouter:
    """Switches a pass of a PEFT-wrapped model into routed mode (no PEFT-active adapter; the
    installed forwards add each segment's adapter)."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model

    def _layers(self) -> list[BaseTunerLayer]:
        return [m for m in self._model.modules() if isinstance(m, BaseTunerLayer)]

    def supported(self) -> bool:
        """Only plain LoRA on linear layers is routed (not fused MoE experts, embeddings, DoRA)."""
        layers = self._layers()
        return bool(layers) and all(
            type(m) is LoraLinear
            and "forward" in m.__dict__
            and not m.lora_variant
            and not m.merged
            and not m.disable_adapters
            for m in layers
        )

    @contextmanager
    def batch(self, adapters: Sequence[str]) -> Iterator[None]:
        """While open: no adapter is PEFT-active, exactly `adapters`' parameters take gradients, and
        a pass inside `routed(...)` adds each segment's adapter. Restores PEFT's active adapters."""
        layers = self._layers()
        wanted = set(adapters)
        saved = []
        grads: list[tuple[torch.Tensor, bool]] = []
        for layer in layers:
            assert isinstance(layer, LoraLinear)
            saved.append((layer, layer._active_adapter))
            layer._active_adapter = []
            for name in layer.lora_A:
                trainable = name in wanted
                for weight in (layer.lora_A[name].weight, layer.lora_B[name].weight):
                    assert isinstance(weight, torch.Tensor)
                    grads.append((weight, bool(weight.requires_grad)))
                    weight.requires_grad_(trainable)
        try:
            yield
        finally:
            # Exactly as before, trainability included: AdapterHost.activate switches adapters by
            # flipping only the two adapters concerned, trusting that nobody else changed it.
            for layer, active in saved:
                layer._active_adapter = active
            for weight, requires_grad in grads:
                weight.requires_grad_(requires_grad)
