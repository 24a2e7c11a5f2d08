"""Provenance spans (SDK 0.38 Datum.with_provenance) decoded from bodies the real SDK encodes:
kept for stable_reinforce, left out of the op (and so of its hash) for every loss, and bounded."""

from __future__ import annotations

import pytest
from tinker import types
from tinker.proto import tinker_public_pb2 as sdk_pb
from tinker.proto.request_conv import forward_backward_request_to_proto

from app.domain.provenance import Span
from app.wire.codec import decode_forward_backward_located

LIMIT = 8 << 20


def _datum(with_spans: bool = True) -> types.Datum:
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3, 4]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=[2, 3, 4, 5], dtype="int64", shape=[4]),
            "advantages": types.TensorData(data=[0.0, 0.0, 1.0, 1.0], dtype="float32", shape=[4]),
        },
    )
    if not with_spans:
        return datum
    return datum.with_provenance(
        model_input=[
            types.PromptProvenanceSpan(sequence_id="req-a:0", length=3),
            types.SampledProvenanceSpan(sequence_id="req-a:0", length=1),
        ],
        loss_fn_inputs=[
            types.PromptProvenanceSpan(sequence_id="req-a:0", offset=1, length=2),
            types.SampledProvenanceSpan(sequence_id="req-a:0", length=2),
        ],
    )


def _message(data: list[types.Datum], loss_fn: str) -> sdk_pb.ForwardBackwardRequest:
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn),  # type: ignore[arg-type]
        model_id="s-1:train:0",
        seq_id=1,
    )
    return forward_backward_request_to_proto(request)


def test_stable_reinforce_keeps_each_datums_spans() -> None:
    msg = _message([_datum(), _datum(with_spans=False)], "stable_reinforce")
    decoded = decode_forward_backward_located(msg.SerializeToString(), None, LIMIT)
    assert decoded.op is not None and decoded.provenance is not None
    first, second = decoded.provenance
    assert second is None
    assert first is not None
    assert first.model_input == (Span("prompt", "req-a:0", 0, 3), Span("sampled", "req-a:0", 0, 1))
    assert first.targets == (Span("prompt", "req-a:0", 1, 2), Span("sampled", "req-a:0", 0, 2))


def test_other_losses_ignore_spans_and_the_op_is_the_same() -> None:
    with_spans = decode_forward_backward_located(_message([_datum()], "cispo").SerializeToString(), None, LIMIT)
    without = decode_forward_backward_located(
        _message([_datum(with_spans=False)], "cispo").SerializeToString(), None, LIMIT
    )
    assert with_spans.provenance is None
    assert with_spans.op == without.op


@pytest.mark.parametrize(
    ("mangle", "phrase"),
    [
        (lambda d: d.loss_fn_input_spans.add(), "names neither prompt_tokens nor sampled_tokens"),
        (lambda d: d.model_input_spans[0].prompt_tokens.__setattr__("sequence_id", ""), "sequence_id must be"),
        (lambda d: d.model_input_spans[0].prompt_tokens.__setattr__("offset", -1), "must be >= 0"),
        (
            lambda d: [d.model_input_spans.add().sampled_tokens.__setattr__("sequence_id", "x") for _ in range(30)],
            "spans for 4 positions",
        ),
    ],
)
def test_bad_spans_are_a_user_error_at_their_seq(mangle: object, phrase: str) -> None:
    msg = _message([_datum()], "stable_reinforce")
    mangle(msg.data[0])  # type: ignore[operator]
    decoded = decode_forward_backward_located(msg.SerializeToString(), None, LIMIT)
    assert decoded.op is None and decoded.error is not None
    assert phrase in decoded.error.message
    assert (decoded.model_id, decoded.seq_id) == ("s-1:train:0", 1)
