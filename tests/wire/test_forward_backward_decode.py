"""decode_forward_backward against bodies produced by the real SDK's own encoder."""

from __future__ import annotations

import math
import struct
import tracemalloc
from typing import Any

import numpy as np
import pytest
import torch
import zstandard
from tinker import types
from tinker.proto import tinker_public_pb2 as sdk_pb
from tinker.proto.request_conv import forward_backward_request_to_proto

from app.domain.errors import InvalidInput, MalformedRequest, PayloadTooLarge
from app.domain.ops import ForwardBackwardOp, op_sha256
from app.wire.codec import decode_forward_backward

LIMIT = 8 << 20


def sdk_body(
    data: list[types.Datum],
    *,
    loss_fn: str = "cross_entropy",
    loss_fn_config: dict[str, float | str] | None = None,
    forward_only: bool = False,
    model_id: str = "s-1:train:0",
    seq_id: int | None = 1,
) -> bytes:
    # Exactly what resources/training.py::forward_backward does before the optional zstd.
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(
            data=data,
            loss_fn=loss_fn,  # type: ignore[arg-type]
            loss_fn_config=loss_fn_config,
        ),
        model_id=model_id,
        seq_id=seq_id,
    )
    msg = forward_backward_request_to_proto(request)
    msg.forward_only = forward_only
    return msg.SerializeToString()


def decode(body: bytes, encoding: str | None = None, limit: int = LIMIT) -> tuple[str, int, ForwardBackwardOp]:
    return decode_forward_backward(body, encoding, limit)


def ce_datum(tokens: list[int], targets: list[int], weights: list[float]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens),
        loss_fn_inputs={"target_tokens": targets, "weights": weights},  # type: ignore[dict-item]
    )


def test_cross_entropy_lists_round_trip() -> None:
    body = sdk_body([ce_datum([5, 6, 7], [6, 7, 8], [0.0, 1.0, 1.0]), ce_datum([1, 2], [2, 3], [1.0, 0.5])])
    model_id, seq_id, op = decode(body)
    assert (model_id, seq_id) == ("s-1:train:0", 1)
    assert op.loss_fn == "cross_entropy"
    assert op.forward_only is False
    assert op.loss_fn_config == {}
    assert [d.tokens for d in op.data] == [(5, 6, 7), (1, 2)]
    first = op.data[0].loss_fn_inputs
    assert first["target_tokens"].dtype == "int64"
    assert first["target_tokens"].shape == (3,)
    assert first["target_tokens"].tolist() == [6, 7, 8]
    assert first["weights"].dtype == "float32"
    assert first["weights"].tolist() == [0.0, 1.0, 1.0]
    assert op.data[1].loss_fn_inputs["weights"].tolist() == [1.0, 0.5]


def test_zstd_body_decodes_like_plain() -> None:
    body = sdk_body([ce_datum([5, 6, 7], [6, 7, 8], [1.0, 1.0, 1.0])], seq_id=3)
    plain = decode(body)
    compressed = decode(zstandard.ZstdCompressor().compress(body), "zstd")
    assert compressed == plain
    assert compressed[1] == 3
    assert decode(body, "identity") == plain


def test_multi_chunk_model_input_is_concatenated_in_order() -> None:
    model_input = types.ModelInput(
        chunks=[types.EncodedTextChunk(tokens=[1, 2]), types.EncodedTextChunk(tokens=[3, 4, 5])]
    )
    datum = types.Datum(model_input=model_input, loss_fn_inputs={"target_tokens": [2, 3, 4, 5, 6]})  # type: ignore[dict-item]
    _, _, op = decode(sdk_body([datum]))
    assert op.data[0].tokens == (1, 2, 3, 4, 5)


