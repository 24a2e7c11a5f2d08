"""POST /api/v1/forward_backward: protobuf bodies as the SDK sends them, and every way they break.

Content the model cannot run is still recorded, as an already-failed future with category user,
so the run's seq order has no hole; a body whose envelope cannot be read is a 400/413.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from typing import Any

import pytest
import zstandard
from tinker import types
from tinker.proto import tinker_public_pb2 as sdk_pb

from tests.api.helpers import (
    KEY_B,
    MAX_DECOMPRESSED_BYTES,
    MAX_REQUEST_BYTES,
    VOCAB,
    Api,
    assert_error,
    ce_datum,
    fb_body,
    fb_message,
)


def _zstd(body: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(body)


def _send(api: Api, body: bytes, encoding: str | None, **kw: Any) -> Any:
    """Plain, or zstd-compressed as the SDK sends it when client/config asks (ours does)."""
    if encoding == "zstd":
        return api.post_proto(_zstd(body), encoding="zstd", **kw)
    return api.post_proto(body, **kw)


def _datum(tokens: list[int], targets: Any, weights: Any) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens), loss_fn_inputs={"target_tokens": targets, "weights": weights}
    )


def _i64(values: list[int]) -> types.TensorData:
    return types.TensorData(data=values, dtype="int64", shape=[len(values)])


def _f32(values: list[float]) -> types.TensorData:
    return types.TensorData(data=values, dtype="float32", shape=[len(values)])


def _unknown_loss(model_id: str, seq: int) -> bytes:
    msg = fb_message(model_id, seq)
    msg.loss_fn = "bogus_loss"
    return msg.SerializeToString()


def _empty_data(model_id: str, seq: int) -> bytes:
    msg = fb_message(model_id, seq)
    del msg.data[:]
    return msg.SerializeToString()


def _no_targets(model_id: str, seq: int) -> bytes:
    datum = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]), loss_fn_inputs={"weights": _f32([1.0] * 3)})
    return fb_body(model_id, seq, [datum])


def _empty_model_input(model_id: str, seq: int) -> bytes:
    return fb_body(model_id, seq, [_datum([], _i64([]), _f32([]))])


def _image_chunk(model_id: str, seq: int) -> bytes:
    msg = fb_message(model_id, seq)
    chunk = msg.data[0].model_input.add()
    chunk.image.data = b"\x89PNG"
    chunk.image.format = "png"
    return msg.SerializeToString()


def _nan_weights(model_id: str, seq: int) -> bytes:
    return fb_body(model_id, seq, [_datum([1, 2, 3], _i64([2, 3, 4]), _f32([1.0, float("nan"), 1.0]))])


def _too_long(model_id: str, seq: int) -> bytes:
    tokens = list(range(1, 2050))
    return fb_body(model_id, seq, [ce_datum(tokens)])


# name -> (body builder, a phrase the failed future's message must contain)
CONTENT_ERRORS: dict[str, tuple[Callable[[str, int], bytes], str]] = {
    "token_at_vocab": (lambda m, s: fb_body(m, s, [ce_datum([1, VOCAB, 3])]), str(VOCAB)),
    "token_far_above_vocab": (lambda m, s: fb_body(m, s, [ce_datum([1, 2**31 - 1])]), "vocabulary"),
    "target_at_vocab": (lambda m, s: fb_body(m, s, [ce_datum([1, 2, 3], [2, 3, VOCAB])]), "target_tokens"),
    "negative_token": (lambda m, s: fb_body(m, s, [ce_datum([1, -5, 3])]), "non-negative"),
    "negative_target": (lambda m, s: fb_body(m, s, [ce_datum([1, 2, 3], [2, -1, 4])]), "target_tokens"),
    "weights_length_mismatch": (lambda m, s: fb_body(m, s, [ce_datum([1, 2, 3, 4], None, [1.0, 1.0])]), "weights"),
    "targets_length_mismatch": (lambda m, s: fb_body(m, s, [ce_datum([1, 2, 3, 4], [2, 3])]), "target_tokens"),
    "weights_as_int64": (lambda m, s: fb_body(m, s, [_datum([1, 2, 3], _i64([2, 3, 4]), _i64([1, 1, 1]))]), "float32"),
    "targets_as_float32": (
        lambda m, s: fb_body(m, s, [_datum([1, 2, 3], _f32([2.0, 3.0, 4.0]), _f32([1.0] * 3))]),
        "int64",
    ),
    "unknown_loss": (_unknown_loss, "bogus_loss"),
    "empty_datum_list": (_empty_data, "datum"),
    "cross_entropy_without_targets": (_no_targets, "target_tokens"),
    "empty_model_input": (_empty_model_input, "no tokens"),
    "image_chunk": (_image_chunk, "not supported"),
    "nan_weights": (_nan_weights, "nan"),
    "longer_than_context": (_too_long, "maximum length"),
}


@pytest.mark.parametrize("encoding", [None, "zstd"])
@pytest.mark.parametrize("case", sorted(CONTENT_ERRORS))
def test_content_error_is_a_failed_future_and_the_run_goes_on(api: Api, case: str, encoding: str | None) -> None:
    build, phrase = CONTENT_ERRORS[case]
    model_id = api.model()
    r = _send(api, build(model_id, 1), encoding)
    request_id = api.accepted(r)
    assert r.json()["model_id"] == model_id
    message = api.failed_future(request_id)
    assert phrase.lower() in message.lower(), message
    # The next seq of the same model is still accepted (and queued: no worker runs here).
    later = api.accepted(_send(api, fb_body(model_id, 2), encoding))
    assert later != request_id
    api.queued(later)


def test_valid_forward_and_forward_backward_are_queued(api: Api) -> None:
    model_id = api.model()
    data = [ce_datum([1, 2, 3]), ce_datum([4, 5, 6, 7, 8], weights=[0.0, 0.5, 1.0, 1.0, 0.0])]
    first = api.accepted(api.post_proto(fb_body(model_id, 1, data, forward_only=True)))
    second = api.accepted(api.post_proto(_zstd(fb_body(model_id, 2, data)), encoding="zstd"))
    api.queued(first)
    api.queued(second)
    # Chunks may arrive out of order: the SDK sends the first chunk last (tinker-protocol.md §0.7).
    api.accepted(api.post_proto(fb_body(model_id, 4, data)))
    api.accepted(api.post_proto(fb_body(model_id, 3, data)))


def test_unknown_model_is_404(api: Api) -> None:
    assert_error(api.post_proto(fb_body("s-nope:train:0", 1)), 404, error="not_found")
    # ... even when the content is broken too (the model is looked up before recording a failure).
    assert_error(api.post_proto(fb_body("s-nope:train:0", 1, [ce_datum([VOCAB])])), 404, error="not_found")


def test_another_tenants_model_is_404(api: Api) -> None:
    model_id = api.model()
    assert_error(api.post_proto(fb_body(model_id, 1), key=KEY_B), 404, error="not_found")


def _truncated() -> bytes:
    body = fb_body("s-x:train:0", 1, [ce_datum(list(range(1, 40)))])
    return body[: len(body) - 7]


def _bad_varint() -> bytes:
    return b"\x10" + b"\xff" * 11  # field 2 (seq_id) with an 11-byte varint


MALFORMED: dict[str, tuple[bytes, str | None]] = {
    "garbage": (b"\xff\xfe\xfd this is not protobuf", None),
    "truncated": (_truncated(), None),
    "bad_varint": (_bad_varint(), None),
    "json_instead_of_proto": (b'{"model_id": "s-x:train:0", "seq_id": 1}', None),
    "zstd_garbage": (b"\x28\xb5\x2f\xfd garbage after a zstd magic number", "zstd"),
    "not_zstd_at_all": (b"plain bytes", "zstd"),
    "zstd_truncated": (_zstd(fb_body("s-x:train:0", 1, [ce_datum(list(range(1, 200)))]))[:-9], "zstd"),
    "gzip_encoding": (gzip.compress(fb_body("s-x:train:0", 1)), "gzip"),
    "br_encoding": (fb_body("s-x:train:0", 1), "br"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_unreadable_body_is_400(api: Api, case: str) -> None:
    body, encoding = MALFORMED[case]
    assert_error(api.post_proto(body, encoding=encoding), 400, error="malformed_request")


def test_unsupported_encoding_names_itself(api: Api) -> None:
    model_id = api.model()
    err = assert_error(api.post_proto(gzip.compress(fb_body(model_id, 1)), encoding="gzip"), 400)
    assert "gzip" in err["message"]


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda m: setattr(m, "seq_id", 0), id="seq_id_0"),
        pytest.param(lambda m: m.ClearField("seq_id"), id="seq_id_missing"),
        pytest.param(lambda m: setattr(m, "seq_id", -3), id="seq_id_negative"),
        pytest.param(lambda m: m.ClearField("model_id"), id="model_id_missing"),
    ],
)
def test_missing_envelope_fields_are_400(api: Api, mutate: Callable[[sdk_pb.ForwardBackwardRequest], None]) -> None:
    model_id = api.model()
    msg = fb_message(model_id, 1)
    mutate(msg)
    err = assert_error(api.post_proto(msg.SerializeToString()), 400, error="invalid_input")
    assert "seq_id" in err["message"] or "model_id" in err["message"]
    # Nothing was recorded: seq 1 is still free for the real request.
    api.accepted(api.post_proto(fb_body(model_id, 1)))


def test_sdk_none_seq_id_is_400(api: Api) -> None:
    # A caller-supplied seq_id None goes on the wire as 0 (request_conv.py).
    assert_error(api.post_proto(fb_body(api.model(), None)), 400, contains="seq_id")


def test_empty_body_is_400(api: Api) -> None:
    assert_error(api.post_proto(b""), 400)


def test_body_over_max_request_bytes_is_413(api: Api) -> None:
    model_id = api.model()
    tokens = list(range(1, 2001))
    data = [ce_datum(tokens) for _ in range(40)]  # 40 * 2000 * 16 bytes > 1 MiB
    body = fb_body(model_id, 1, data)
    assert len(body) > MAX_REQUEST_BYTES
    err = assert_error(api.post_proto(body), 413, error="payload_too_large")
    assert str(MAX_REQUEST_BYTES) in err["message"]
    # Without a Content-Length (chunked upload) the limit holds while streaming.
    chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)]
    r = api.post("/api/v1/forward_backward", content=iter(chunks), headers={"Content-Type": "application/x-protobuf"})
    assert "content-length" not in r.request.headers
    assert_error(r, 413, error="payload_too_large")
    # JSON endpoints share the limit.
    big = {"tags": ["x" * 1000] * 1100}
    assert_error(api.post("/api/v1/create_session", big), 413, error="payload_too_large")
    # The run is unharmed: seq 1 was never recorded.
    api.accepted(api.post_proto(fb_body(model_id, 1)))


@pytest.mark.parametrize("with_size", [True, False], ids=["declared_size", "streamed"])
def test_zstd_bomb_is_413(api: Api, with_size: bool) -> None:
    model_id = api.model()
    inflated = fb_body(model_id, 1) + b"\x00" * (MAX_DECOMPRESSED_BYTES + 1024)
    bomb = zstandard.ZstdCompressor(write_content_size=with_size).compress(inflated)
    assert len(bomb) < MAX_REQUEST_BYTES
    assert_error(api.post_proto(bomb, encoding="zstd"), 413, error="payload_too_large")
