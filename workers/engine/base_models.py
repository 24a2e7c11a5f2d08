"""Loading base models (frozen weights + tokenizer) from a `ModelSpec`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from app.domain.hf_cache import resolve_model_path
from app.domain.models import BUILTIN_TINY_PATH, TINY_VOCAB_SIZE, ModelSpec
from workers.engine.errors import OpInputError
from workers.engine.progress import Progress, heartbeat, size_text
from workers.engine.tiny import build_tiny_model, build_tiny_tokenizer

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """float32 on CPU (bf16 matmuls there are slow and lossy); bfloat16 on accelerators."""
    if name is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


@dataclass
class LoadedModel:
    """One loaded base model, shared by every run and sampler on it."""

    spec: ModelSpec
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    vocab_size: int  # rows of the output embedding: the valid range of token ids
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """EOS ids from the tokenizer and the generation config (chat models list several, e.g. Qwen3
    instruct ends turns with <|im_end|> and documents with <|endoftext|>)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    gen_eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, list | tuple):
        ids.update(int(i) for i in gen_eos)
    return frozenset(ids)


def config_vocab_size(spec: ModelSpec) -> int:
    """Vocabulary size without loading weights: the spec, the built-in constant or config.json."""
    if spec.vocab_size is not None:
        return spec.vocab_size
    if spec.model_path == BUILTIN_TINY_PATH:
        return TINY_VOCAB_SIZE
    config = json.loads((Path(resolve_model_path(spec.model_path)) / "config.json").read_text())
    size = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    if not isinstance(size, int):
        raise OpInputError(f"cannot find vocab_size in {spec.model_path}/config.json")
    return size


def load_base_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype, cache_dir: Path) -> LoadedModel:
    """Load `spec`'s weights onto `device`, frozen and in eval mode. Local files only: workers run
    without network access, and a silent download would make startup time unpredictable."""
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    if spec.model_path == BUILTIN_TINY_PATH:
        model = build_tiny_model(dtype=dtype, device=device)
        tokenizer = build_tiny_tokenizer(cache_dir)
    else:
        # A Hugging Face id whose snapshot is in the local cache loads from there (app/domain/hf_cache.py).
        path = resolve_model_path(spec.model_path)
        model = _load_weights(spec.model_name, path, device, dtype)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model.requires_grad_(False)
    model.eval()
    out_emb = model.get_output_embeddings()
    if out_emb is None or not hasattr(out_emb, "weight"):
        raise ValueError(f"{spec.model_name}: model has no output embedding; not a causal LM")
    vocab = int(out_emb.weight.shape[0])
    return LoadedModel(
        spec=spec,
        model=model,
        tokenizer=tokenizer,
        vocab_size=vocab,
        eos_token_ids=_eos_ids(model, tokenizer),
    )


def _load_weights(name: str, path: str, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    """from_pretrained, then the move to `device`, with progress in the logs: an 8B model takes
    minutes, and without these lines a starting worker looks hung. Reading has no hook to measure
    (transformers loads inside one call), so it logs a heartbeat and counts as half the work when
    a move follows; the move is measured by parameter bytes."""
    files = [f for f in Path(path).glob("*.safetensors")] or [f for f in Path(path).glob("*.bin")]
    weight_bytes = sum(f.stat().st_size for f in files)
    moving = device.type != "cpu"
    progress = Progress("loading model", name, total=100.0)
    progress.start(f"{path}, {size_text(weight_bytes)} in {len(files)} file(s), to {device}")
    try:
        with heartbeat(progress, "reading weights"):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        progress.advance(50.0 if moving else 100.0, "weights read")
        if moving:
            _move(model, device, progress, share=50.0)
        nn.Module.to(model, device)  # buffers, and PreTrainedModel.to is mistyped in transformers' stubs
    except BaseException:
        progress.failed()
        raise
    progress.finish(size_text(weight_bytes))
    return model


def _move(model: nn.Module, device: torch.device, progress: Progress, share: float) -> None:
    """Modules to `device` leaves first, one at a time, so progress can be told. Each is moved by
    nn.Module.to itself (tied weights stay tied: one Parameter, moved in place); a parent's
    children are already there by its turn, so its own `to` only moves its own tensors."""
    total = sum(p.numel() * p.element_size() for p in model.parameters()) or 1
    for module in reversed(list(model.modules())):
        own = [p for p in module.parameters(recurse=False) if p.device != device]
        if not own:
            continue
        nn.Module.to(module, device)
        progress.advance(share * sum(p.numel() * p.element_size() for p in own) / total, f"to {device}")
