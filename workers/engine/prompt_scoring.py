"""What a sample request asks about its prompt, computed from the prefill's hidden states.

Hidden row i predicts prompt[i + 1], so there are len(prompt) - 1 scorable positions. Each chunk of
rows is projected to the vocabulary once and serves every option that needs it:
- prompt_logprobs / topk_prompt_logprobs: position 0 has no prefix and is None; with
  prompt_logprobs_last_n = N only the last N positions are scored, the earlier ones are None too;
- target_prompt_logprobs: log p(id) for each id the request names (0.0 where it names -1);
- prompt_alt_tokens_k: k draws with replacement at the request's temperature (greedy at 0), from
  their own seeded generator so they never change the sampled sequences.
All logprobs are log_softmax of the raw logits, like the sampled tokens' (see sampling.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from app.domain.ops import SampleOp
from app.domain.results import TokenTable
from app.domain.sampling import (
    MAX_PROMPT_ALT_TOKENS_K,
    MAX_TARGET_PROMPT_LOGPROBS_CELLS,
    MAX_TARGET_PROMPT_LOGPROBS_K,
    MAX_TOPK_PROMPT_LOGPROBS,
    MAX_TOPK_SAMPLE_LOGPROBS,
    PromptGrid,
)
from app.domain.tensors import Array
from workers.engine.base_models import LoadedModel
from workers.engine.errors import OpInputError
from workers.engine.logits import chunk_tokens, project

TopkRows = tuple[tuple[tuple[int, float], ...] | None, ...]
# A fixed offset gives the alternative-token draws a generator of their own for the same seed.
_ALT_SEED_OFFSET = 0x9E3779B97F4A7C15


def check_extras(op: SampleOp, vocab_size: int) -> None:
    """Validate the prompt-scoring and top-k options of `op` (the API checks the same)."""
    if not 0 <= op.topk_prompt_logprobs <= MAX_TOPK_PROMPT_LOGPROBS:
        raise OpInputError(f"topk_prompt_logprobs must be in [0, {MAX_TOPK_PROMPT_LOGPROBS}]")
    if not 0 <= op.topk_sample_logprobs <= MAX_TOPK_SAMPLE_LOGPROBS:
        raise OpInputError(f"topk_sample_logprobs must be in [0, {MAX_TOPK_SAMPLE_LOGPROBS}]")
    if not 0 <= op.prompt_alt_tokens_k <= MAX_PROMPT_ALT_TOKENS_K:
        raise OpInputError(f"prompt_alt_tokens_k must be in [0, {MAX_PROMPT_ALT_TOKENS_K}]")
    positions = len(op.prompt) - 1
    last_n = op.prompt_logprobs_last_n
    if last_n is not None:
        if not op.prompt_logprobs:
            raise OpInputError("prompt_logprobs_last_n requires prompt_logprobs")
        if not 1 <= last_n <= positions:
            raise OpInputError(f"prompt_logprobs_last_n must be in [1, {positions}] (len(prompt) - 1)")
    grid = op.target_prompt_logprobs
    if grid is not None:
        _check_target(grid, positions, vocab_size)


def _check_target(grid: PromptGrid, positions: int, vocab_size: int) -> None:
    try:
        grid.check()
    except ValueError as exc:
        raise OpInputError(f"target_prompt_logprobs: {exc}") from None
    rows, cols = grid.shape
    if rows != positions:
        raise OpInputError(f"target_prompt_logprobs must have {positions} rows (len(prompt) - 1), got {rows}")
    if not 1 <= cols <= MAX_TARGET_PROMPT_LOGPROBS_K or rows * cols > MAX_TARGET_PROMPT_LOGPROBS_CELLS:
        raise OpInputError("target_prompt_logprobs is too wide")
    ids = grid.values.tolist()
    if grid.values.dtype != "int64" or any(not -1 <= t < vocab_size for t in ids):
        raise OpInputError(f"target_prompt_logprobs ids must be -1 or in [0, {vocab_size})")
    if all(t == -1 for t in ids):
        raise OpInputError("target_prompt_logprobs names no token id")


@dataclass
class PromptScores:
    logprobs: tuple[float | None, ...] | None = None
    topk: TopkRows | None = None
    target: PromptGrid | None = None
    alt_tokens: TokenTable | None = None


@dataclass
class _Target:
    grid: PromptGrid
    rows: torch.Tensor  # [cells] hidden row of each cell
    ids: torch.Tensor  # [cells]; -1 asks for nothing
    out: torch.Tensor  # [cells] float32


def score_prompt(lm: LoadedModel, op: SampleOp, hidden: torch.Tensor, seed: int) -> PromptScores:
    """`hidden`: the prompt's final hidden states [P, H]."""
    model, device = lm.model, hidden.device
    positions = len(op.prompt) - 1
    # First hidden row whose position gets prompt_logprobs / topk rows.
    first = positions - op.prompt_logprobs_last_n if op.prompt_logprobs_last_n else 0
    k = min(op.topk_prompt_logprobs, lm.vocab_size)
    alt_k = op.prompt_alt_tokens_k
    target = _target(op.target_prompt_logprobs, device)
    if not (op.prompt_logprobs or k or target or alt_k):
        return PromptScores()
    start_row = 0 if target or alt_k else first
    gen = torch.Generator(device=device)
    gen.manual_seed((seed + _ALT_SEED_OFFSET) % 2**64)
    allowed = min(lm.vocab_size, len(lm.tokenizer))
    targets = torch.tensor(op.prompt[1:], dtype=torch.int64, device=device)
    logprobs: list[float] = []
    topk: list[tuple[tuple[int, float], ...]] = []
    alt_ids: list[torch.Tensor] = []
    alt_lps: list[torch.Tensor] = []
    step = chunk_tokens(lm.vocab_size)
    for lo in range(start_row, positions, step):
        hi = min(positions, lo + step)
        logits = project(model, hidden[lo:hi])
        lps = F.log_softmax(logits, dim=-1)
        scored = lps[max(first, lo) - lo :]
        if op.prompt_logprobs and len(scored):
            logprobs += scored.gather(-1, targets[max(first, lo) : hi, None]).squeeze(-1).tolist()
        if k and len(scored):
            top = torch.topk(scored, k, dim=-1)
            for ids, vals in zip(top.indices.tolist(), top.values.tolist(), strict=True):
                topk.append(tuple(zip(ids, vals, strict=True)))
        if target is not None:
            _gather_target(target, lps, lo, hi)
        if alt_k:
            ids = _draw(logits[:, :allowed], alt_k, op.params.temperature, gen)
            alt_ids.append(ids)
            alt_lps.append(lps.gather(-1, ids))
    masked: tuple[None, ...] = (None,) * (first + 1)
    return PromptScores(
        logprobs=(*masked, *logprobs) if op.prompt_logprobs else None,
        topk=(*masked, *topk) if k else None,
        target=None if target is None else target.grid.with_values(_f32(target.out)),
        alt_tokens=_alt_table(alt_ids, alt_lps, alt_k, device) if alt_k else None,
    )