def test_numpy_and_torch_inputs() -> None:
    advantages = np.array([[0.5, -1.0], [2.0, 0.25]], dtype=np.float32)
    inputs: dict[str, Any] = {
        "target_tokens": torch.tensor([2, 3]),
        "logprobs": np.array([-0.1, -0.2], dtype=np.float64),  # widened to float32 by the SDK
        "advantages": advantages,
    }
    datum = types.Datum(model_input=types.ModelInput.from_ints([1, 2]), loss_fn_inputs=inputs)
    _, _, op = decode(sdk_body([datum], loss_fn="importance_sampling"))
    decoded = op.data[0].loss_fn_inputs
    assert decoded["target_tokens"].tolist() == [2, 3]
    assert decoded["logprobs"].tolist() == pytest.approx([-0.1, -0.2], rel=1e-6)
    assert decoded["advantages"].shape == (2, 2)
    assert decoded["advantages"].tolist() == [0.5, -1.0, 2.0, 0.25]


def test_sdk_auto_sparsified_2d_torch_tensors_are_densified() -> None:
    targets = torch.zeros((4, 6), dtype=torch.int64)
    targets[1, 2] = 7
    targets[3, 5] = 9
    weights = torch.zeros((4, 6), dtype=torch.float32)
    weights[0, 0] = 1.5
    inputs: dict[str, Any] = {"target_tokens": targets, "weights": weights}
    datum = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3, 4]), loss_fn_inputs=inputs)
    assert datum.loss_fn_inputs["target_tokens"].sparse_crow_indices is not None  # the SDK chose CSR
    _, _, op = decode(sdk_body([datum]))
    decoded = op.data[0].loss_fn_inputs
    assert decoded["target_tokens"].shape == (4, 6)
    assert decoded["target_tokens"].tolist() == targets.flatten().tolist()
    assert decoded["weights"].tolist() == weights.flatten().tolist()


def test_hand_built_sparse_tensor_data() -> None:
    sparse = types.TensorData(
        data=[3.0, 4.0, 5.0],
        dtype="float32",
        shape=[2, 3],
        sparse_crow_indices=[0, 2, 3],
        sparse_col_indices=[0, 2, 1],
    )
    datum = types.Datum(model_input=types.ModelInput.from_ints([1]), loss_fn_inputs={"weights": sparse})
    _, _, op = decode(sdk_body([datum]))
    assert op.data[0].loss_fn_inputs["weights"].tolist() == [3.0, 0.0, 4.0, 0.0, 5.0, 0.0]


def test_tensor_without_shape_is_one_dimensional() -> None:
    td = types.TensorData(data=[1, 2, 3], dtype="int64")
    datum = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]), loss_fn_inputs={"target_tokens": td})
    _, _, op = decode(sdk_body([datum]))
    assert op.data[0].loss_fn_inputs["target_tokens"].shape == (3,)


def test_loss_fn_config_v2_preferred_with_strings_and_numbers() -> None:
    body = sdk_body(
        [ce_datum([1], [2], [1.0])],
        loss_fn="ppo",
        loss_fn_config={"clip_low_threshold": 0.8, "clip_high_threshold": 1.2, "loss_id": "abc"},
        forward_only=True,
        seq_id=2,
    )
    _, seq_id, op = decode(body)
    assert seq_id == 2
    assert op.forward_only is True
    assert op.loss_fn == "ppo"
    assert op.loss_fn_config == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2, "loss_id": "abc"}


def test_legacy_loss_fn_config_map_as_sent_by_0_25() -> None:
    msg = sdk_pb.ForwardBackwardRequest()
    msg.ParseFromString(sdk_body([ce_datum([1], [2], [1.0])], loss_fn="cispo"))
    msg.loss_fn_config["clip_high_threshold"] = 4.0
    _, _, op = decode(msg.SerializeToString())
    assert op.loss_fn_config == {"clip_high_threshold": 4.0}


def test_v2_value_wins_over_legacy_map() -> None:
    msg = sdk_pb.ForwardBackwardRequest()
    msg.ParseFromString(sdk_body([ce_datum([1], [2], [1.0])], loss_fn_config={"beta": 0.5}))
    msg.loss_fn_config["beta"] = 9.0
    _, _, op = decode(msg.SerializeToString())
    assert op.loss_fn_config == {"beta": 0.5}


