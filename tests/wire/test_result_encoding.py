"""Our protobuf results, decoded by the SDK's own reader (the path api_future_impl.py takes)."""

from __future__ import annotations

import math

import pytest
from tinker import types
from tinker.proto.response_conv import deserialize_proto_response

from app.domain.errors import ServerError
from app.domain.results import ForwardBackwardResult, SampledSequence, SampleResult
from app.domain.tensors import Array
from app.wire.codec import PROTOBUF_MEDIA_TYPE, encode_forward_backward_output, encode_sample_response
from app.wire.responses import encode_result


def f32(values: list[float], shape: tuple[int, ...] | None = None) -> Array:
    return Array.from_list(values, "float32", shape)


def sdk_fwdbwd(result: ForwardBackwardResult) -> types.ForwardBackwardOutput:
    out = deserialize_proto_response(encode_forward_backward_output(result), types.ForwardBackwardOutput)
    assert isinstance(out, types.ForwardBackwardOutput)
    return out


def sdk_sample(result: SampleResult) -> types.SampleResponse:
    out = deserialize_proto_response(encode_sample_response(result), types.SampleResponse)
    assert isinstance(out, types.SampleResponse)
    return out


def test_logprobs_per_datum_round_trip() -> None:
    result = ForwardBackwardResult(
        outputs=({"logprobs": f32([-0.5, -1.0, -2.0, -0.25])}, {"logprobs": f32([-3.0, -0.125])}),
        metrics={"loss:sum": 1.25, "tokens:sum": 6.0},
    )
    out = sdk_fwdbwd(result)
    assert out.loss_fn_output_type == "ArrayRecord"
    assert out.metrics == {"loss:sum": 1.25, "tokens:sum": 6.0}
    assert len(out.loss_fn_outputs) == 2
    first = out.loss_fn_outputs[0]["logprobs"]
    assert first.dtype == "float32"
    assert first.shape == [4]
    assert first.tolist() == [-0.5, -1.0, -2.0, -0.25]
    assert out.loss_fn_outputs[1]["logprobs"].shape == [2]
    assert out.loss_fn_outputs[1]["logprobs"].tolist() == [-3.0, -0.125]


def test_multi_field_2d_and_int64_outputs() -> None:
    result = ForwardBackwardResult(
        outputs=(
            {"logprobs": f32([-1.0, -2.0]), "topk": Array.from_list([1, 2, 3, 4, 5, 6], "int64", (2, 3))},
            {"logprobs": f32([-4.0]), "topk": Array.from_list([7, 8, 9], "int64", (1, 3))},
        ),
        metrics={"loss:sum": 0.0},
    )
    out = sdk_fwdbwd(result)
    topk = out.loss_fn_outputs[0]["topk"]
    assert (topk.dtype, topk.shape, topk.tolist()) == ("int64", [2, 3], [[1, 2, 3], [4, 5, 6]])
    assert out.loss_fn_outputs[1]["topk"].tolist() == [[7, 8, 9]]
    assert out.loss_fn_outputs[1]["logprobs"].tolist() == [-4.0]


def test_ragged_trailing_shapes_split_into_records() -> None:
    result = ForwardBackwardResult(
        outputs=(
            {"x": f32([1.0, 2.0], (1, 2))},
            {"x": f32([3.0, 4.0, 5.0], (1, 3))},
            {"x": f32([6.0, 7.0, 8.0], (1, 3))},
        ),
        metrics={},
    )
    out = sdk_fwdbwd(result)
    assert [o["x"].shape for o in out.loss_fn_outputs] == [[1, 2], [1, 3], [1, 3]]
    assert out.loss_fn_outputs[2]["x"].tolist() == [[6.0, 7.0, 8.0]]


def test_no_outputs_and_fieldless_outputs() -> None:
    assert sdk_fwdbwd(ForwardBackwardResult(outputs=(), metrics={"loss:sum": 2.0})).loss_fn_outputs == []
    fieldless = sdk_fwdbwd(ForwardBackwardResult(outputs=({}, {}, {}), metrics={}))
    assert fieldless.loss_fn_outputs == [{}, {}, {}]


