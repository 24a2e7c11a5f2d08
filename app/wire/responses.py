"""Future results and polling replies for `POST /api/v1/retrieve_future` (tinker-protocol.md §3.3).

Fwd/bwd and sample results go out as protobuf whatever the Accept header says: the SDK rejects
them as JSON (§0.4). Every other result is JSON that validates against the SDK's response model;
`type` is either omitted or the exact literal that model declares (§1.5, §3.5). A success payload
never has a top-level "error" key, which the SDK would read as a failure (§3.3 row 4).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from app.domain.errors import Category, ServerError
from app.domain.oai import OaiCompletionResult
from app.domain.results import (
    CreateModelResult,
    ForwardBackwardResult,
    LoadWeightsResult,
    OptimStepResult,
    SampleResult,
    SaveWeightsResult,
)
from app.wire.codec import PROTOBUF_MEDIA_TYPE, encode_forward_backward_output, encode_sample_response

JSON_MEDIA_TYPE = "application/json"
QueueState = Literal["active", "paused_capacity", "paused_rate_limit"]

JsonResult = CreateModelResult | OptimStepResult | SaveWeightsResult | LoadWeightsResult | OaiCompletionResult
AnyResult = JsonResult | ForwardBackwardResult | SampleResult


def result_to_json(result: JsonResult) -> dict[str, Any]:
    """The JSON body of a finished JSON-typed future."""
    if isinstance(result, CreateModelResult):
        return {"model_id": result.model_id, "type": "create_model"}
    if isinstance(result, OptimStepResult):
        # OptimStepResponse has no `type` field.
        return {"metrics": dict(result.metrics)}
    if isinstance(result, SaveWeightsResult):
        return _save_weights_json(result)
    if isinstance(result, LoadWeightsResult):
        return {"path": result.path, "model_id": result.model_id, "type": "load_weights"}
    if isinstance(result, OaiCompletionResult):
        # No SDK asks for these; a client polling an OpenAI completion's id gets its raw result.
        return result.model_dump(mode="json")
    raise TypeError(f"{type(result).__name__} is not a JSON-typed result")


def _save_weights_json(result: SaveWeightsResult) -> dict[str, Any]:
    if result.checkpoint_kind == "training":
        if result.path is None:
            raise ServerError("save_weights finished without a checkpoint path")
        return {"path": result.path, "type": "save_weights"}
    if result.checkpoint_kind == "external":
        # SaveWeightsExternalResponseInternal (0.38): the SDK asserts `path`.
        if result.path is None:
            raise ServerError("save_weights_external finished without a checkpoint path")
        return {"path": result.path, "size_bytes": result.size_bytes, "type": "save_weights_external"}
    # SaveWeightsForSamplerResponseInternal: the SDK asserts `path` for a named save and
    # `sampling_session_id` for save_weights_and_get_sampling_client.
    if result.path is None and result.sampling_session_id is None:
        raise ServerError("save_weights_for_sampler finished with neither a path nor a sampling session")
    body: dict[str, Any] = {"type": "save_weights_for_sampler"}
    if result.path is not None:
        body["path"] = result.path
    if result.sampling_session_id is not None:
        body["sampling_session_id"] = result.sampling_session_id
    return body


def encode_result(result: AnyResult, accept: str | None = None) -> tuple[bytes, str]:
    """(body, media type) of a finished future.

    `accept` is taken for symmetry with the request but never changes the format: the SDK asks
    for protobuf exactly for the two protobuf-only result types (§3.2).
    """
    del accept
    if isinstance(result, ForwardBackwardResult):
        return encode_forward_backward_output(result), PROTOBUF_MEDIA_TYPE
    if isinstance(result, SampleResult):
        return encode_sample_response(result), PROTOBUF_MEDIA_TYPE
    return json.dumps(result_to_json(result), separators=(",", ":")).encode(), JSON_MEDIA_TYPE


def try_again_body(
    request_id: str,
    queue_state: QueueState = "active",
    reason: str | None = None,
    *,
    position: int | None = None,
    estimate_seconds: float | None = None,
) -> dict[str, Any]:
    """Pending: the SDK re-polls at once, so the server should hold the poll first (§3.3, §3.4).

    `queue_state` is one of the SDK's three literals; every SDK from 0.25 to 0.38 logs
    `queue_state_reason` to the user for the paused ones. The position and estimate are extra
    keys, which the SDK ignores, sent only when known (docs/architecture.md "Queue state").
    """
    body: dict[str, Any] = {"type": "try_again", "request_id": request_id, "queue_state": queue_state}
    if reason is not None:
        body["queue_state_reason"] = reason
    if position is not None:
        body["queue_position"] = position
    if estimate_seconds is not None:
        body["queue_estimate_seconds"] = estimate_seconds
    return body


def failed_future_body(message: str, category: Category) -> dict[str, Any]:
    """A failed future, served with HTTP 200; the SDK raises `RequestFailedError` (§3.3 row 4)."""
    return {"error": message or "request failed", "category": category}