def test_unknown_loss_name_passes_through() -> None:
    msg = sdk_pb.ForwardBackwardRequest()
    msg.ParseFromString(sdk_body([ce_datum([1], [2], [1.0])]))
    msg.loss_fn = "made_up_loss"
    _, _, op = decode(msg.SerializeToString())
    assert op.loss_fn == "made_up_loss"


def _raw_request(tensor: sdk_pb.Tensor, tokens: bytes = struct.pack("<2i", 1, 2)) -> bytes:
    msg = sdk_pb.ForwardBackwardRequest(model_id="m", seq_id=1, loss_fn="cross_entropy")
    datum = msg.data.add()
    datum.model_input.add().encoded_text.tokens = tokens
    datum.loss_fn_inputs["x"].CopyFrom(tensor)
    return msg.SerializeToString()


def test_int32_and_bfloat16_are_widened() -> None:
    ints = sdk_pb.Tensor(dense=struct.pack("<2i", -3, 70000), dtype=sdk_pb.DTYPE_INT32, shape=[2])
    arr = decode(_raw_request(ints))[2].data[0].loss_fn_inputs["x"]
    assert (arr.dtype, arr.tolist()) == ("int64", [-3, 70000])
    # bfloat16 bits are the top half of the float32 bits.
    halves = [struct.unpack("<I", struct.pack("<f", v))[0] >> 16 for v in (1.0, -2.5)]
    bf16 = sdk_pb.Tensor(dense=struct.pack("<2H", *halves), dtype=sdk_pb.DTYPE_BFLOAT16)
    arr = decode(_raw_request(bf16))[2].data[0].loss_fn_inputs["x"]
    assert (arr.dtype, arr.shape, arr.tolist()) == ("float32", (2,), [1.0, -2.5])


def test_float32_bytes_kept_bit_for_bit() -> None:
    raw = struct.pack("<3f", math.inf, -0.0, 1.0) + b"\x01\x00\xc0\x7f"  # a NaN with a payload
    arr = decode(_raw_request(sdk_pb.Tensor(dense=raw, dtype=sdk_pb.DTYPE_FLOAT32, shape=[4])))[2]
    assert arr.data[0].loss_fn_inputs["x"].data == raw


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (sdk_pb.Tensor(dense=b"\0" * 12, dtype=sdk_pb.DTYPE_FLOAT32, shape=[4]), "needs 4 elements, got 3"),
        (sdk_pb.Tensor(dense=b"\0" * 10, dtype=sdk_pb.DTYPE_INT64, shape=[1]), "not a multiple"),
        (sdk_pb.Tensor(dense=b"\0" * 8, shape=[2]), "unsupported tensor dtype"),
        (sdk_pb.Tensor(dense=b"\0" * 8, dtype=sdk_pb.DTYPE_FLOAT32, shape=[-2]), "negative dimension"),
        (
            sdk_pb.Tensor(
                sparse_csr=sdk_pb.SparseCsr(values=b"", crow_indices=b"", col_indices=b""),
                dtype=sdk_pb.DTYPE_FLOAT32,
                shape=[4],
            ),
            "2-D shape",
        ),
        (
            sdk_pb.Tensor(
                sparse_csr=sdk_pb.SparseCsr(
                    values=struct.pack("<f", 1.0),
                    crow_indices=struct.pack("<3q", 0, 1, 2),
                    col_indices=struct.pack("<q", 0),
                ),
                dtype=sdk_pb.DTYPE_FLOAT32,
                shape=[2, 2],
            ),
            "crow_indices must have 3 entries running from 0 to 1",
        ),
        (
            sdk_pb.Tensor(
                sparse_csr=sdk_pb.SparseCsr(
                    values=struct.pack("<f", 1.0),
                    crow_indices=struct.pack("<3q", 0, 1, 1),
                    col_indices=struct.pack("<q", 5),
                ),
                dtype=sdk_pb.DTYPE_FLOAT32,
                shape=[2, 2],
            ),
            "column index 5 out of range",
        ),
        (
            sdk_pb.Tensor(
                sparse_csr=sdk_pb.SparseCsr(
                    values=struct.pack("<2f", 1.0, 2.0),
                    crow_indices=struct.pack("<3q", 0, 2, 2)[:16] + struct.pack("<q", 2),
                    col_indices=struct.pack("<2q", 0, 1),
                ),
                dtype=sdk_pb.DTYPE_FLOAT32,
                shape=[2, 1],
            ),
            "column index 1 out of range",
        ),
    ],
)
def test_bad_tensors_are_invalid_input(tensor: sdk_pb.Tensor, message: str) -> None:
    with pytest.raises(InvalidInput, match=message) as info:
        decode(_raw_request(tensor))
    assert "loss_fn_inputs['x']" in info.value.message


