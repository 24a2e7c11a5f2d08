"""Cheap bounds (issue 7 item 6): a forward_backward body is refused on counts read from the parsed
message's lengths, before any list, tuple or tensor is built; JSON bodies are checked for depth,
NUL, surrogates and 64-bit integers before a model sees them (item 8)."""

from __future__ import annotations

import json
import time
import tracemalloc
from typing import Any

import pytest
import zstandard

from app.domain.errors import InvalidInput, MalformedRequest
from app.wire import json_guard
from app.wire.codec import DecodeLimits, decode_forward_backward, decode_forward_backward_located
from app.wire.proto import pb

LIMITS = DecodeLimits(max_decompressed_bytes=256 << 20, max_datums=64, max_tokens_per_datum=2048, max_tokens=10_000)


def _body(tokens_per_datum: list[int], *, inputs: dict[str, int] | None = None, chunks: int = 1) -> bytes:
    msg = pb.ForwardBackwardRequest(model_id="s-1:train:0", seq_id=7, loss_fn="cross_entropy")
    for n in tokens_per_datum:
        datum = msg.data.add()
        for _ in range(chunks):
            datum.model_input.add().encoded_text.tokens = bytes(4 * (n // chunks))
        for name, elements in (inputs if inputs is not None else {"target_tokens": n}).items():
            tensor = datum.loss_fn_inputs[name]
            tensor.dtype = pb.DTYPE_INT64
            tensor.dense = bytes(8 * elements)
    return msg.SerializeToString()


def _refused(body: bytes, encoding: str | None = None) -> str:
    decoded = decode_forward_backward_located(body, encoding, LIMITS)
    # The envelope is still read: the failure is recorded at that seq (routes/training.py).
    assert (decoded.model_id, decoded.seq_id, decoded.op) == ("s-1:train:0", 7, None)
    assert isinstance(decoded.error, InvalidInput)
    return decoded.error.message


def test_a_body_within_the_bounds_decodes() -> None:
    _, _, op = decode_forward_backward(_body([2048, 100]), None, LIMITS)
    assert [len(d.tokens) for d in op.data] == [2048, 100]


def test_60m_tokens_are_refused_without_building_them() -> None:
    # 7.8 KB of zstd carried 60 M tokens in the report: 37 s and 3.7 GB of API memory. The
    # tokens are counted from the message's lengths; no Python object is made for them.
    raw = _body([60_000_000], inputs={})
    compressed = zstandard.ZstdCompressor().compress(raw)
    assert len(compressed) < 64 << 10
    assert "60000000 tokens exceed the model's maximum length 2048" in _refused(compressed, "zstd")
    # Uncompressed, so that everything tracemalloc sees is what decoding allocates (the parsed
    # message itself lives outside its view). Counting may copy the token bytes once (240 MB,
    # transient); building them would take an array of them and a tuple of 480 MB more.
    tracemalloc.start()
    started = time.monotonic()
    try:
        message = _refused(raw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "60000000 tokens exceed" in message
    assert peak < 4 * 60_000_000 + (16 << 20), peak
    print(f"60M-token body refused in {time.monotonic() - started:.2f} s, Python peak {peak >> 10} KiB")


@pytest.mark.parametrize(
    ("body", "phrase"),
    [
        (_body([10] * 65), "65 datums exceed the per-request limit 64"),
        (_body([2049]), "2049 tokens exceed"),
        (_body([2000] * 6), "more than 10000 tokens (max_tokens_per_request)"),
        (_body([3000], chunks=3000), "3000 chunks exceed"),
        (_body([4], inputs={f"x{i}": 4 for i in range(17)}), "17 loss_fn_inputs"),
        (_body([2000] * 5, inputs={"target_tokens": 2000, "weights": 20_000}), "carry more than 80000 values"),
    ],
)
def test_counts_beyond_the_bounds_are_refused(body: bytes, phrase: str) -> None:
    assert phrase in _refused(body)


def test_a_huge_declared_shape_counts_against_the_element_bound() -> None:
    msg = pb.ForwardBackwardRequest(model_id="s-1:train:0", seq_id=7, loss_fn="cross_entropy")
    datum = msg.data.add()
    datum.model_input.add().encoded_text.tokens = bytes(16)
    tensor = datum.loss_fn_inputs["weights"]
    tensor.dtype = pb.DTYPE_FLOAT32
    tensor.shape.extend([10**9, 10**9])
    assert "values" in _refused(msg.SerializeToString())


# JSON


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ('{"a":' * 100_000 + "1" + "}" * 100_000, "nests deeper"),
        ('{"k":' * 70 + "1" + "}" * 70, "nests deeper"),
        ('{"a": {"b": [1, "x\\u0000y"]}}', "a.b.1: must not contain NUL"),
        ('{"k\\u0000": 1}', "must not contain NUL"),
        ('{"a": "\\ud800"}', "a: contains an unpaired UTF-16 surrogate"),
        ('{"a": [18446744073709551616]}', "a.0: the integer 18446744073709551616 does not fit in 64 bits"),
        ('{"a": -9223372036854775809}', "does not fit in 64 bits"),
        ('{"a": ' + "9" * 5000 + "}", "not valid JSON"),
        ('{"a": 1', "not valid JSON"),
    ],
)
def test_json_guard_refuses(text: str, phrase: str) -> None:
    with pytest.raises((InvalidInput, MalformedRequest)) as info:
        json_guard.loads(text.encode())
    assert phrase in info.value.message


@pytest.mark.parametrize(
    "value",
    [
        {"a": [2**64 - 1, -(2**63), 1.5, "é", "\U0001f600", None, True]},
        {"deep": json.loads('{"k":' * 60 + "1" + "}" * 60)},
    ],
)
def test_json_guard_accepts(value: Any) -> None:
    assert json_guard.loads(json.dumps(value).encode()) == value
