"""The 0.38 sampling extras on the wire: real SDK request bodies -> SampleOp, and SampleResults ->
protobuf -> the SDK's own reader and its own response checks (tinker-protocol.md §6.4, §7.3)."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import BaseModel
from tinker import types
from tinker._compat import model_dump
from tinker.lib.public_interfaces.sampling_client import (
    _check_prompt_alt_tokens_returned,
    _check_prompt_logprobs_last_n_honored,
    _tensor_data_to_model,
)
from tinker.proto.response_conv import deserialize_proto_response

from app.domain.errors import InvalidInput
from app.domain.ops import SampleOp
from app.domain.results import SampledSequence, SampleResult, TokenTable
from app.domain.sampling import PromptGrid
from app.domain.tensors import Array
from app.wire import json_models as jm
from app.wire import translate as tr
from app.wire.codec import encode_sample_response
from app.wire.sample_extras import check_target_ids

PROMPT = [5, 6, 7, 8]


def wire_body(request: BaseModel) -> bytes:
    return json.dumps(model_dump(request, exclude_unset=False, exclude_none=True, mode="json")).encode()


def sdk_op(**fields: Any) -> SampleOp:
    """What SamplingClient.sample(...) puts on the wire, translated."""
    target = fields.pop("target_prompt_logprobs", None)
    request = types.SampleRequest(
        prompt=types.ModelInput.from_ints(fields.pop("prompt", PROMPT)),
        sampling_params=types.SamplingParams(max_tokens=2),
        sampling_session_id="s:sample:0",
        seq_id=0,
        target_prompt_logprobs=None if target is None else _tensor_data_to_model(target),
        record_stability_info=False,
        **fields,
    )
    return tr.sample_to_op(jm.parse_body(jm.SampleRequest, wire_body(request)))


def raw_op(**fields: Any) -> SampleOp:
    body = {"prompt": {"chunks": [{"type": "encoded_text", "tokens": PROMPT}]}, "sampling_params": {}, **fields}
    return tr.sample_to_op(jm.parse_body(jm.SampleRequest, json.dumps(body).encode()))


def one_sequence(**fields: Any) -> SampleResult:
    return SampleResult(sequences=(SampledSequence(tokens=(1,), logprobs=None, stop_reason="stop"),), **fields)


def sdk_response(result: SampleResult) -> types.SampleResponse:
    out = deserialize_proto_response(encode_sample_response(result), types.SampleResponse)
    assert isinstance(out, types.SampleResponse)
    return out


# requests


def test_defaults_of_a_0_25_body() -> None:
    op = raw_op()
    assert (op.topk_sample_logprobs, op.prompt_logprobs_last_n, op.target_prompt_logprobs, op.prompt_alt_tokens_k) == (
        0,
        None,
        None,
        0,
    )


def test_sdk_body_with_every_extra() -> None:
    op = sdk_op(prompt_logprobs=True, topk_prompt_logprobs=3, topk_sample_logprobs=5, prompt_logprobs_last_n=2)
    assert op.prompt_logprobs and op.topk_prompt_logprobs == 3
    assert op.topk_sample_logprobs == 5 and op.prompt_logprobs_last_n == 2
    assert sdk_op(prompt_alt_tokens_k=4).prompt_alt_tokens_k == 4


def test_dense_target_ids_keep_their_layout() -> None:
    ids = torch.tensor([[10, -1], [11, 12], [-1, -1]], dtype=torch.int64)
    grid = sdk_op(target_prompt_logprobs=types.TensorData.from_torch(ids)).target_prompt_logprobs
    assert grid is not None
    assert grid.shape == (3, 2) and grid.crow_indices is None and grid.col_indices is None
    assert grid.values.tolist() == [10, -1, 11, 12, -1, -1]
    assert grid.rows() == [0, 0, 1, 1, 2, 2]


def test_sparse_target_ids_keep_their_layout() -> None:
    ids = torch.full((3, 4), -1, dtype=torch.int64)
    ids[2, 1] = 42  # the SDK docstring's use: one candidate at one position
    grid = sdk_op(target_prompt_logprobs=types.TensorData.from_torch_sparse(ids, pad_value=-1)).target_prompt_logprobs
    assert grid is not None
    assert grid.shape == (3, 4)
    assert grid.values.tolist() == [42]
    assert grid.crow_indices == (0, 0, 0, 1) and grid.col_indices == (1,)
    assert grid.rows() == [2]


def _target(data: list[int], shape: list[int] | None, **csr: list[int]) -> dict[str, Any]:
    body: dict[str, Any] = {"data": data, "dtype": "int64", **{f"sparse_{k}_indices": v for k, v in csr.items()}}
    if shape is not None:
        body["shape"] = shape
    return {"target_prompt_logprobs": body}


BAD: dict[str, tuple[dict[str, Any], str]] = {
    "topk_sample_negative": ({"topk_sample_logprobs": -1}, "topk_sample_logprobs must be between 0 and 20"),
    "topk_sample_too_wide": ({"topk_sample_logprobs": 21}, "topk_sample_logprobs must be between 0 and 20"),
    "alt_k_negative": ({"prompt_alt_tokens_k": -1}, "prompt_alt_tokens_k must be between 0 and 100"),
    "alt_k_too_wide": ({"prompt_alt_tokens_k": 101}, "prompt_alt_tokens_k must be between 0 and 100"),
    "last_n_without_prompt_logprobs": ({"prompt_logprobs_last_n": 2}, "requires prompt_logprobs"),
    "last_n_with_prompt_logprobs_false": (
        {"prompt_logprobs_last_n": 2, "prompt_logprobs": False},
        "requires prompt_logprobs",
    ),
    "last_n_zero": ({"prompt_logprobs_last_n": 0, "prompt_logprobs": True}, "between 1 and len(prompt) - 1 = 3"),
    "last_n_negative": ({"prompt_logprobs_last_n": -1, "prompt_logprobs": True}, "between 1 and len(prompt) - 1"),
    "last_n_whole_prompt": ({"prompt_logprobs_last_n": 4, "prompt_logprobs": True}, "len(prompt) - 1 = 3, got 4"),
    "target_float_values": (
        {"target_prompt_logprobs": {"data": [1.5, 2.0, 3.0], "dtype": "float32", "shape": [3, 1]}},
        "not a TensorData of int64 token ids",
    ),
    "target_float_dtype": (
        {"target_prompt_logprobs": {"data": [1, 2, 3], "dtype": "float32", "shape": [3, 1]}},
        "must be an int64 tensor",
    ),
    "target_1d": (_target([1, 2, 3], [3]), "must be 2-D"),
    "target_no_shape": (_target([1, 2, 3], None), "must be 2-D"),
    "target_wrong_rows": (_target([1, 2], [2, 1]), "len(prompt) - 1 = 3 rows, got 2"),
    "target_zero_columns": (_target([], [3, 0]), "between 1 and 1024 columns"),
    "target_too_wide": (_target([1] * 3075, [3, 1025]), "between 1 and 1024 columns"),
    "target_short_data": (_target([1, 2], [3, 1]), "needs 3 values, got 2"),
    "target_below_minus_one": (_target([1, -2, 3], [3, 1]), "-1 (no request)"),
    "target_huge_id": (_target([1, 2**40, 3], [3, 1]), "-1 (no request)"),
    "target_all_pad": (_target([-1, -1, -1], [3, 1]), "names no token id"),
    "target_crow_without_col": (_target([4], [3, 2], crow=[0, 0, 0, 1]), "given together"),
    "target_bad_crow": (_target([4], [3, 2], crow=[0, 1], col=[0]), "4 entries"),
    "target_decreasing_crow": (_target([4, 5], [3, 2], crow=[0, 2, 1, 2], col=[0, 1]), "must not decrease"),
    "target_col_out_of_range": (_target([4], [3, 2], crow=[0, 0, 0, 1], col=[2]), r"in [0, 2)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_extras_are_invalid_input(case: str) -> None:
    fields, phrase = BAD[case]
    with pytest.raises(InvalidInput) as err:
        raw_op(**fields)
    assert phrase in err.value.message


def test_target_ids_checked_against_the_vocabulary() -> None:
    op = raw_op(**_target([1, 99, -1], [3, 1]))
    check_target_ids(op, vocab=100)
    with pytest.raises(InvalidInput, match=r"token id 99 is outside the vocabulary \[0, 99\)"):
        check_target_ids(op, vocab=99)
    check_target_ids(raw_op(), vocab=1)  # nothing to check


# responses


def _table(ids: list[list[int]], lps: list[list[float]]) -> TokenTable:
    shape = (len(ids), len(ids[0]) if ids else 0)
    return TokenTable(
        token_ids=Array.from_list([t for r in ids for t in r], "int64", shape),
        logprobs=Array.from_list([v for r in lps for v in r], "float32", shape),
    )


def test_topk_sampled_logprobs_reach_the_sequences() -> None:
    result = SampleResult(
        sequences=(
            SampledSequence(
                tokens=(7, 9),
                logprobs=(-0.5, -2.0),
                stop_reason="length",
                topk_logprobs=_table([[7, 3], [1, 9]], [[-0.5, -1.25], [-0.75, -2.0]]),
            ),
            SampledSequence(tokens=(4,), logprobs=(-0.25,), stop_reason="stop"),
        )
    )
    out = sdk_response(result)
    assert out.sequences[0].topk_logprobs == [[(7, -0.5), (3, -1.25)], [(1, -0.75), (9, -2.0)]]
    assert out.sequences[0].topk_logprobs_np is not None
    assert out.sequences[0].topk_logprobs_np.token_ids.shape == (2, 2)
    assert out.sequences[1].topk_logprobs is None  # absent: not requested
    assert out.prompt_logprobs is None and out.target_prompt_logprobs is None and out.prompt_alt_tokens is None


def test_last_n_masking_passes_the_sdk_check() -> None:
    result = SampleResult(
        sequences=(SampledSequence(tokens=(1,), logprobs=(-1.0,), stop_reason="length"),),
        prompt_logprobs=(None, None, -0.5, -0.25),
        topk_prompt_logprobs=(None, None, ((3, -0.5),), ((4, -0.25),)),
    )
    out = sdk_response(result)
    assert out.prompt_logprobs == [None, None, -0.5, -0.25]
    assert out.topk_prompt_logprobs == [None, None, [(3, -0.5)], [(4, -0.25)]]
    _check_prompt_logprobs_last_n_honored(out, 2)
    # An unmasked position before the suffix is what the SDK refuses.
    with pytest.raises(RuntimeError, match="prompt_logprobs_last_n=1"):
        _check_prompt_logprobs_last_n_honored(out, 1)


def test_one_token_prompt_topk_reads_back_as_a_none_row() -> None:
    out = sdk_response(
        SampleResult(
            sequences=(SampledSequence(tokens=(1,), logprobs=(-1.0,), stop_reason="length"),),
            prompt_logprobs=(None,),
            topk_prompt_logprobs=(None,),
        )
    )
    assert out.prompt_logprobs == [None]
    assert out.topk_prompt_logprobs == [None]


def test_dense_target_logprobs_come_back_dense() -> None:
    grid = PromptGrid(shape=(2, 2), values=Array.from_list([-0.5, 0.0, -1.5, -2.5], "float32"))
    out = sdk_response(
        SampleResult(
            sequences=(SampledSequence(tokens=(1,), logprobs=None, stop_reason="stop"),), target_prompt_logprobs=grid
        )
    )
    td = out.target_prompt_logprobs
    assert td is not None and td.dtype == "float32" and td.shape == [2, 2]
    assert td.sparse_crow_indices is None
    assert td.to_torch().tolist() == [[-0.5, 0.0], [-1.5, -2.5]]


def test_sparse_target_logprobs_come_back_in_the_request_layout() -> None:
    grid = PromptGrid(
        shape=(3, 4), values=Array.from_list([-0.75], "float32"), crow_indices=(0, 0, 0, 1), col_indices=(1,)
    )
    out = sdk_response(
        SampleResult(
            sequences=(SampledSequence(tokens=(1,), logprobs=None, stop_reason="stop"),), target_prompt_logprobs=grid
        )
    )
    td = out.target_prompt_logprobs
    assert td is not None and td.shape == [3, 4]
    assert td.sparse_crow_indices == [0, 0, 0, 1] and td.sparse_col_indices == [1]
    dense = td.to_torch().tolist()
    assert dense[2][1] == -0.75 and sum(v != 0 for row in dense for v in row) == 1


def test_prompt_alt_tokens_pass_the_sdk_check() -> None:
    alt = _table([[5, 5, 6], [7, 8, 9]], [[-0.1, -0.1, -3.0], [-1.0, -2.0, -4.0]])
    out = sdk_response(
        SampleResult(
            sequences=(SampledSequence(tokens=(1,), logprobs=None, stop_reason="stop"),), prompt_alt_tokens=alt
        )
    )
    assert out.prompt_alt_tokens is not None
    assert out.prompt_alt_tokens.tokens.dtype == "int64"
    assert out.prompt_alt_tokens.tokens.to_torch().tolist() == [[5, 5, 6], [7, 8, 9]]
    logprobs = out.prompt_alt_tokens.logprobs.to_numpy()
    assert logprobs.shape == (2, 3) and np.allclose(logprobs, [[-0.1, -0.1, -3.0], [-1.0, -2.0, -4.0]])
    _check_prompt_alt_tokens_returned(out, 3)


def test_empty_alt_tokens_table_is_still_present() -> None:
    # A one-token prompt has no position to draw at; the field must still be there (0.38 raises on absence).
    alt = TokenTable(token_ids=Array.from_list([], "int64", (0, 2)), logprobs=Array.from_list([], "float32", (0, 2)))
    out = sdk_response(
        SampleResult(
            sequences=(SampledSequence(tokens=(1,), logprobs=None, stop_reason="stop"),), prompt_alt_tokens=alt
        )
    )
    assert out.prompt_alt_tokens is not None and out.prompt_alt_tokens.tokens.shape == [0, 2]
    _check_prompt_alt_tokens_returned(out, 2)


def test_nan_free_float32_round_trip_of_sampled_topk() -> None:
    value = -math.pi
    table = _table([[3]], [[value]])
    out = sdk_response(
        SampleResult(
            sequences=(SampledSequence(tokens=(3,), logprobs=(value,), stop_reason="stop", topk_logprobs=table),)
        )
    )
    assert out.sequences[0].topk_logprobs == [[(3, pytest.approx(value, rel=1e-7))]]
    assert out.sequences[0].logprobs == [pytest.approx(value, rel=1e-7)]


# the grid itself


def test_grid_rows_and_checks() -> None:
    dense = PromptGrid(shape=(2, 3), values=Array.from_list([1, 2, 3, 4, 5, 6], "int64"))
    dense.check()
    assert dense.rows() == [0, 0, 0, 1, 1, 1]
    sparse = PromptGrid(
        shape=(3, 2), values=Array.from_list([1, 2, 3], "int64"), crow_indices=(0, 2, 2, 3), col_indices=(0, 1, 1)
    )
    sparse.check()
    assert sparse.rows() == [0, 0, 2]
    assert sparse.with_values(Array.from_list([0.5, 1.5, 2.5], "float32")).crow_indices == (0, 2, 2, 3)
    with pytest.raises(ValueError, match="needs 6 values"):
        PromptGrid(shape=(2, 3), values=Array.from_list([1], "int64")).check()
