"""Sampling pieces shared by ops and results: the bounds of the sampling options and the prompt
table that `target_prompt_logprobs` travels in (docs/sampling.md).

The bounds live here so the API (HTTP 400 at submission) and the engine (checked again before the
GPU) accept exactly the same requests.
"""

from __future__ import annotations

from itertools import pairwise

from pydantic import BaseModel, ConfigDict

from app.domain.tensors import Array

# Top-k width of prompt positions (topk_prompt_logprobs).
MAX_TOPK_PROMPT_LOGPROBS = 100
# Top-k width at each sampled position: it is stored for every token of every sample (up to
# num_samples * max_tokens rows), so it is kept to what vLLM allows by default.
MAX_TOPK_SAMPLE_LOGPROBS = 20
# Draws per prompt position (prompt_alt_tokens_k): bounded like a prompt top-k width.
MAX_PROMPT_ALT_TOKENS_K = 100
# target_prompt_logprobs: ids per prompt position, and cells in the whole table.
MAX_TARGET_PROMPT_LOGPROBS_K = 1024
MAX_TARGET_PROMPT_LOGPROBS_CELLS = 1 << 20


class PromptGrid(BaseModel):
    """A [len(prompt) - 1, K] table whose row i is prompt position i + 1, kept in the layout the
    SDK sent (dense, or sparse CSR) because the reply must come back in that same layout.

    `values` is 1-D: every cell row-major when dense, the listed cells in CSR order when sparse.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    shape: tuple[int, int]
    values: Array
    crow_indices: tuple[int, ...] | None = None
    col_indices: tuple[int, ...] | None = None

    def check(self) -> None:
        """Raise ValueError unless the layout is consistent (the values themselves are not judged)."""
        rows, cols = self.shape
        if rows < 0 or cols < 0:
            raise ValueError(f"negative dimension in shape {list(self.shape)}")
        if len(self.values.shape) != 1:
            raise ValueError("values must be 1-D")
        self.values.check()
        count = self.values.size
        if self.crow_indices is None or self.col_indices is None:
            if self.crow_indices is not None or self.col_indices is not None:
                raise ValueError("sparse_crow_indices and sparse_col_indices must be given together")
            if count != rows * cols:
                raise ValueError(f"shape {[rows, cols]} needs {rows * cols} values, got {count}")
            return
        crow, col = self.crow_indices, self.col_indices
        if len(crow) != rows + 1 or crow[0] != 0 or crow[-1] != count:
            raise ValueError(f"sparse_crow_indices must have {rows + 1} entries running from 0 to {count}")
        if any(a > b for a, b in pairwise(crow)):
            raise ValueError("sparse_crow_indices must not decrease")
        if len(col) != count:
            raise ValueError(f"{len(col)} sparse_col_indices for {count} values")
        if any(not 0 <= c < cols for c in col):
            raise ValueError(f"sparse_col_indices must be in [0, {cols})")

    def rows(self) -> list[int]:
        """The row of each entry of `values`, in order (of a grid that passed `check`)."""
        if self.crow_indices is None:
            cols = self.shape[1]
            return [i // cols for i in range(self.values.size)] if cols else []
        crow = self.crow_indices
        return [row for row in range(len(crow) - 1) for _ in range(crow[row + 1] - crow[row])]

    def with_values(self, values: Array) -> PromptGrid:
        """The same layout holding other values (the reply to a request's grid)."""
        return PromptGrid(shape=self.shape, values=values, crow_indices=self.crow_indices, col_indices=self.col_indices)
