"""Device memory for forward_backward: activation size per token, free memory, and the activation
checkpointing switch. microbatch.py turns these into a token budget per micro-batch."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

# Share of the free device memory an auto budget plans to fill: the rest absorbs allocator
# fragmentation and the estimate's error (an OOM is survived anyway, but costs a restart).
MEMORY_FRACTION = 0.8
# Bytes set aside before dividing by the per-token cost: a chunk of float32 logits with its
# log-softmax and gradient (logits.py, 256 MiB each), the op's LoRA gradients, workspace.
FIXED_RESERVE_BYTES = 2 * 2**30


@dataclass(frozen=True)
class TokenCosts:
    """Estimated device bytes per padded token of a micro-batch."""

    full: int  # backward without checkpointing: every layer's saved activations
    checkpointed: int  # each layer keeps only its input; one layer is recomputed at a time
    forward: int  # forward_only: no graph, one layer's activations alive at a time


def token_costs(model: PreTrainedModel) -> TokenCosts:
    """From the model's config. Per pre-norm decoder layer and token, autograd keeps about: the
    residual stream and both norms' inputs/outputs (with float32 upcasts), q/k/v before and after
    their norms and rotary embedding, the attention output and its softmax statistics, and the
    MLP's gate, up, activation and product. Checked against the engine's measured peak on an H100
    (Qwen3-0.6B, 8 x 1024 tokens: 22 GB measured, 23 GB estimated)."""
    cfg = getattr(model.config, "text_config", None) or model.config
    hidden = int(cfg.hidden_size)
    layers = int(cfg.num_hidden_layers)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    inter = int(getattr(cfg, "intermediate_size", None) or 4 * hidden)
    size = next(model.parameters()).element_size()
    q, kv = heads * head_dim, kv_heads * head_dim
    layer = size * (10 * hidden + 6 * q + 6 * kv + 4 * inter) + 4 * 4 * hidden
    head = size * hidden  # final hidden states, kept for the chunked logits' recompute
    return TokenCosts(
        full=layers * layer + head,
        checkpointed=layers * size * hidden + layer + head,
        forward=layer + head,
    )


def free_bytes(device: torch.device) -> int | None:
    """Memory an op can still use on `device`: free on the device plus what torch's caching
    allocator holds unused. None on the CPU, where the budget is fixed instead."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + cached)


def tokens_that_fit(free: int, per_token: int) -> int:
    usable = free * MEMORY_FRACTION - FIXED_RESERVE_BYTES
    return max(1, int(usable // max(1, per_token)))


def release_cached(device: torch.device) -> None:
    """After an OOM: hand the allocator's cached blocks back so the retry starts from a clean slate."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _checkpointing_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if m is not model and hasattr(m, "gradient_checkpointing")]


@contextmanager
def activation_checkpointing(model: PreTrainedModel, on: bool) -> Iterator[None]:
    """Within the block, every decoder layer recomputes its activations during backward (HF's
    checkpointing, use_reentrant=False: no need for inputs that require grad).

    HF checkpoints a layer only while that layer's own `training` flag is set; the engine keeps the
    model in eval mode (no dropout, deterministic replay), so the flag is set on those layer
    modules alone, not recursively, and dropout inside them stays off."""
    if not on:
        yield
        return
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    layers = _checkpointing_layers(model)
    flags = [m.training for m in layers]
    for m in layers:
        m.training = True
    try:
        yield
    finally:
        for m, flag in zip(layers, flags, strict=True):
            m.training = flag
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()