def test_decreasing_crow_indices_rejected() -> None:
    tensor = sdk_pb.Tensor(
        sparse_csr=sdk_pb.SparseCsr(
            values=struct.pack("<2f", 1.0, 2.0),
            crow_indices=struct.pack("<4q", 0, 2, 1, 2),
            col_indices=struct.pack("<2q", 0, 0),
        ),
        dtype=sdk_pb.DTYPE_FLOAT32,
        shape=[3, 1],
    )
    with pytest.raises(InvalidInput, match="must not decrease"):
        decode(_raw_request(tensor))


def test_sparse_tensor_that_densifies_past_the_cap_is_too_large() -> None:
    tensor = sdk_pb.Tensor(
        sparse_csr=sdk_pb.SparseCsr(values=b"", crow_indices=struct.pack("<2q", 0, 0), col_indices=b""),
        dtype=sdk_pb.DTYPE_FLOAT32,
        shape=[1, 10**12],
    )
    with pytest.raises(PayloadTooLarge):
        decode(_raw_request(tensor))


def test_image_chunk_is_rejected() -> None:
    datum = types.Datum(
        model_input=types.ModelInput(chunks=[types.ImageChunk(data=b"\x89PNG", format="png", expected_tokens=4)]),
        loss_fn_inputs={"target_tokens": [1, 2, 3, 4]},  # type: ignore[dict-item]
    )
    with pytest.raises(InvalidInput, match="image/audio input is not supported by this server"):
        decode(sdk_body([datum]))


def test_dmel_chunk_is_rejected() -> None:
    msg = sdk_pb.ForwardBackwardRequest(model_id="m", seq_id=1, loss_fn="cross_entropy")
    msg.data.add().model_input.add().dmel.dmel = b"\0" * 16
    with pytest.raises(InvalidInput, match="image/audio"):
        decode(msg.SerializeToString())


def test_token_bytes_not_whole_int32s_are_malformed() -> None:
    with pytest.raises(MalformedRequest, match="int32"):
        decode(_raw_request(sdk_pb.Tensor(dense=b"", dtype=sdk_pb.DTYPE_FLOAT32), tokens=b"\1\0\0\0\2\0"))


def test_negative_token_ids_rejected() -> None:
    with pytest.raises(InvalidInput, match="non-negative"):
        decode(sdk_body([ce_datum([1, -5], [2, 3], [1.0, 1.0])]))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_id": ""}, "model_id is required"),
        ({"seq_id": 0}, "seq_id is required"),
        ({"seq_id": -4}, "seq_id must be positive"),
        ({"loss_fn": ""}, "loss_fn is required"),
    ],
)
def test_missing_header_fields(changes: dict[str, object], message: str) -> None:
    msg = sdk_pb.ForwardBackwardRequest()
    msg.ParseFromString(sdk_body([ce_datum([1], [2], [1.0])]))
    for key, value in changes.items():
        setattr(msg, key, value)
    with pytest.raises(InvalidInput, match=message):
        decode(msg.SerializeToString())


