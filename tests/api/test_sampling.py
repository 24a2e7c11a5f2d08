"""create_sampling_session and asample (tinker-protocol.md §5.1, §6.4)."""

from __future__ import annotations

from typing import Any

import pytest
from tinker import types

from tests.api.helpers import BASE_MODEL, KEY_B, VOCAB, Api, assert_error


def _sample(sampler_id: str | None, seq: int | None = 0, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
        "sampling_params": {"max_tokens": 8, "temperature": 1.0, "top_k": -1, "top_p": 1.0},
        "type": "sample",
    }
    if sampler_id is not None:
        body["sampling_session_id"] = sampler_id
    if seq is not None:
        body["seq_id"] = seq
    body.update(overrides)
    return body


def test_create_sampling_session_and_get_sampler(api: Api) -> None:
    session_id = api.session()
    body = {"session_id": session_id, "sampling_session_seq_id": 0, "base_model": BASE_MODEL}
    r = api.post("/api/v1/create_sampling_session", body)
    assert r.status_code == 200, r.text
    sampler_id = types.CreateSamplingSessionResponse.model_validate(r.json()).sampling_session_id
    # The same (session, seq) is the same sampler.
    assert api.post("/api/v1/create_sampling_session", body).json()["sampling_session_id"] == sampler_id
    got = api.get(f"/api/v1/samplers/{sampler_id}")
    assert got.status_code == 200, got.text
    assert types.GetSamplerResponse.model_validate(got.json()).base_model == BASE_MODEL
    assert_error(api.get(f"/api/v1/samplers/{sampler_id}", key=KEY_B), 404, error="not_found")


def test_create_sampling_session_errors(api: Api) -> None:
    session_id = api.session()
    base = {"session_id": session_id, "sampling_session_seq_id": 0}
    assert_error(api.post("/api/v1/create_sampling_session", base), 400, contains="base_model")
    assert_error(
        api.post("/api/v1/create_sampling_session", {**base, "base_model": "Qwen/nope"}), 400, contains="Qwen/nope"
    )
    assert_error(api.post("/api/v1/create_sampling_session", {**base, "model_path": "not-tinker"}), 400)
    body = {**base, "session_id": "s-nope", "base_model": BASE_MODEL}
    assert_error(api.post("/api/v1/create_sampling_session", body), 404, error="not_found")


@pytest.mark.parametrize("n", [1, 3, 64])
def test_asample_returns_one_sequence_id_per_sample(api: Api, n: int) -> None:
    r = api.post("/api/v1/asample", _sample(api.sampler(), num_samples=n))
    request_id = api.accepted(r)
    ids = r.json()["sample_sequence_ids"]
    assert isinstance(ids, list) and len(ids) == n
    assert all(isinstance(i, str) and i for i in ids) and len(set(ids)) == n
    api.queued(request_id)


def test_asample_seq_id_replay_and_conflict(api: Api) -> None:
    sampler_id = api.sampler()
    first = api.post("/api/v1/asample", _sample(sampler_id, 5))
    again = api.post("/api/v1/asample", _sample(sampler_id, 5))
    assert api.accepted(first) == api.accepted(again)
    assert first.json()["sample_sequence_ids"] == again.json()["sample_sequence_ids"]
    other = _sample(sampler_id, 5, prompt={"chunks": [{"type": "encoded_text", "tokens": [9]}]})
    assert_error(api.post("/api/v1/asample", other), 409, error="conflict")
    # Samples are unordered: any fresh seq is fine.
    api.accepted(api.post("/api/v1/asample", _sample(sampler_id, 1_000_000_000)))


def test_missing_sampling_session_id_is_400(api: Api) -> None:
    assert_error(api.post("/api/v1/asample", _sample(None)), 400, contains="sampling_session_id")


def test_missing_seq_id_is_400(api: Api) -> None:
    assert_error(api.post("/api/v1/asample", _sample(api.sampler(), None)), 400, contains="seq_id")
    assert_error(api.post("/api/v1/asample", _sample(api.sampler(), -1)), 400, contains="seq_id")


def test_unknown_or_foreign_sampler_is_404(api: Api) -> None:
    assert_error(api.post("/api/v1/asample", _sample("s-nope:sample:0")), 404, error="not_found")
    assert_error(api.post("/api/v1/asample", _sample(api.sampler(), 0), key=KEY_B), 404, error="not_found")


BAD_SAMPLES: dict[str, tuple[dict[str, Any], str]] = {
    "token_at_vocab": ({"prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, VOCAB]}]}}, str(VOCAB)),
    "negative_token": ({"prompt": {"chunks": [{"type": "encoded_text", "tokens": [-1]}]}}, "non-negative"),
    "empty_prompt": ({"prompt": {"chunks": []}}, "empty"),
    "image_chunk": ({"prompt": {"chunks": [{"type": "image", "data": "AAAA", "format": "png"}]}}, "not supported"),
    "num_samples_0": ({"num_samples": 0}, "num_samples"),
    "num_samples_negative": ({"num_samples": -2}, "num_samples"),
    "num_samples_over_limit": ({"num_samples": 65}, "num_samples"),
    "prompt_plus_max_tokens_too_long": ({"sampling_params": {"max_tokens": 2046}}, "maximum length"),
    "max_tokens_0": ({"sampling_params": {"max_tokens": 0}}, "max_tokens"),
    "negative_temperature": ({"sampling_params": {"temperature": -1.0}}, "temperature"),
    "nan_temperature": ({"sampling_params": {"temperature": float("nan")}}, "temperature"),
    "top_p_0": ({"sampling_params": {"top_p": 0.0}}, "top_p"),
    "top_k_0": ({"sampling_params": {"top_k": 0}}, "top_k"),
    "stop_token_at_vocab": ({"sampling_params": {"max_tokens": 4, "stop": [VOCAB]}}, "stop token"),
    "topk_sample_logprobs_over_limit": ({"topk_sample_logprobs": 21}, "topk_sample_logprobs"),
    "prompt_not_a_model_input": ({"prompt": "hello"}, "prompt"),
}


@pytest.mark.parametrize("case", sorted(BAD_SAMPLES))
def test_bad_sample_request_is_400(api: Api, case: str) -> None:
    overrides, phrase = BAD_SAMPLES[case]
    sampler_id = api.sampler()
    err = assert_error(api.post("/api/v1/asample", _sample(sampler_id, 0, **overrides)), 400)
    assert phrase.lower() in err["message"].lower(), err
    # Nothing was recorded at seq 0: a correct request may still use it.
    api.accepted(api.post("/api/v1/asample", _sample(sampler_id, 0)))
