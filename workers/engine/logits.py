"""From hidden states to float32 log-probabilities without materialising a [tokens, vocab] matrix.

A 151,936-token vocabulary makes full logits the largest tensor of a step (8 x 2048 tokens would be
10 GB in float32). We run the decoder once, then project to the vocabulary in chunks of tokens; when
gradients are needed each chunk is wrapped in activation checkpointing, so backward recomputes the
chunk's logits instead of keeping them all alive.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

# Elements per chunk of float32 logits (2**26 = 256 MiB; about 440 tokens of a Qwen vocabulary).
_CHUNK_ELEMENTS = 2**26


def decoder_hidden(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    cache: Any = None,
) -> torch.Tensor:
    """Final-layer hidden states [B, T, H] (after the final norm), optionally extending a KV cache."""
    decoder = model.get_decoder()
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if cache is not None:
        kwargs[_cache_kwarg(decoder)] = cache
    out = decoder(**kwargs, use_cache=cache is not None)
    hidden: torch.Tensor = out.last_hidden_state
    return hidden


def _cache_kwarg(decoder: torch.nn.Module) -> str:
    # transformers 5.x renamed `past_key_values` to `cache`; pyproject allows both major versions.
    params = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def project(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Hidden states [..., H] -> float32 logits [..., V], through the (possibly LoRA-wrapped) lm_head."""
    head = model.get_output_embeddings()
    logits = head(hidden).float()
    # Gemma-style models squash logits; honour it so logprobs match the model's own forward.
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def chunk_tokens(vocab_size: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, vocab_size))


def target_logprobs(
    model: PreTrainedModel,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head_context: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
) -> torch.Tensor:
    """log p(targets[i] | hidden[i]) for flat hidden [M, H] and targets [M]; float32 [M].

    head_context: entered around every projection, also the one recomputed in backward (a run's
    adapter routing in a multi-run batch, lora_rows.py), which runs after this call has returned."""

    def chunk_fn(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with head_context():
            logprobs = F.log_softmax(project(model, h), dim=-1)
        return logprobs.gather(-1, t.unsqueeze(-1)).squeeze(-1)

    step = chunk_tokens(model.get_output_embeddings().weight.shape[0])
    pieces: list[torch.Tensor] = []
    for start in range(0, hidden.shape[0], step):
        h, t = hidden[start : start + step], targets[start : start + step]
        if torch.is_grad_enabled():
            pieces.append(checkpoint(chunk_fn, h, t, use_reentrant=False))
        else:
            pieces.append(chunk_fn(h, t))
    if not pieces:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(pieces)


def topk_logprobs(model: PreTrainedModel, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (logprobs, token ids) per row of flat hidden [M, H]; each [M, k], best first."""
    step = chunk_tokens(model.get_output_embeddings().weight.shape[0])
    values: list[torch.Tensor] = []
    indices: list[torch.Tensor] = []
    for start in range(0, hidden.shape[0], step):
        logprobs = F.log_softmax(project(model, hidden[start : start + step]), dim=-1)
        top = torch.topk(logprobs, k, dim=-1)
        values.append(top.values)
        indices.append(top.indices)
    return torch.cat(values), torch.cat(indices)
