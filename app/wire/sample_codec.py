"""`SampleResult` -> `SampleResponse` protobuf bytes, as the SDK decodes them (tinker-protocol.md §7.3).

Only what the request asked for is written: 0.38 reads an absent optional field as "not requested",
and 0.25 skips fields it does not know (§11 row 4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from app.domain.errors import ServerError
from app.domain.results import SampleResult, TokenTable
from app.domain.sampling import PromptGrid
from app.domain.tensors import Array
from app.wire.proto import pb
from app.wire.tensors import pack_le

_STOP_REASONS = {"stop": pb.STOP_REASON_STOP, "length": pb.STOP_REASON_LENGTH}
# Empty top-k cells, as the SDK's `topk_to_lists` recognises them (§7.3).
_TOPK_EMPTY_TOKEN = 0
_TOPK_EMPTY_LOGPROB = -99999.0
_DTYPES = {"float32": pb.DTYPE_FLOAT32, "int64": pb.DTYPE_INT64}


def encode_sample_response(result: SampleResult) -> bytes:
    """`SampleResponse` bytes that the SDK decodes into `tinker.types.SampleResponse`."""
    out = pb.SampleResponse()
    for seq in result.sequences:
        msg = out.sequences.add(stop_reason=_STOP_REASONS[seq.stop_reason], tokens=pack_le("i", seq.tokens))
        if seq.logprobs is not None:
            if len(seq.logprobs) != len(seq.tokens):
                raise ServerError(f"{len(seq.logprobs)} logprobs for {len(seq.tokens)} sampled tokens")
            msg.logprobs = pack_le("f", seq.logprobs)
        if seq.topk_logprobs is not None:
            if seq.topk_logprobs.token_ids.shape[0] != len(seq.tokens):
                raise ServerError(f"{seq.topk_logprobs.token_ids.shape[0]} top-k rows for {len(seq.tokens)} tokens")
            msg.topk_sampled_logprobs.CopyFrom(_topk_table(seq.topk_logprobs))
    if result.prompt_logprobs is not None:
        # NaN marks "not computed" (position 0, positions before last_n); the SDK reads it as None.
        out.prompt_logprobs = pack_le("f", [math.nan if lp is None else lp for lp in result.prompt_logprobs])
    if result.topk_prompt_logprobs is not None:
        out.topk_prompt_logprobs.CopyFrom(_topk_rows(result.topk_prompt_logprobs))
    if result.target_prompt_logprobs is not None:
        out.target_prompt_logprobs.CopyFrom(_grid_tensor(result.target_prompt_logprobs))
    if result.prompt_alt_tokens is not None:
        alt = result.prompt_alt_tokens
        out.prompt_alt_tokens.tokens.CopyFrom(_dense_tensor(alt.token_ids))
        out.prompt_alt_tokens.logprobs.CopyFrom(_dense_tensor(alt.logprobs))
    return out.SerializeToString()


def _topk_rows(rows: Sequence[Sequence[tuple[int, float]] | None]) -> pb.TopkLogprobs:
    # A dense [length, k] matrix, row-major; short rows and None rows are padded with empty cells.
    # k is at least 1 so that a table of only None rows (a one-token prompt) still reads back as
    # [None, ...] rather than as "not requested".
    k = max((len(row) for row in rows if row is not None), default=0)
    k = max(k, 1) if rows else 0
    token_ids: list[int] = []
    logprobs: list[float] = []
    for row in rows:
        cells = list(row or ())
        cells += [(_TOPK_EMPTY_TOKEN, _TOPK_EMPTY_LOGPROB)] * (k - len(cells))
        token_ids.extend(token for token, _ in cells)
        logprobs.extend(lp for _, lp in cells)
    return pb.TopkLogprobs(token_ids=pack_le("i", token_ids), logprobs=pack_le("f", logprobs), k=k, length=len(rows))


def _topk_table(table: TokenTable) -> pb.TopkLogprobs:
    length, k = table.token_ids.shape
    ids = table.token_ids.tolist()
    return pb.TopkLogprobs(token_ids=pack_le("i", ids), logprobs=table.logprobs.data, k=k, length=length)


def _dense_tensor(arr: Array) -> pb.Tensor:
    return pb.Tensor(dense=arr.data, dtype=_DTYPES[arr.dtype], shape=list(arr.shape))


def _grid_tensor(grid: PromptGrid) -> pb.Tensor:
    """The request's layout: dense [rows, cols], or CSR with the request's own indices."""
    if grid.crow_indices is None or grid.col_indices is None:
        return pb.Tensor(dense=grid.values.data, dtype=_DTYPES[grid.values.dtype], shape=list(grid.shape))
    csr = pb.SparseCsr(
        values=grid.values.data,
        crow_indices=pack_le("q", grid.crow_indices),
        col_indices=pack_le("q", grid.col_indices),
    )
    return pb.Tensor(sparse_csr=csr, dtype=_DTYPES[grid.values.dtype], shape=list(grid.shape))
