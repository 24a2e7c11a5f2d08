"""sample: autoregressive decoding with a KV cache, written out so every choice is explicit.

The engine samples through the batched decoder (decode.py, TorchEngine.sample_many) since issue 9;
`sample` here is the one-request reference it is tested against (greedy tokens and logprobs) and
the old loop bench/sampler.py compares with. resolve_max_tokens validates for both.

Semantics (chosen to match Tinker/vLLM where they define them):
- Each sampled token's logprob is log_softmax of the *raw* logits (before temperature, top-k, top-p),
  i.e. the model's own probability of the token: what RL losses need for importance ratios.
- temperature 0 is greedy (argmax, ties to the lowest id); top_k -1 (or 0) and top_p 1 disable those
  filters. Ids the tokenizer cannot decode (vocabulary padding rows) are never sampled.
- A sequence stops ("stop") on a stop token, on EOS when stop_at_eos, or when its decoded text
  contains a stop string; the token that triggered the stop *is* included. Otherwise it runs to
  max_tokens ("length"). max_tokens None means min(DEFAULT_MAX_TOKENS, room left in the context).
- Randomness comes only from a generator seeded with `seed` (a fresh random seed when None), so the
  same request with the same seed returns the same sequences.
- topk_sample_logprobs = K adds, at every sampled position, the K most likely tokens of that same
  distribution with their logprobs, best first. Prompt-side options are in prompt_scoring.py.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from app.domain.ops import SampleOp, SamplingParams
from app.domain.results import SampledSequence, SampleResult
from workers.engine.base_models import LoadedModel
from workers.engine.errors import OpInputError
from workers.engine.logits import decoder_hidden, project
from workers.engine.prompt_scoring import check_extras, score_prompt, topk_table

DEFAULT_MAX_TOKENS = 256  # a forgotten max_tokens should not tie a GPU up for a whole context
MAX_NUM_SAMPLES = 64


def resolve_max_tokens(op: SampleOp, vocab_size: int, max_len: int) -> int:
    """Validate the request; return the number of tokens to generate at most."""
    prompt, params = op.prompt, op.params
    if not prompt:
        raise OpInputError("prompt must contain at least one token")
    if min(prompt) < 0 or max(prompt) >= vocab_size:
        raise OpInputError(f"prompt token ids must be in [0, {vocab_size})")
    if len(prompt) > max_len:
        raise OpInputError(f"prompt has {len(prompt)} tokens; the model's max length is {max_len}")
    if not 1 <= op.num_samples <= MAX_NUM_SAMPLES:
        raise OpInputError(f"num_samples must be in [1, {MAX_NUM_SAMPLES}], got {op.num_samples}")
    check_extras(op, vocab_size)
    if not math.isfinite(params.temperature) or params.temperature < 0:
        raise OpInputError(f"temperature must be finite and >= 0, got {params.temperature}")
    if not (math.isfinite(params.top_p) and 0 < params.top_p <= 1):
        raise OpInputError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < -1:
        raise OpInputError(f"top_k must be -1 (off) or positive, got {params.top_k}")
    if any(t < 0 or t >= vocab_size for t in params.stop_tokens):
        raise OpInputError(f"stop_tokens must be in [0, {vocab_size})")
    if any(not s for s in params.stop_strings):
        raise OpInputError("stop_strings must be non-empty")
    room = max_len - len(prompt)
    if params.max_tokens is None:
        return min(DEFAULT_MAX_TOKENS, room)
    if params.max_tokens < 0:
        raise OpInputError(f"max_tokens must be >= 0, got {params.max_tokens}")
    if params.max_tokens > room:
        raise OpInputError(
            f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's max length {max_len}"
        )
    return params.max_tokens


@dataclass
class _Row:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    topk_ids: list[list[int]] = field(default_factory=list)
    topk_lps: list[list[float]] = field(default_factory=list)
    reason: Literal["stop", "length"] | None = None


def _choose(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> torch.Tensor:
    """Pick one token per row of float32 logits [B, V]."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits / params.temperature
    if 0 < params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, -math.inf)
    probs = F.softmax(scaled, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p: drop a token once the mass before it does.
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    # Exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) picks i with probability p_i (the
    # Gumbel-max trick in another form); torch.multinomial is ~10x slower over a 150k vocabulary.
    race = torch.empty_like(probs).exponential_(generator=gen)
    return (probs / race).argmax(dim=-1)


class _StopCheck:
    def __init__(self, lm: LoadedModel, params: SamplingParams) -> None:
        self.stop_ids = set(params.stop_tokens) | (set(lm.eos_token_ids) if params.stop_at_eos else set())
        self.strings = params.stop_strings
        self.tokenizer = lm.tokenizer
        # A string of L characters spans at most 4L bytes, hence 4L tokens; decoding only that tail
        # keeps the check O(1) per token instead of re-decoding the whole sequence.
        self.window = 4 * max((len(s) for s in self.strings), default=0) + 4

    def stops(self, tokens: list[int]) -> bool:
        if tokens[-1] in self.stop_ids:
            return True
        if not self.strings:
            return False
        tail = self.tokenizer.decode(tokens[-self.window :], skip_special_tokens=False)
        return any(s in tail for s in self.strings)


def sample(lm: LoadedModel, op: SampleOp, max_tokens: int) -> SampleResult:
    """Run `op` on `lm` with whatever adapter the caller has activated."""
    model, device = lm.model, lm.device
    params = op.params
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed % 2**64)
    allowed = min(lm.vocab_size, len(lm.tokenizer))
    stop = _StopCheck(lm, params)
    rows = [_Row() for _ in range(op.num_samples)]

    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        prompt = torch.tensor([op.prompt], dtype=torch.int64, device=device)
        hidden = decoder_hidden(model, prompt, cache=cache)[0]  # [P, H]
        scores = score_prompt(lm, op, hidden, seed)
        topk_k = min(op.topk_sample_logprobs, lm.vocab_size)

        active = list(range(len(rows)))  # rows still generating, in cache batch order
        if max_tokens > 0:
            logits = project(model, hidden[-1:]).expand(len(rows), -1)
            cache.batch_repeat_interleave(len(rows))
        for step in range(max_tokens):
            # Vocabulary padding rows (ids past the tokenizer) are never sampled: slicing them off
            # keeps ids unchanged, as they sit at the end.
            chosen = _choose(logits[:, :allowed], params, gen)
            logprobs = F.log_softmax(logits, dim=-1)
            chosen_lp = logprobs.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
            top_ids: list[list[int]] = []
            top_lps: list[list[float]] = []
            if topk_k:
                top = torch.topk(logprobs, topk_k, dim=-1)
                top_ids, top_lps = top.indices.tolist(), top.values.tolist()
            keep: list[int] = []
            for pos, (row_id, token, lp) in enumerate(zip(active, chosen.tolist(), chosen_lp.tolist(), strict=True)):
                row = rows[row_id]
                row.tokens.append(int(token))
                row.logprobs.append(float(lp))
                if topk_k:
                    row.topk_ids.append(top_ids[pos])
                    row.topk_lps.append(top_lps[pos])
                if stop.stops(row.tokens):
                    row.reason = "stop"
                else:
                    keep.append(pos)
            if not keep or step + 1 == max_tokens:
                break
            if len(keep) < len(active):
                # Drop finished rows from the batch so the cache stops growing for them.
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                chosen = chosen[index]
                active = [active[pos] for pos in keep]
            hidden = decoder_hidden(model, chosen.unsqueeze(-1), cache=cache)
            logits = project(model, hidden[:, -1])

    sequences = tuple(
        SampledSequence(
            tokens=tuple(r.tokens),
            logprobs=tuple(r.logprobs),
            stop_reason=r.reason or "length",
            topk_logprobs=topk_table(r.topk_ids, r.topk_lps, topk_k) if topk_k else None,
        )
        for r in rows
    )
    return SampleResult(
        sequences=sequences,
        prompt_logprobs=scores.logprobs,
        topk_prompt_logprobs=scores.topk,
        target_prompt_logprobs=scores.target,
        prompt_alt_tokens=scores.alt_tokens,
    )
