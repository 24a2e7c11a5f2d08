"""JSON request models accept what SDK 0.38 actually sends and the smaller 0.25 bodies."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel
from tinker import types
from tinker._compat import model_dump
from tinker.types.optimizer import DimuonOptimizerConfig, DimuonParams

from app.domain.errors import InvalidInput, MalformedRequest
from app.wire import json_models as jm


def wire_body(request: BaseModel) -> bytes:
    # The SDK's resources/*.py serialise every JSON body exactly like this.
    return json.dumps(model_dump(request, exclude_unset=False, exclude_none=True, mode="json")).encode()


def test_create_session_0_38_and_0_25() -> None:
    body = wire_body(
        types.CreateSessionRequest(tags=["a"], user_metadata={"k": 1}, sdk_version="0.38.0", display_name="d")
    )
    req = jm.parse_body(jm.CreateSessionRequest, body)
    assert (req.tags, req.user_metadata, req.sdk_version, req.display_name) == (
        ["a"],
        {"k": 1},
        "0.38.0",
        "d",
    )
    old = jm.parse_body(jm.CreateSessionRequest, b'{"tags":[],"user_metadata":{},"sdk_version":"0.25.0"}')
    assert old.display_name is None and old.project_id is None


def test_heartbeat_get_info_retrieve_future() -> None:
    hb = jm.parse_body(jm.SessionHeartbeatRequest, wire_body(types.SessionHeartbeatRequest(session_id="s-1")))
    assert hb.session_id == "s-1"
    info = jm.parse_body(jm.GetInfoRequest, wire_body(types.GetInfoRequest(model_id="s-1:train:0")))
    assert info.model_id == "s-1:train:0"
    fut = jm.parse_body(
        jm.RetrieveFutureRequest,
        wire_body(types.FutureRetrieveRequest(request_id="r", allow_metadata_only=True)),
    )
    assert (fut.request_id, fut.allow_metadata_only) == ("r", True)


def test_create_model_0_38_and_0_25() -> None:
    body = wire_body(
        types.CreateModelRequest(
            session_id="s",
            model_seq_id=2,
            base_model="tuft/tiny-qwen3",
            user_metadata={"run": "x"},
            lora_config=types.LoraConfig(rank=8, seed=3, train_unembed=False),
        )
    )
    req = jm.parse_body(jm.CreateModelRequest, body)
    assert req.lora_config is not None and (req.lora_config.rank, req.lora_config.seed) == (8, 3)
    assert req.lora_config.train_unembed is False
    assert req.optimizer_config is not None and req.optimizer_config.type == "adamw"
    old = jm.parse_body(
        jm.CreateModelRequest,
        {
            "session_id": "s",
            "model_seq_id": 0,
            "base_model": "b",
            "lora_config": {"rank": 4},
            "type": "create_model",
        },
    )
    assert old.optimizer_config is None
    dimuon = jm.parse_body(
        jm.CreateModelRequest,
        wire_body(
            types.CreateModelRequest(
                session_id="s", model_seq_id=0, base_model="b", optimizer_config=DimuonOptimizerConfig()
            )
        ),
    )
    assert dimuon.optimizer_config is not None and dimuon.optimizer_config.type == "dimuon"


def test_optim_step_adam_and_dimuon() -> None:
    adam = jm.parse_body(
        jm.OptimStepRequest,
        wire_body(types.OptimStepRequest(optim_params=types.AdamParams(learning_rate=3e-4), model_id="m", seq_id=4)),
    )
    assert adam.adam_params is not None and adam.adam_params.learning_rate == 3e-4 and adam.seq_id == 4
    dimuon = jm.parse_body(
        jm.OptimStepRequest,
        wire_body(types.OptimStepRequest(optim_params=DimuonParams(learning_rate=0.02), model_id="m", seq_id=5)),
    )
    assert dimuon.adam_params is None
    assert dimuon.optimizer_params is not None and dimuon.optimizer_params["type"] == "dimuon"


def test_save_requests() -> None:
    save = jm.parse_body(
        jm.SaveWeightsRequest,
        wire_body(
            types.SaveWeightsRequest(
                model_id="m",
                path="ckpt1",
                seq_id=4,
                ttl_seconds=7200,
                overwrite=True,
                user_metadata={"a": "b"},
            )
        ),
    )
    assert (save.path, save.seq_id, save.ttl_seconds, save.overwrite, save.user_metadata) == (
        "ckpt1",
        4,
        7200,
        True,
        {"a": "b"},
    )
    named = jm.parse_body(
        jm.SaveWeightsForSamplerRequest,
        wire_body(types.SaveWeightsForSamplerRequest(model_id="m", path="s1", seq_id=5)),
    )
    assert (named.path, named.kind, named.sampling_session_seq_id) == ("s1", "snapshot", None)
    ephemeral = jm.parse_body(
        jm.SaveWeightsForSamplerRequest,
        wire_body(
            types.SaveWeightsForSamplerRequest(model_id="m", sampling_session_seq_id=0, seq_id=6, kind="inflight")
        ),
    )
    assert (ephemeral.path, ephemeral.kind, ephemeral.sampling_session_seq_id) == (None, "inflight", 0)
    old = jm.parse_body(
        jm.SaveWeightsForSamplerRequest,
        {"model_id": "m", "sampling_session_seq_id": 1, "seq_id": 2, "type": "save_weights_for_sampler"},
    )
    assert old.kind == "snapshot"


def test_load_weights_both_addressing_modes() -> None:
    legacy = jm.parse_body(
        jm.LoadWeightsRequest,
        wire_body(types.LoadWeightsRequest(model_id="m", seq_id=7, path="tinker://r/weights/c", optimizer=False)),
    )
    assert (legacy.model_id, legacy.seq_id, legacy.creates_model, legacy.created_model_id) == (
        "m",
        7,
        False,
        None,
    )
    create = jm.parse_body(
        jm.LoadWeightsRequest,
        wire_body(
            types.LoadWeightsRequest(
                session_id="s-1", model_seq_id=1, path="tinker://r/weights/c", optimizer=True, base_model="b"
            )
        ),
    )
    assert create.creates_model and create.created_model_id == "s-1:train:1"
    assert create.optimizer is True and create.seq_id is None


def test_sampling_session_and_sample_0_38() -> None:
    session = jm.parse_body(
        jm.CreateSamplingSessionRequest,
        wire_body(types.CreateSamplingSessionRequest(session_id="s", sampling_session_seq_id=1, base_model="b")),
    )
    assert (session.sampling_session_seq_id, session.base_model, session.model_path) == (1, "b", None)
    body = wire_body(
        types.SampleRequest(
            num_samples=2,
            prompt=types.ModelInput.from_ints([5, 6, 7]),
            sampling_params=types.SamplingParams(max_tokens=3, temperature=0.5, seed=9, stop=["\n\n"]),
            sampling_session_id="s:sample:0",
            seq_id=0,
            prompt_logprobs=False,
            record_stability_info=False,
        )
    )
    req = jm.parse_body(jm.SampleRequest, body)
    assert req.num_samples == 2
    assert req.prompt.chunks[0].tokens == [5, 6, 7]
    assert (req.sampling_params.max_tokens, req.sampling_params.seed, req.sampling_params.stop) == (
        3,
        9,
        ["\n\n"],
    )
    assert (req.sampling_session_id, req.seq_id, req.prompt_logprobs) == ("s:sample:0", 0, False)


@pytest.mark.parametrize(
    ("stop", "expected"),
    [(None, None), ("x", "x"), (["a", "b"], ["a", "b"]), ([1, 2], [1, 2]), ([], [])],
)
def test_sample_stop_forms(stop: Any, expected: Any) -> None:
    body = wire_body(
        types.SampleRequest(
            prompt=types.ModelInput.from_ints([1]), sampling_params=types.SamplingParams(stop=stop), seq_id=0
        )
    )
    assert jm.parse_body(jm.SampleRequest, body).sampling_params.stop == expected


def test_sample_0_25_minimal_body() -> None:
    body = {
        "num_samples": 1,
        "prompt": {"chunks": [{"tokens": [1, 2], "type": "encoded_text"}]},
        "sampling_params": {"max_tokens": 1},
        "sampling_session_id": "s:sample:0",
        "seq_id": 1,
        "prompt_logprobs": True,
        "topk_prompt_logprobs": 0,
        "type": "sample",
    }
    req = jm.parse_body(jm.SampleRequest, body)
    assert req.prompt_logprobs is True
    assert (req.topk_sample_logprobs, req.prompt_alt_tokens_k, req.prompt_logprobs_last_n) == (0, 0, None)
    assert req.sampling_params.temperature == 1.0 and req.sampling_params.top_k == -1


def test_rest_and_background_bodies() -> None:
    assert jm.parse_body(jm.WeightsInfoRequest, b'{"tinker_path":"tinker://r/weights/c"}').tinker_path
    assert jm.parse_body(jm.SetTtlRequest, b'{"ttl_seconds":null}').ttl_seconds is None
    assert jm.parse_body(jm.SetTtlRequest, b'{"ttl_seconds":3600}').ttl_seconds == 3600
    finish = jm.parse_body(jm.FinishSessionRequest, b'{"reason":{"type":"errored"},"detail":null}')
    assert finish.reason.type == "errored"
    assert jm.parse_body(jm.FinishSessionRequest, b"").reason.type == "success"
    telemetry = {
        "events": [{"event": "SESSION_START", "event_id": "e", "event_session_index": 0, "severity": "INFO"}],
        "platform": "Linux",
        "sdk_version": "0.38.0",
        "session_id": "sessionless-1",
        "process_uuid": "p",
        "something_new": 1,
    }
    assert len(jm.parse_body(jm.TelemetryRequest, telemetry).events) == 1
    assert jm.parse_body(jm.TelemetryRequest, b'{"events": "whatever", "platform": 3}').events == "whatever"
    assert jm.parse_body(jm.TelemetryRequest, b"").events is None
    assert jm.parse_body(jm.ClientConfigRequest, b'{"sdk_version":"0.25.0"}').sdk_version == "0.25.0"


def test_untyped_api_future_dump() -> None:
    fut = jm.UntypedAPIFuture(request_id="r1")
    assert fut.model_dump(exclude_none=True) == {"request_id": "r1"}
    sdk = types.UntypedAPIFuture.model_validate(
        jm.UntypedAPIFuture(request_id="r2", sample_sequence_ids=["r2:0"]).model_dump(exclude_none=True)
    )
    assert sdk.sample_sequence_ids == ["r2:0"]


def test_parse_errors() -> None:
    with pytest.raises(MalformedRequest, match="not valid JSON"):
        jm.parse_body(jm.GetInfoRequest, b"{nope")
    with pytest.raises(MalformedRequest, match="JSON object"):
        jm.parse_body(jm.GetInfoRequest, b"[1]")
    with pytest.raises(InvalidInput, match="model_id: Field required"):
        jm.parse_body(jm.GetInfoRequest, b"{}")
    with pytest.raises(InvalidInput, match=r"sampling_params\.stop"):
        jm.parse_body(jm.SampleRequest, {"prompt": {"chunks": []}, "sampling_params": {"stop": ["a", 1]}})
