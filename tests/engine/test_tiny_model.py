"""The built-in model is a fixed function: same weights in every build, process and machine."""

from __future__ import annotations

import hashlib

import torch
from transformers import Qwen3ForCausalLM

from app.domain.models import TINY_MAX_MODEL_LEN, TINY_VOCAB_SIZE
from workers.engine import build_tiny_model


def _digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_two_builds_are_bitwise_identical_and_leave_global_rng_alone() -> None:
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    a = build_tiny_model()
    assert torch.equal(torch.get_rng_state(), rng_before)
    torch.manual_seed(999)  # a different global RNG state must not matter
    b = build_tiny_model()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert _digest(a) == _digest(b)


def test_architecture() -> None:
    model = build_tiny_model()
    assert isinstance(model, Qwen3ForCausalLM)
    cfg = model.config
    assert cfg.vocab_size == TINY_VOCAB_SIZE
    assert cfg.max_position_embeddings == TINY_MAX_MODEL_LEN
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 4, 2)
    assert cfg.eos_token_id == 151_643
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert not model.training
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, TINY_VOCAB_SIZE)
    assert torch.isfinite(logits).all()


def test_dtype_is_applied() -> None:
    model = build_tiny_model(dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ref = build_tiny_model()
    # Same weights, rounded: the bf16 model is the fp32 one cast, not a different draw.
    for (name, p16), (_, p32) in zip(sorted(model.named_parameters()), sorted(ref.named_parameters()), strict=True):
        assert torch.equal(p16, p32.to(torch.bfloat16)), name
