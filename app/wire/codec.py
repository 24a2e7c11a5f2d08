"""The protobuf side of the wire: `forward_backward` requests in, fwd/bwd and sample results out.

`/api/v1/forward_backward` is protobuf-only in SDK 0.25 and 0.38, and the SDK accepts
`ForwardBackwardOutput` / `SampleResponse` results only as protobuf (tinker-protocol.md §0.3-0.4,
§7). Everything here translates between those messages and the `app.domain` ops and results.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from app.domain.errors import InvalidInput, MalformedRequest, ServerError
from app.domain.ops import SERVER_INPUTS, Datum, ForwardBackwardOp
from app.domain.provenance import DatumProvenance, Span
from app.domain.results import ForwardBackwardResult
from app.domain.tensors import Array
from app.wire.compression import decompress_body
from app.wire.proto import pb
from app.wire.sample_codec import encode_sample_response
from app.wire.tensors import SparseBudget, array_from_proto, batched_tensor, tensor_elements, unpack_le

PROTOBUF_MEDIA_TYPE = "application/x-protobuf"
# Sample results are encoded in app.wire.sample_codec; callers import them from here too.
__all__ = [
    "PROTOBUF_MEDIA_TYPE",
    "DecodeLimits",
    "DecodedForwardBackward",
    "decode_forward_backward",
    "decode_forward_backward_located",
    "encode_forward_backward_output",
    "encode_sample_response",
]

# The SDK keeps the text after the last ':' as the output class name (§7.4).
_OUTPUT_TYPE = "ArrayRecord"


@dataclass(frozen=True)
class DecodeLimits:
    """Cheap bounds checked on the parsed message's lengths before any Python list, tuple or
    tensor is built from it (docs/robustness.md): a few KB of zstd can carry tens of millions of
    tokens, and building objects for them costs gigabytes and seconds.

    None leaves a bound off (unit tests of the codec alone); the API sets all of them.
    """

    max_decompressed_bytes: int
    max_datums: int | None = None
    # The longest sequence any served model takes; the run's own model is checked later.
    max_tokens_per_datum: int | None = None
    max_tokens: int | None = None


@dataclass(frozen=True)
class DecodedForwardBackward:
    """A body whose envelope parsed: its (model_id, seq_id), and either the op or the user error
    in its content (recorded as a failed op at that seq, so later seqs do not wait for it)."""

    model_id: str
    seq_id: int
    op: ForwardBackwardOp | None
    error: InvalidInput | MalformedRequest | None = None
    # stable_reinforce only: each datum's provenance spans, resolved against the sampling
    # records when the op is submitted (app/queue/stability.py). None for every other loss.
    provenance: tuple[DatumProvenance | None, ...] | None = None


# Provenance spans beyond one per position, and the longest sequence id this server issues.
_SPAN_SLACK = 16
_MAX_SEQUENCE_ID = 120
# Per datum: more named inputs than any loss reads is not a request anyone means.
_MAX_INPUTS_PER_DATUM = 16
# Tensor elements a request may carry, per token: every loss input is one value per token.
_ELEMENTS_PER_TOKEN = 8


def decode_forward_backward(
    body: bytes, content_encoding: str | None, limits: int | DecodeLimits
) -> tuple[str, int, ForwardBackwardOp]:
    """Parse a `ForwardBackwardRequest` body into (model_id, seq_id, op), raising on any error.

    `limits` (or just `max_decompressed_bytes`) caps the inflated body, the memory that densifying
    sparse tensors may take, and the counts in DecodeLimits.
    """
    decoded = decode_forward_backward_located(body, content_encoding, limits)
    if decoded.error is not None:
        raise decoded.error
    assert decoded.op is not None
    return decoded.model_id, decoded.seq_id, decoded.op


def decode_forward_backward_located(
    body: bytes, content_encoding: str | None, limits: int | DecodeLimits
) -> DecodedForwardBackward:
    """Like decode_forward_backward, but a content error comes back with the (model_id, seq_id)
    its envelope names; only a body whose envelope cannot be read raises. CPU- and memory-heavy
    by nature: the API runs it off the event loop (app/api/decoding.py)."""
    if isinstance(limits, int):
        limits = DecodeLimits(max_decompressed_bytes=limits)
    raw = decompress_body(body, content_encoding, limits.max_decompressed_bytes)
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(raw)
    except DecodeError as exc:
        raise MalformedRequest(f"body is not a valid ForwardBackwardRequest protobuf: {exc}") from exc
    del raw  # the message holds its own copy: free the inflated body before objects are built
    if not msg.model_id:
        raise InvalidInput("model_id is required")
    # proto3 cannot tell an unset seq_id from 0; the SDK always sends 1, 2, 3... (§4.3, §7.2).
    if msg.seq_id == 0:
        raise InvalidInput("seq_id is required (training requests number from 1)")
    if msg.seq_id < 0:
        raise InvalidInput(f"seq_id must be positive, got {msg.seq_id}")
    model_id, seq_id = msg.model_id, msg.seq_id
    try:
        op = _content(msg, limits)
        provenance = _provenance(msg, op) if op.loss_fn in SERVER_INPUTS else None
    except (InvalidInput, MalformedRequest) as exc:
        # The traceback's frames hold the message (as large as the inflated body): drop both now
        # rather than when the request ends, or the next decode runs beside them.
        del msg
        return DecodedForwardBackward(model_id, seq_id, None, exc.with_traceback(None))
    return DecodedForwardBackward(model_id, seq_id, op, provenance=provenance)


def _provenance(msg: pb.ForwardBackwardRequest, op: ForwardBackwardOp) -> tuple[DatumProvenance | None, ...]:
    return tuple(
        _datum_provenance(d, i, len(datum.tokens)) for i, (d, datum) in enumerate(zip(msg.data, op.data, strict=True))
    )


def _datum_provenance(msg: pb.Datum, index: int, length: int) -> DatumProvenance | None:
    if not msg.model_input_spans and not msg.loss_fn_input_spans:
        return None
    return DatumProvenance(
        model_input=_spans(msg.model_input_spans, f"data[{index}].model_input_spans", length),
        targets=_spans(msg.loss_fn_input_spans, f"data[{index}].loss_fn_input_spans", length),
    )


def _spans(spans: Sequence[pb.ProvenanceSpan], where: str, length: int) -> tuple[Span, ...]:
    # Runs tile `length` positions; a zero-length run is legal but more runs than positions (plus
    # slack for those) is not a request anyone means, and each run costs a Python object.
    if len(spans) > length + _SPAN_SLACK:
        raise InvalidInput(f"{where}: {len(spans)} spans for {length} positions")
    out: list[Span] = []
    for j, span in enumerate(spans):
        kind = span.WhichOneof("span")
        if kind not in ("prompt_tokens", "sampled_tokens"):
            raise InvalidInput(f"{where}[{j}] names neither prompt_tokens nor sampled_tokens")
        run = getattr(span, kind)
        if not run.sequence_id or len(run.sequence_id) > _MAX_SEQUENCE_ID:
            raise InvalidInput(f"{where}[{j}]: sequence_id must be 1 to {_MAX_SEQUENCE_ID} characters")
        if run.offset < 0 or run.length < 0:
            raise InvalidInput(f"{where}[{j}]: offset and length must be >= 0")
        out.append(
            Span(
                kind="prompt" if kind == "prompt_tokens" else "sampled",
                sequence_id=run.sequence_id,
                offset=run.offset,
                length=run.length,
            )
        )
    return tuple(out)


def _content(msg: pb.ForwardBackwardRequest, limits: DecodeLimits) -> ForwardBackwardOp:
    if not msg.loss_fn:
        raise InvalidInput("loss_fn is required")
    if not msg.data:
        raise InvalidInput("data is empty: forward_backward needs at least one datum")
    check_bounds(msg, limits)
    budget = SparseBudget(limits.max_decompressed_bytes)
    data = tuple(_datum(d, i, budget) for i, d in enumerate(msg.data))
    return ForwardBackwardOp(
        data=data,
        loss_fn=msg.loss_fn,
        loss_fn_config=_loss_fn_config(msg),
        forward_only=msg.forward_only,
    )


def check_bounds(msg: pb.ForwardBackwardRequest, limits: DecodeLimits) -> None:
    """Counts read from the message's lengths, no element touched: datums, chunks, tokens and
    tensor elements, checked before anything is materialised."""
    if limits.max_datums is not None and len(msg.data) > limits.max_datums:
        raise InvalidInput(f"{len(msg.data)} datums exceed the per-request limit {limits.max_datums}")
    per_datum = limits.max_tokens_per_datum
    total = 0
    elements = 0
    for i, datum in enumerate(msg.data):
        # A chunk holds at least one token, so this also bounds the loop below.
        if per_datum is not None and len(datum.model_input) > per_datum:
            raise InvalidInput(f"datum {i}: {len(datum.model_input)} chunks exceed the maximum length {per_datum}")
        # len() copies one chunk's bytes out of the message (upb has no zero-copy view); that copy
        # is transient and bounded by the body, unlike a tuple of ints (36 bytes a token).
        n = sum(len(c.encoded_text.tokens) // 4 for c in datum.model_input if c.WhichOneof("chunk") == "encoded_text")
        if per_datum is not None and n > per_datum:
            raise InvalidInput(f"datum {i}: {n} tokens exceed the model's maximum length {per_datum}")
        total += n
        if limits.max_tokens is not None and total > limits.max_tokens:
            raise InvalidInput(
                f"the request carries more than {limits.max_tokens} tokens (max_tokens_per_request); split the batch"
            )
        if len(datum.loss_fn_inputs) > _MAX_INPUTS_PER_DATUM:
            raise InvalidInput(f"datum {i}: {len(datum.loss_fn_inputs)} loss_fn_inputs; no loss reads that many")
        for name in datum.loss_fn_inputs:
            elements += tensor_elements(datum.loss_fn_inputs[name])
        if limits.max_tokens is not None and elements > _ELEMENTS_PER_TOKEN * limits.max_tokens:
            raise InvalidInput(
                f"the request's loss_fn_inputs carry more than {_ELEMENTS_PER_TOKEN * limits.max_tokens} values"
            )


def _datum(msg: pb.Datum, index: int, budget: SparseBudget) -> Datum:
    tokens: list[int] = []
    for chunk in msg.model_input:
        kind = chunk.WhichOneof("chunk")
        if kind == "encoded_text":
            tokens.extend(_tokens(chunk.encoded_text.tokens, index))
        elif kind in ("image", "dmel"):
            raise InvalidInput("image/audio input is not supported by this server")
        else:
            raise InvalidInput(f"data[{index}]: model_input has an empty or unknown chunk")
    if not tokens:
        raise InvalidInput(f"data[{index}]: model_input has no tokens")
    # Protobuf maps have no defined order; sorting keeps the op's canonical bytes, and so the
    # queue's dedupe hash, identical for every encoding of the same request.
    inputs = {
        name: array_from_proto(msg.loss_fn_inputs[name], f"data[{index}].loss_fn_inputs[{name!r}]", budget)
        for name in sorted(msg.loss_fn_inputs)
    }
    # Provenance spans (0.38) are read by _provenance, for the losses that use them.
    return Datum(tokens=tuple(tokens), loss_fn_inputs=inputs)


def _tokens(raw: bytes, index: int) -> Sequence[int]:
    # EncodedTextChunk.tokens is packed int32 little-endian (§6.2).
    if len(raw) % 4:
        raise MalformedRequest(f"data[{index}]: encoded_text tokens are {len(raw)} bytes, not whole int32s")
    tokens = unpack_le("i", raw)
    if tokens and min(tokens) < 0:
        raise InvalidInput(f"data[{index}]: token ids must be non-negative, got {min(tokens)}")
    return tokens


def _loss_fn_config(msg: pb.ForwardBackwardRequest) -> dict[str, float | str]:
    # 0.38 dual-writes numbers into both maps and strings only into v2; servers prefer v2 (§7.2).
    # Keys sorted for a canonical op, as for loss_fn_inputs.
    if not msg.loss_fn_config_v2:
        return {key: float(msg.loss_fn_config[key]) for key in sorted(msg.loss_fn_config)}
    config: dict[str, float | str] = {}
    for key in sorted(msg.loss_fn_config_v2):
        value = msg.loss_fn_config_v2[key]
        kind = value.WhichOneof("value")
        if kind == "number":
            config[key] = float(value.number)
        elif kind == "text":
            config[key] = value.text
        else:
            raise InvalidInput(f"loss_fn_config[{key!r}] has no value")
    return config


def encode_forward_backward_output(result: ForwardBackwardResult) -> bytes:
    """`ForwardBackwardOutput` bytes that the SDK decodes into `tinker.types.ForwardBackwardOutput`.

    Consecutive datums whose fields agree in dtype and trailing shape share one `ArrayRecord`; a
    change starts a new record, which the SDK concatenates in order (§7.4). Every datum must carry
    the same field names, since the SDK indexes the fields of all records together.
    """
    out = pb.ForwardBackwardOutput(loss_fn_output_type=_OUTPUT_TYPE)
    out.metrics.update(result.metrics)
    names = sorted(result.outputs[0]) if result.outputs else []
    group: list[dict[str, Array]] = []
    signature: tuple[tuple[str, str, tuple[int, ...]], ...] | None = None
    for i, datum in enumerate(result.outputs):
        if sorted(datum) != names:
            raise ServerError(f"loss_fn_outputs[{i}] has fields {sorted(datum)}, expected {names}")
        for name, arr in datum.items():
            try:
                arr.check()
            except ValueError as exc:
                raise ServerError(f"loss_fn_outputs[{i}][{name!r}]: {exc}") from exc
        sig = tuple((name, datum[name].dtype, datum[name].shape[1:]) for name in names)
        if group and sig != signature:
            _add_record(out, group, names)
            group = []
        group.append(datum)
        signature = sig
    if group:
        _add_record(out, group, names)
    return out.SerializeToString()


def _add_record(out: pb.ForwardBackwardOutput, group: list[dict[str, Array]], names: list[str]) -> None:
    record = out.loss_fn_outputs.add(type_tag=_OUTPUT_TYPE, num_datums=len(group))
    for name in names:
        record.fields[name].CopyFrom(batched_tensor([d[name] for d in group], group[0][name].shape[1:]))