def test_empty_per_datum_array() -> None:
    out = sdk_fwdbwd(ForwardBackwardResult(outputs=({"logprobs": f32([])}, {"logprobs": f32([1.5])}), metrics={}))
    assert out.loss_fn_outputs[0]["logprobs"].shape == [0]
    assert out.loss_fn_outputs[1]["logprobs"].tolist() == [1.5]


def test_mismatched_fields_or_bad_arrays_are_server_errors() -> None:
    with pytest.raises(ServerError, match="fields"):
        encode_forward_backward_output(
            ForwardBackwardResult(outputs=({"a": f32([1.0])}, {"b": f32([1.0])}), metrics={})
        )
    bad = Array(dtype="float32", shape=(3,), data=b"\0" * 4)
    with pytest.raises(ServerError, match="needs 12 bytes"):
        encode_forward_backward_output(ForwardBackwardResult(outputs=({"a": bad},), metrics={}))


def test_sample_sequences_and_stop_reasons() -> None:
    result = SampleResult(
        sequences=(
            SampledSequence(tokens=(11, 12, 13), logprobs=(-0.5, -0.25, -1.0), stop_reason="stop"),
            SampledSequence(tokens=(21, 2_000_000), logprobs=None, stop_reason="length"),
        ),
    )
    out = sdk_sample(result)
    assert [s.stop_reason for s in out.sequences] == ["stop", "length"]
    assert out.sequences[0].tokens == [11, 12, 13]
    assert out.sequences[0].logprobs == [-0.5, -0.25, -1.0]
    assert out.sequences[1].tokens == [21, 2_000_000]
    assert out.sequences[1].logprobs is None
    assert out.prompt_logprobs is None
    assert out.topk_prompt_logprobs is None


def test_prompt_logprobs_none_at_position_zero() -> None:
    result = SampleResult(
        sequences=(SampledSequence(tokens=(4,), logprobs=(-0.75,), stop_reason="length"),),
        prompt_logprobs=(None, -0.5, -1.5),
    )
    out = sdk_sample(result)
    assert out.prompt_logprobs == [None, -0.5, -1.5]
    assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None


def test_topk_prompt_logprobs_padded_and_none_rows() -> None:
    result = SampleResult(
        sequences=(SampledSequence(tokens=(4,), logprobs=None, stop_reason="stop"),),
        prompt_logprobs=(None, -0.5, -0.25),
        topk_prompt_logprobs=(None, ((7, -0.5), (9, -1.0)), ((3, -0.25),)),
    )
    out = sdk_sample(result)
    assert out.topk_prompt_logprobs == [None, [(7, -0.5), (9, -1.0)], [(3, -0.25)]]


def test_encode_result_always_protobuf_for_fwdbwd_and_sample() -> None:
    fb = ForwardBackwardResult(outputs=({"logprobs": f32([-1.0])},), metrics={"loss:sum": 1.0})
    sample = SampleResult(sequences=(SampledSequence(tokens=(1,), logprobs=None, stop_reason="stop"),))
    for result in (fb, sample):
        for accept in (None, "application/json", PROTOBUF_MEDIA_TYPE):
            body, media_type = encode_result(result, accept)
            assert media_type == PROTOBUF_MEDIA_TYPE
            assert body
    body, _ = encode_result(fb)
    assert sdk_fwdbwd(fb).metrics == deserialize_proto_response(body, types.ForwardBackwardOutput).metrics  # type: ignore[attr-defined]


def test_float32_rounding_is_the_only_change() -> None:
    value = math.pi
    out = sdk_sample(
        SampleResult(
            sequences=(SampledSequence(tokens=(1,), logprobs=(-value,), stop_reason="stop"),),
            prompt_logprobs=(None, -value),
        )
    )
    assert out.sequences[0].logprobs == [pytest.approx(-value, rel=1e-7)]
    assert out.prompt_logprobs == [None, pytest.approx(-value, rel=1e-7)]
