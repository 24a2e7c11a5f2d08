"""Text in, text out for the OpenAI-compatible endpoint: chat template, tokenize, sample, detokenize.

Only the engine's public `sample` is called, so how sampling works inside stays the engine's
business. Tokenizers are loaded here, once per model, from the same sources as base_models.py.

A tokenizer without a chat template (the built-in `tuft/tiny-qwen3` has none) gets Qwen's ChatML:
`<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, then `<|im_start|>assistant\\n`; generation
also stops at `<|im_end|>` whenever the tokenizer has that token.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Protocol

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from app.domain.models import BUILTIN_TINY_PATH, ModelSpec
from app.domain.oai import ChatMessage, OaiChoice, OaiCompletionOp, OaiCompletionResult
from app.domain.ops import SampleOp, SamplingParams
from app.domain.results import SampledSequence, SampleResult
from workers.engine.errors import OpInputError
from workers.engine.tiny import build_tiny_tokenizer

END_OF_TURN = "<|im_end|>"


class SampleEngine(Protocol):
    def sample(self, base_model: str, adapter: Path | None, op: SampleOp) -> SampleResult: ...


@functools.cache
def load_tokenizer(spec: ModelSpec, cache_dir: Path) -> PreTrainedTokenizerBase:
    if spec.model_path == BUILTIN_TINY_PATH:
        return build_tiny_tokenizer(cache_dir)
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(spec.model_path, local_files_only=True)
    return tokenizer


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: tuple[ChatMessage, ...]) -> str:
    """The prompt text for `messages`, ending where the assistant's reply begins."""
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [m.model_dump() for m in messages], tokenize=False, add_generation_prompt=True
        )
        assert isinstance(rendered, str)
        return rendered
    turns = "".join(f"<|im_start|>{m.role}\n{m.content}{END_OF_TURN}\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def _single_token(tokenizer: PreTrainedTokenizerBase, text: str) -> int | None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def encode_prompt(tokenizer: PreTrainedTokenizerBase, op: OaiCompletionOp) -> tuple[list[int], tuple[int, ...]]:
    """(prompt ids, extra stop token ids)."""
    if op.messages is not None:
        # The template writes any BOS itself, so the tokenizer must not add another.
        ids = tokenizer.encode(render_chat(tokenizer, op.messages), add_special_tokens=False)
        end = _single_token(tokenizer, END_OF_TURN)
        return ids, () if end is None else (end,)
    if op.prompt_tokens is not None:
        return list(op.prompt_tokens), ()
    assert op.prompt is not None
    return tokenizer.encode(op.prompt), ()


def _decode(tokenizer: PreTrainedTokenizerBase, tokens: list[int], *, skip_special: bool = True) -> str:
    text = tokenizer.decode(tokens, skip_special_tokens=skip_special)
    assert isinstance(text, str)  # a list only for batched input
    return text


def finish(
    tokenizer: PreTrainedTokenizerBase, seq: SampledSequence, stop: tuple[str, ...], logprobs: bool
) -> OaiChoice:
    """Detokenize one sequence as OpenAI does: no special tokens, nothing from the first stop
    string on, and no trailing EOS or stop token (the engine includes the token that stopped it)."""
    tokens = list(seq.tokens)
    text = _decode(tokenizer, tokens)
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    if cuts:
        text = text[: min(cuts)]
        # Keep the fewest tokens that still spell the text (the stop string ends within the last few).
        while tokens and len(_decode(tokenizer, tokens[:-1])) >= len(text):
            tokens.pop()
    elif seq.stop_reason == "stop" and tokens:
        tokens.pop()
        text = _decode(tokenizer, tokens)
    reason = "stop" if cuts else seq.stop_reason
    if not logprobs:
        return OaiChoice(text=text, finish_reason=reason)
    assert seq.logprobs is not None
    pieces = tuple(_decode(tokenizer, [t], skip_special=False) for t in tokens)
    return OaiChoice(text=text, finish_reason=reason, tokens=pieces, token_logprobs=seq.logprobs[: len(tokens)])


def complete_text(
    engine: SampleEngine, models: list[ModelSpec], cache_dir: Path, adapter: Path | None, op: OaiCompletionOp
) -> OaiCompletionResult:
    """Run `op` on `op.base_model` (with the adapter folder, if any). OpInputError for bad input."""
    spec = next((m for m in models if m.model_name == op.base_model), None)
    if spec is None:
        raise OpInputError(f"unknown base model {op.base_model!r}")
    tokenizer = load_tokenizer(spec, Path(cache_dir))
    prompt, stop_tokens = encode_prompt(tokenizer, op)
    if not prompt:
        raise OpInputError("the prompt is empty after tokenization")
    params = SamplingParams(
        max_tokens=op.max_tokens,
        temperature=op.temperature,
        top_p=op.top_p,
        seed=op.seed,
        stop_strings=op.stop,
        stop_tokens=stop_tokens,
    )
    result = engine.sample(op.base_model, adapter, SampleOp(prompt=tuple(prompt), num_samples=op.n, params=params))
    choices = tuple(finish(tokenizer, seq, op.stop, op.logprobs) for seq in result.sequences)
    return OaiCompletionResult(
        choices=choices,
        prompt_tokens=len(prompt),
        completion_tokens=sum(len(seq.tokens) for seq in result.sequences),
    )