def test_sdk_none_seq_id_is_missing() -> None:
    with pytest.raises(InvalidInput, match="seq_id is required"):
        decode(sdk_body([ce_datum([1], [2], [1.0])], seq_id=None))


def test_empty_data_and_empty_datum() -> None:
    with pytest.raises(InvalidInput, match="at least one datum"):
        decode(sdk_pb.ForwardBackwardRequest(model_id="m", seq_id=1, loss_fn="cross_entropy").SerializeToString())
    msg = sdk_pb.ForwardBackwardRequest(model_id="m", seq_id=1, loss_fn="cross_entropy")
    msg.data.add()
    with pytest.raises(InvalidInput, match="no tokens"):
        decode(msg.SerializeToString())


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff\xff\xff\xff\xff",  # an invalid tag
        b"\x0a\x10abc",  # model_id declares 16 bytes, 3 follow
        b"\x0a\x02\xc3\x28",  # model_id is not UTF-8
    ],
)
def test_garbage_protobuf_is_malformed(garbage: bytes) -> None:
    with pytest.raises(MalformedRequest, match="not a valid ForwardBackwardRequest"):
        decode(garbage)


def test_truncated_sdk_body_is_malformed() -> None:
    body = sdk_body([ce_datum(list(range(50)), list(range(1, 51)), [1.0] * 50)])
    with pytest.raises(MalformedRequest):
        decode(body[: len(body) - 7])


def test_unknown_content_encoding_is_malformed() -> None:
    with pytest.raises(MalformedRequest, match="Content-Encoding"):
        decode(b"", "gzip")


def test_corrupt_zstd_is_malformed() -> None:
    with pytest.raises(MalformedRequest, match="zstd"):
        decode(b"definitely not zstd", "zstd")
    frame = zstandard.ZstdCompressor().compress(b"x" * 1000)
    with pytest.raises(MalformedRequest, match="zstd"):
        decode(frame[:-6], "zstd")


def test_plain_body_over_the_cap_is_too_large() -> None:
    with pytest.raises(PayloadTooLarge):
        decode(b"\0" * 101, None, limit=100)


def _bomb(size: int, *, write_content_size: bool) -> bytes:
    compressor = zstandard.ZstdCompressor(level=3, write_content_size=write_content_size)
    chunk = b"\0" * (1 << 20)
    writer = compressor.compressobj(size=size if write_content_size else -1)
    parts = [writer.compress(chunk) for _ in range(size // len(chunk))]
    parts.append(writer.flush())
    return b"".join(parts)


@pytest.mark.parametrize("write_content_size", [True, False])
def test_zstd_bomb_stops_at_the_cap_without_inflating(write_content_size: bool) -> None:
    bomb = _bomb(200 << 20, write_content_size=write_content_size)
    assert len(bomb) < 200_000
    cap = 4 << 20
    tracemalloc.start()
    try:
        with pytest.raises(PayloadTooLarge):
            decode(bomb, "zstd", limit=cap)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * cap


def test_map_order_does_not_change_the_canonical_op() -> None:
    def body(order: list[str]) -> bytes:
        msg = sdk_pb.ForwardBackwardRequest(model_id="m", seq_id=1, loss_fn="ppo")
        datum = msg.data.add()
        datum.model_input.add().encoded_text.tokens = struct.pack("<i", 1)
        for name in order:
            datum.loss_fn_inputs[name].CopyFrom(
                sdk_pb.Tensor(dense=struct.pack("<f", 1.0), dtype=sdk_pb.DTYPE_FLOAT32, shape=[1])
            )
            msg.loss_fn_config_v2[name].number = 1.0
        return msg.SerializeToString()

    names = ["weights", "advantages", "target_tokens", "logprobs"]
    first, second = decode(body(names))[2], decode(body(names[::-1]))[2]
    assert op_sha256(first) == op_sha256(second)
    assert list(first.data[0].loss_fn_inputs) == sorted(names)
