"""The sampling options beyond prompt + params (SDK 0.38 adds most, §6.4), checked at submission.

Each bound is the engine's own (app.domain.sampling), so a request accepted here is not refused on
the GPU worker. A request the server cannot answer fully is refused rather than answered with a gap:
0.38 raises RuntimeError on a missing prompt_alt_tokens or on logprobs before a last_n suffix.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, StrictInt, ValidationError

from app.domain.errors import InvalidInput
from app.domain.ops import SampleOp
from app.domain.sampling import (
    MAX_PROMPT_ALT_TOKENS_K,
    MAX_TARGET_PROMPT_LOGPROBS_CELLS,
    MAX_TARGET_PROMPT_LOGPROBS_K,
    MAX_TOPK_PROMPT_LOGPROBS,
    MAX_TOPK_SAMPLE_LOGPROBS,
    PromptGrid,
)
from app.domain.tensors import Array
from app.wire.json_models import SampleRequest


class _TensorDataJson(BaseModel):
    """The SDK's JSON TensorData (types/_pydantic_types/tensor_data.py), as the target ids use it."""

    model_config = ConfigDict(extra="ignore")

    data: list[StrictInt]
    dtype: str
    shape: list[StrictInt] | None = None
    sparse_crow_indices: list[StrictInt] | None = None
    sparse_col_indices: list[StrictInt] | None = None


def sample_extras(req: SampleRequest, prompt_len: int) -> dict[str, Any]:
    """SampleOp fields for the options of `req` beyond prompt, num_samples and sampling params."""
    _bounded("topk_prompt_logprobs", req.topk_prompt_logprobs, MAX_TOPK_PROMPT_LOGPROBS)
    _bounded("topk_sample_logprobs", req.topk_sample_logprobs, MAX_TOPK_SAMPLE_LOGPROBS)
    _bounded("prompt_alt_tokens_k", req.prompt_alt_tokens_k, MAX_PROMPT_ALT_TOKENS_K)
    last_n = req.prompt_logprobs_last_n
    if last_n is not None:
        if not req.prompt_logprobs:
            raise InvalidInput("prompt_logprobs_last_n requires prompt_logprobs (include_prompt_logprobs=True)")
        if not 1 <= last_n <= prompt_len - 1:
            raise InvalidInput(
                f"prompt_logprobs_last_n must be between 1 and len(prompt) - 1 = {prompt_len - 1}, got {last_n}"
            )
    grid = None
    if req.target_prompt_logprobs is not None:
        grid = _target_grid(req.target_prompt_logprobs, prompt_len)
    return {
        "prompt_logprobs": bool(req.prompt_logprobs),
        "topk_prompt_logprobs": req.topk_prompt_logprobs,
        "topk_sample_logprobs": req.topk_sample_logprobs,
        "prompt_logprobs_last_n": last_n,
        "target_prompt_logprobs": grid,
        "prompt_alt_tokens_k": req.prompt_alt_tokens_k,
        "record_stability_info": bool(req.record_stability_info),
    }


def check_target_ids(op: SampleOp, vocab: int) -> None:
    """Target ids against the model's vocabulary, once the sampler's model is known."""
    if op.target_prompt_logprobs is None:
        return
    bad = next((t for t in op.target_prompt_logprobs.values.tolist() if t >= vocab), None)
    if bad is not None:
        raise InvalidInput(f"target_prompt_logprobs: token id {bad} is outside the vocabulary [0, {vocab})")


def _bounded(name: str, value: int, limit: int) -> None:
    if not 0 <= value <= limit:
        raise InvalidInput(f"{name} must be between 0 and {limit}, got {value}")


def _target_grid(raw: dict[str, Any], prompt_len: int) -> PromptGrid:
    what = "target_prompt_logprobs"
    try:
        td = _TensorDataJson.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise InvalidInput(f"{what} is not a TensorData of int64 token ids: {problems}") from None
    if td.dtype != "int64":
        raise InvalidInput(f"{what} must be an int64 tensor of token ids, got {td.dtype}")
    if td.shape is None or len(td.shape) != 2:
        raise InvalidInput(f"{what} must be 2-D, [len(prompt) - 1, K], got shape {td.shape}")
    rows, cols = td.shape
    if rows != prompt_len - 1:
        raise InvalidInput(f"{what} must have len(prompt) - 1 = {prompt_len - 1} rows, got {rows}")
    if not 1 <= cols <= MAX_TARGET_PROMPT_LOGPROBS_K:
        raise InvalidInput(f"{what} must have between 1 and {MAX_TARGET_PROMPT_LOGPROBS_K} columns, got {cols}")
    if rows * cols > MAX_TARGET_PROMPT_LOGPROBS_CELLS:
        raise InvalidInput(f"{what} has {rows * cols} cells, over the limit of {MAX_TARGET_PROMPT_LOGPROBS_CELLS}")
    if any(not -1 <= t < 2**31 for t in td.data):
        raise InvalidInput(f"{what}: token ids must be -1 (no request) or in [0, 2**31)")
    if all(t == -1 for t in td.data):
        raise InvalidInput(f"{what} names no token id (every cell is -1)")
    crow, col = td.sparse_crow_indices, td.sparse_col_indices
    grid = PromptGrid(
        shape=(rows, cols),
        values=Array.from_list(td.data, "int64"),
        crow_indices=None if crow is None else tuple(crow),
        col_indices=None if col is None else tuple(col),
    )
    try:
        grid.check()
    except ValueError as exc:
        raise InvalidInput(f"{what}: {exc}") from None
    return grid
