"""Request models -> domain ops, including the validation the SDK leaves to the server."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel
from tinker import types
from tinker._compat import model_dump
from tinker.types.optimizer import DimuonOptimizerConfig, DimuonParams

from app.domain.errors import InvalidInput
from app.domain.ops import AdamParams, LoraConfig, SamplingParams
from app.wire import json_models as jm
from app.wire import translate as tr


def wire_body(request: BaseModel) -> bytes:
    return json.dumps(model_dump(request, exclude_unset=False, exclude_none=True, mode="json")).encode()


def sample_req(params: dict[str, Any] | None = None, **fields: Any) -> jm.SampleRequest:
    body: dict[str, Any] = {
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
        "sampling_params": params or {},
        "sampling_session_id": "s:sample:0",
        "seq_id": 0,
    }
    body.update(fields)
    return jm.parse_body(jm.SampleRequest, body)


def test_require_seq_id() -> None:
    assert tr.require_seq_id(3) == 3
    for bad in (None, 0):
        with pytest.raises(InvalidInput, match="seq_id is required"):
            tr.require_seq_id(bad)
    with pytest.raises(InvalidInput, match="positive"):
        tr.require_seq_id(-1)


def test_create_model_lora_config() -> None:
    req = jm.parse_body(
        jm.CreateModelRequest,
        wire_body(
            types.CreateModelRequest(
                session_id="s", model_seq_id=0, base_model="b", lora_config=types.LoraConfig(rank=8, seed=1)
            )
        ),
    )
    assert tr.create_model_to_lora_config(req) == LoraConfig(rank=8, seed=1)
    bare = jm.parse_body(jm.CreateModelRequest, {"session_id": "s", "model_seq_id": 0, "base_model": "b"})
    assert tr.create_model_to_lora_config(bare) == LoraConfig()
    dimuon = jm.parse_body(
        jm.CreateModelRequest,
        wire_body(
            types.CreateModelRequest(
                session_id="s", model_seq_id=0, base_model="b", optimizer_config=DimuonOptimizerConfig()
            )
        ),
    )
    with pytest.raises(InvalidInput, match="optimizer dimuon is not supported"):
        tr.create_model_to_lora_config(dimuon)
    with pytest.raises(InvalidInput, match="rank"):
        tr.create_model_to_lora_config(
            jm.parse_body(
                jm.CreateModelRequest,
                {"session_id": "s", "model_seq_id": 0, "base_model": "b", "lora_config": {"rank": 0}},
            )
        )


def test_optim_step_adam() -> None:
    req = jm.parse_body(
        jm.OptimStepRequest,
        wire_body(
            types.OptimStepRequest(
                optim_params=types.AdamParams(learning_rate=1e-3, weight_decay=0.01, grad_clip_norm=1.0),
                model_id="m",
                seq_id=2,
            )
        ),
    )
    op = tr.optim_step_to_op(req)
    assert op.adam == AdamParams(learning_rate=1e-3, weight_decay=0.01, grad_clip_norm=1.0)
    assert op.kind == "optim_step"


def test_optim_step_dimuon_rejected() -> None:
    req = jm.parse_body(
        jm.OptimStepRequest,
        wire_body(types.OptimStepRequest(optim_params=DimuonParams(learning_rate=0.02), model_id="m", seq_id=2)),
    )
    with pytest.raises(InvalidInput, match="optimizer dimuon is not supported"):
        tr.optim_step_to_op(req)


def test_optim_step_adamw_optimizer_params_and_missing_params() -> None:
    req = jm.parse_body(
        jm.OptimStepRequest, {"model_id": "m", "optimizer_params": {"type": "adamw", "learning_rate": 0.5}}
    )
    assert tr.optim_step_to_op(req).adam.learning_rate == 0.5
    with pytest.raises(InvalidInput, match="adam_params is required"):
        tr.optim_step_to_op(jm.parse_body(jm.OptimStepRequest, {"model_id": "m", "seq_id": 1}))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"learning_rate": -1.0}, "learning_rate must be a finite number >= 0"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"beta1": 1.0}, "beta1 must be below 1"),
        ({"beta2": -0.1}, "beta2"),
        ({"eps": -1e-8}, "eps"),
        ({"weight_decay": -0.5}, "weight_decay"),
        ({"grad_clip_norm": -1.0}, "grad_clip_norm"),
    ],
)
def test_optim_step_rejects_bad_adam(params: dict[str, float], message: str) -> None:
    req = jm.OptimStepRequest(model_id="m", seq_id=1, adam_params=jm.AdamParamsModel(**params))
    with pytest.raises(InvalidInput, match=message):
        tr.optim_step_to_op(req)


def test_save_weights_to_op() -> None:
    req = jm.parse_body(
        jm.SaveWeightsRequest,
        wire_body(
            types.SaveWeightsRequest(model_id="m", path="ckpt-1", seq_id=4, ttl_seconds=3600, user_metadata={"k": "v"})
        ),
    )
    op = tr.save_weights_to_op(req)
    assert (op.checkpoint_kind, op.name, op.ttl_seconds, op.overwrite, op.user_metadata) == (
        "training",
        "ckpt-1",
        3600,
        False,
        {"k": "v"},
    )
    with pytest.raises(InvalidInput, match="path"):
        tr.save_weights_to_op(jm.SaveWeightsRequest(model_id="m", seq_id=1))
    with pytest.raises(InvalidInput, match="invalid checkpoint name"):
        tr.save_weights_to_op(jm.SaveWeightsRequest(model_id="m", path="../etc", seq_id=1))
    with pytest.raises(InvalidInput, match="ttl_seconds"):
        tr.save_weights_to_op(jm.SaveWeightsRequest(model_id="m", path="a", seq_id=1, ttl_seconds=0))


def test_save_weights_for_sampler_named_and_ephemeral() -> None:
    named = tr.save_weights_for_sampler_to_op(
        jm.parse_body(
            jm.SaveWeightsForSamplerRequest,
            wire_body(types.SaveWeightsForSamplerRequest(model_id="m", path="s1", seq_id=5)),
        )
    )
    assert (named.checkpoint_kind, named.name, named.sampling_session_seq_id) == ("sampler", "s1", None)
    ephemeral = tr.save_weights_for_sampler_to_op(
        jm.parse_body(
            jm.SaveWeightsForSamplerRequest,
            wire_body(
                types.SaveWeightsForSamplerRequest(model_id="m", sampling_session_seq_id=2, seq_id=6, kind="inflight")
            ),
        )
    )
    assert (ephemeral.checkpoint_kind, ephemeral.name, ephemeral.sampling_session_seq_id) == (
        "sampler",
        None,
        2,
    )
    with pytest.raises(InvalidInput, match="path"):
        tr.save_weights_for_sampler_to_op(jm.SaveWeightsForSamplerRequest(model_id="m", seq_id=1))


def test_load_weights_to_op() -> None:
    legacy = jm.LoadWeightsRequest(model_id="m", seq_id=1, path="tinker://r:train:0/weights/c1", optimizer=True)
    op = tr.load_weights_to_op(legacy)
    assert (op.path, op.with_optimizer) == ("tinker://r:train:0/weights/c1", True)
    create = jm.LoadWeightsRequest(session_id="s", model_seq_id=1, path="tinker://r/sampler_weights/c2")
    assert tr.load_weights_to_op(create).with_optimizer is False
    with pytest.raises(InvalidInput, match="not both"):
        tr.load_weights_to_op(
            jm.LoadWeightsRequest(model_id="m", session_id="s", model_seq_id=0, path="tinker://r/weights/c")
        )
    with pytest.raises(InvalidInput, match="needs model_id"):
        tr.load_weights_to_op(jm.LoadWeightsRequest(session_id="s", path="tinker://r/weights/c"))
    with pytest.raises(InvalidInput, match="invalid checkpoint path"):
        tr.load_weights_to_op(jm.LoadWeightsRequest(model_id="m", seq_id=1, path="s3://bucket/x"))
    with pytest.raises(InvalidInput, match="optimizer dimuon"):
        tr.load_weights_to_op(
            jm.LoadWeightsRequest(
                session_id="s",
                model_seq_id=0,
                path="tinker://r/weights/c",
                optimizer_config=jm.OptimizerConfigModel(type="dimuon"),
            )
        )


def test_check_create_sampling_session() -> None:
    tr.check_create_sampling_session(
        jm.CreateSamplingSessionRequest(session_id="s", sampling_session_seq_id=0, base_model="b")
    )
    tr.check_create_sampling_session(
        jm.CreateSamplingSessionRequest(
            session_id="s", sampling_session_seq_id=0, model_path="tinker://r/sampler_weights/x"
        )
    )
    with pytest.raises(InvalidInput, match="base_model or model_path"):
        tr.check_create_sampling_session(jm.CreateSamplingSessionRequest(session_id="s", sampling_session_seq_id=0))


def test_sample_to_op_from_real_sdk_body() -> None:
    body = wire_body(
        types.SampleRequest(
            num_samples=3,
            prompt=types.ModelInput.from_ints([5, 6, 7]),
            sampling_params=types.SamplingParams(max_tokens=4, temperature=0.7, top_k=20, top_p=0.9, seed=11),
            sampling_session_id="s:sample:0",
            seq_id=0,
            prompt_logprobs=True,
            topk_prompt_logprobs=2,
        )
    )
    op = tr.sample_to_op(jm.parse_body(jm.SampleRequest, body))
    assert op.prompt == (5, 6, 7)
    assert op.num_samples == 3
    assert op.prompt_logprobs is True and op.topk_prompt_logprobs == 2
    assert op.params == SamplingParams(max_tokens=4, temperature=0.7, top_k=20, top_p=0.9, seed=11)


@pytest.mark.parametrize(
    ("stop", "strings", "tokens", "eos"),
    [
        (None, (), (), True),
        ("</s>", ("</s>",), (), True),
        (["a", "bc"], ("a", "bc"), (), True),
        ([7, 9], (), (7, 9), True),
        ([], (), (), False),
    ],
)
def test_sample_stop_variants(stop: Any, strings: tuple[str, ...], tokens: tuple[int, ...], eos: bool) -> None:
    body = wire_body(
        types.SampleRequest(
            prompt=types.ModelInput.from_ints([1]), sampling_params=types.SamplingParams(stop=stop), seq_id=0
        )
    )
    params = tr.sample_to_op(jm.parse_body(jm.SampleRequest, body)).params
    assert (params.stop_strings, params.stop_tokens, params.stop_at_eos) == (strings, tokens, eos)


def test_compute_logprobs_shape() -> None:
    op = tr.sample_to_op(sample_req({"max_tokens": 1}, prompt_logprobs=True))
    assert op.params.max_tokens == 1 and op.prompt_logprobs and op.num_samples == 1


def test_multi_chunk_prompt_concatenated() -> None:
    req = sample_req(
        prompt={"chunks": [{"type": "encoded_text", "tokens": [1]}, {"type": "encoded_text", "tokens": [2, 3]}]}
    )
    assert tr.sample_to_op(req).prompt == (1, 2, 3)


@pytest.mark.parametrize(
    ("params", "fields", "message"),
    [
        ({}, {"num_samples": 0}, "num_samples must be at least 1"),
        ({"max_tokens": 0}, {}, "max_tokens must be at least 1"),
        ({"temperature": -0.1}, {}, "temperature must be >= 0"),
        ({"top_p": 0.0}, {}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, {}, "top_p"),
        ({"top_k": 0}, {}, "top_k must be -1"),
        ({"top_k": -2}, {}, "top_k"),
        ({"stop": [""]}, {}, "stop strings must be non-empty"),
        ({"stop": [-1]}, {}, "stop token ids"),
        ({}, {"prompt": {"chunks": []}}, "prompt is empty"),
        ({}, {"prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, -2]}]}}, "non-negative"),
        ({}, {"topk_prompt_logprobs": -1}, "topk_prompt_logprobs"),
        ({}, {"topk_prompt_logprobs": 101}, "topk_prompt_logprobs must be between 0 and 100"),
        # The 0.38 extras have their own cases in test_sample_extras.py.
    ],
)
def test_sample_validation(params: dict[str, Any], fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        tr.sample_to_op(sample_req(params, **fields))


@pytest.mark.parametrize(
    "chunk",
    [
        {"type": "image", "data": "iVBORw0KGgo=", "format": "png", "expected_tokens": 4},
        {"type": "image_asset_pointer", "format": "png", "location": "s3://x"},
        {"type": "dmel", "dmel": "AAAA"},
    ],
)
def test_sample_media_chunks_rejected(chunk: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput, match="image/audio input is not supported by this server"):
        tr.sample_to_op(sample_req(prompt={"chunks": [{"type": "encoded_text", "tokens": [1]}, chunk]}))


def test_sample_real_sdk_image_chunk_rejected() -> None:
    model_input = types.ModelInput(chunks=[types.ImageChunk(data=b"\x89PNG", format="png", expected_tokens=2)])
    body = wire_body(types.SampleRequest(prompt=model_input, sampling_params=types.SamplingParams(), seq_id=0))
    with pytest.raises(InvalidInput, match="image/audio"):
        tr.sample_to_op(jm.parse_body(jm.SampleRequest, body))


def test_record_stability_info_reaches_the_op() -> None:
    # 0.38 always sends the field, false unless the SamplingClient asked for stable_reinforce.
    assert not tr.sample_to_op(sample_req(record_stability_info=False)).record_stability_info
    assert tr.sample_to_op(sample_req(record_stability_info=True)).record_stability_info
