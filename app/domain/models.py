"""Base models a server can serve. Shared by the API (validation) and the workers (loading)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

BUILTIN_TINY_MODEL = "tuft/tiny-qwen3"
BUILTIN_TINY_PATH = "builtin:tiny-qwen3"
# Qwen3's padded vocabulary size: the Qwen BPE has 151,643 ranks + 26 added tokens, and the
# embedding matrix is padded to a multiple of 128.
TINY_VOCAB_SIZE = 151_936
TINY_MAX_MODEL_LEN = 2048


class ModelSpec(BaseModel):
    """One entry of `supported_models` in the config (names as in the original TuFT config)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_name: str
    # A local Hugging Face folder, or "builtin:tiny-qwen3" for the built-in deterministic model.
    model_path: str
    max_model_len: int = 2048
    # Filled from the model folder's config.json when omitted (no torch needed).
    vocab_size: int | None = None
    max_lora_rank: int = 128
    # What get_info tells clients to load with AutoTokenizer.from_pretrained (a Hugging Face id, or
    # a folder that exists on the clients' machines). Default: model_path if the API host sees it.
    tokenizer_id: str | None = None


def builtin_tiny_spec() -> ModelSpec:
    return ModelSpec(
        model_name=BUILTIN_TINY_MODEL,
        model_path=BUILTIN_TINY_PATH,
        max_model_len=TINY_MAX_MODEL_LEN,
        vocab_size=TINY_VOCAB_SIZE,
    )
