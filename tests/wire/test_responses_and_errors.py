"""JSON results validated by the SDK's own response models; error mapping and bodies."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tinker import types
from tinker.types.try_again_response import TryAgainResponse

from app.domain.errors import (
    Conflict,
    DomainError,
    InvalidInput,
    MalformedRequest,
    NotFound,
    PayloadTooLarge,
    ServerError,
    SessionFinished,
    Unauthorized,
)
from app.domain.results import CreateModelResult, LoadWeightsResult, OptimStepResult, SaveWeightsResult
from app.wire.errors import error_body, failed_future_body_for, http_status_for
from app.wire.responses import (
    JSON_MEDIA_TYPE,
    encode_result,
    failed_future_body,
    result_to_json,
    try_again_body,
)


def test_create_model_result() -> None:
    body = result_to_json(CreateModelResult(model_id="s-1:train:0"))
    assert types.CreateModelResponse.model_validate(body).model_id == "s-1:train:0"


def test_optim_step_result() -> None:
    body = result_to_json(OptimStepResult(metrics={"grad_norm": 0.5}))
    assert types.OptimStepResponse.model_validate(body).metrics == {"grad_norm": 0.5}
    assert types.OptimStepResponse.model_validate(result_to_json(OptimStepResult())).metrics == {}


def test_save_weights_results() -> None:
    training = result_to_json(SaveWeightsResult(checkpoint_kind="training", path="tinker://r/weights/c"))
    assert types.SaveWeightsResponse.model_validate(training).path == "tinker://r/weights/c"
    named = result_to_json(SaveWeightsResult(checkpoint_kind="sampler", path="tinker://r/sampler_weights/s"))
    parsed = types.SaveWeightsForSamplerResponseInternal.model_validate(named)
    assert (parsed.path, parsed.sampling_session_id) == ("tinker://r/sampler_weights/s", None)
    assert types.SaveWeightsForSamplerResponse.model_validate(named).path == "tinker://r/sampler_weights/s"
    ephemeral = result_to_json(SaveWeightsResult(checkpoint_kind="sampler", sampling_session_id="s:sample:3"))
    parsed = types.SaveWeightsForSamplerResponseInternal.model_validate(ephemeral)
    assert (parsed.path, parsed.sampling_session_id) == (None, "s:sample:3")
    with pytest.raises(ServerError):
        result_to_json(SaveWeightsResult(checkpoint_kind="training"))
    with pytest.raises(ServerError):
        result_to_json(SaveWeightsResult(checkpoint_kind="sampler"))


def test_load_weights_result() -> None:
    body = result_to_json(LoadWeightsResult(path="tinker://r/weights/c", model_id="s:train:1"))
    parsed = types.LoadWeightsResponse.model_validate(body)
    assert (parsed.path, parsed.model_id) == ("tinker://r/weights/c", "s:train:1")


@pytest.mark.parametrize(
    "result",
    [
        CreateModelResult(model_id="m"),
        OptimStepResult(metrics={"error": 1.0}),
        SaveWeightsResult(checkpoint_kind="training", path="tinker://r/weights/c"),
        SaveWeightsResult(checkpoint_kind="sampler", sampling_session_id="x"),
        LoadWeightsResult(path="tinker://r/weights/c", model_id="m"),
    ],
)
def test_json_results_are_json_and_never_look_failed(result: CreateModelResult) -> None:
    body, media_type = encode_result(result, "application/json")
    assert media_type == JSON_MEDIA_TYPE
    decoded = json.loads(body)
    assert "error" not in decoded  # the SDK would read a top-level "error" as a failure (§3.3)
    assert decoded.get("type") != "try_again"


def test_try_again_and_failed_bodies_match_sdk_models() -> None:
    pending = try_again_body("req-1")
    assert TryAgainResponse.model_validate(pending).queue_state == "active"
    assert pending["type"] == "try_again"
    failed = failed_future_body("learning rate too large", "user")
    parsed = types.RequestFailedResponse.model_validate(failed)
    assert (parsed.error, parsed.category) == ("learning rate too large", types.RequestErrorCategory.User)
    assert failed_future_body("", "server")["error"]
    assert failed_future_body_for(ServerError("oom")) == {"error": "oom", "category": "server"}


@pytest.mark.parametrize(
    ("err", "status", "code"),
    [
        (InvalidInput("bad"), 400, "invalid_input"),
        (MalformedRequest("bad"), 400, "malformed_request"),
        (Unauthorized("who"), 401, "unauthorized"),
        (NotFound("gone"), 404, "not_found"),
        (Conflict("seq"), 409, "conflict"),
        (SessionFinished("done"), 410, "session_finished"),
        (PayloadTooLarge("big"), 413, "payload_too_large"),
        (ServerError("boom"), 500, "server_error"),
        (DomainError("plain"), 400, "domain_error"),
    ],
)
def test_error_status_and_body(err: DomainError, status: int, code: str) -> None:
    assert http_status_for(err) == status
    body = error_body(err)
    assert body == {"error": code, "message": err.message, "category": err.category, "detail": err.message}
    assert json.dumps(body)


def test_error_body_never_empty() -> None:
    body = error_body(InvalidInput(""))
    assert body["message"] == "invalid input"


def test_wire_imports_no_forbidden_modules() -> None:
    # app.wire is pure translation (architecture: import rules) and must stay light for the API.
    code = (
        "import sys, app.wire.codec, app.wire.translate, app.wire.errors, app.wire.json_models;"
        "forbidden = ('sqlalchemy', 'fastapi', 'torch', 'app.db', 'app.queue', 'app.api', 'workers',"
        " 'tinker');"
        "print(','.join(m for m in forbidden if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