def topk_table(rows_ids: list[list[int]], rows_lps: list[list[float]], k: int) -> TokenTable:
    """[n, k] table of per-row top-k lists (the sampled-token alternatives)."""
    flat_ids = [t for row in rows_ids for t in row]
    flat_lps = [v for row in rows_lps for v in row]
    shape = (len(rows_ids), k)
    return TokenTable(
        token_ids=Array.from_list(flat_ids, "int64", shape), logprobs=Array.from_list(flat_lps, "float32", shape)
    )


def _target(grid: PromptGrid | None, device: torch.device) -> _Target | None:
    if grid is None:
        return None
    ids = torch.tensor(grid.values.tolist(), dtype=torch.int64, device=device)
    rows = torch.tensor(grid.rows(), dtype=torch.int64, device=device)
    return _Target(grid, rows, ids, torch.zeros(len(ids), dtype=torch.float32, device=device))


def _gather_target(target: _Target, lps: torch.Tensor, lo: int, hi: int) -> None:
    sel = (target.ids >= 0) & (target.rows >= lo) & (target.rows < hi)
    if bool(sel.any()):
        target.out[sel] = lps[target.rows[sel] - lo, target.ids[sel]]


def _draw(logits: torch.Tensor, k: int, temperature: float, gen: torch.Generator) -> torch.Tensor:
    """k ids per row of logits [M, V'], with replacement; [M, k]."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True).expand(-1, k)
    probs = F.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, k, replacement=True, generator=gen)


def _alt_table(ids: list[torch.Tensor], lps: list[torch.Tensor], k: int, device: torch.device) -> TokenTable:
    all_ids = torch.cat(ids) if ids else torch.zeros(0, k, dtype=torch.int64, device=device)
    all_lps = torch.cat(lps) if lps else torch.zeros(0, k, dtype=torch.float32, device=device)
    shape = tuple(all_ids.shape)
    return TokenTable(
        token_ids=Array.from_list(all_ids.flatten().tolist(), "int64", shape),
        logprobs=Array.from_list(all_lps.flatten().tolist(), "float32", shape),
    )


def _f32(values: torch.Tensor) -> Array:
    return Array.from_list(values.tolist(), "float32")
