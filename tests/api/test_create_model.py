"""create_model: validation of the base model and LoRA config, idempotency, session state."""

from __future__ import annotations

from typing import Any

import pytest
from tinker import types

from tests.api.helpers import BASE_MODEL, Api, assert_error


def _body(session_id: str, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "session_id": session_id,
        "model_seq_id": 0,
        "base_model": BASE_MODEL,
        "lora_config": {"rank": 8, "train_unembed": True, "train_mlp": True, "train_attn": True},
        "type": "create_model",
    }
    body.update(overrides)
    return body


def test_create_model_answers_model_id_and_a_finished_future(api: Api) -> None:
    session_id = api.session()
    r = api.create_model(session_id, 0)
    request_id = api.accepted(r)
    model_id = r.json()["model_id"]
    assert model_id == f"{session_id}:train:0"
    fut = api.retrieve(request_id)
    assert fut.status_code == 200, fut.text
    assert types.CreateModelResponse.model_validate(fut.json()).model_id == model_id
    info = api.post("/api/v1/get_info", {"model_id": model_id, "type": "get_info"})
    assert info.status_code == 200, info.text
    parsed = types.GetInfoResponse.model_validate(info.json())
    assert parsed.model_data.model_name == BASE_MODEL
    assert parsed.lora_rank == 8


def test_unknown_base_model_is_400(api: Api) -> None:
    err = assert_error(api.post("/api/v1/create_model", _body(api.session(), base_model="Qwen/nope")), 400)
    assert "Qwen/nope" in err["message"]


@pytest.mark.parametrize("rank", [0, -1, 129, 10_000])
def test_bad_lora_rank_is_400(api: Api, rank: int) -> None:
    r = api.create_model(api.session(), rank=rank)
    err = assert_error(r, 400, error="invalid_input")
    assert "rank" in err["message"]


def test_max_rank_is_accepted(api: Api) -> None:
    api.accepted(api.create_model(api.session(), rank=128))


def test_lora_that_trains_nothing_is_400(api: Api) -> None:
    r = api.create_model(api.session(), train_unembed=False, train_mlp=False, train_attn=False)
    assert_error(r, 400, error="invalid_input", contains="trains nothing")


def test_unsupported_optimizer_is_400(api: Api) -> None:
    r = api.post("/api/v1/create_model", _body(api.session(), optimizer_config={"type": "dimuon", "version": 1}))
    assert_error(r, 400, contains="dimuon")


def test_missing_fields_are_400(api: Api) -> None:
    session_id = api.session()
    for missing in ("session_id", "model_seq_id", "base_model"):
        body = _body(session_id)
        del body[missing]
        assert_error(api.post("/api/v1/create_model", body), 400, contains=missing)


def test_same_session_and_model_seq_id_is_the_same_model(api: Api) -> None:
    session_id = api.session()
    first = api.create_model(session_id, 3)
    second = api.create_model(session_id, 3)
    assert first.json() == second.json()
    assert first.json()["model_id"] == f"{session_id}:train:3"
    # Another model_seq_id is another model.
    other = api.create_model(session_id, 4)
    assert other.json()["model_id"] == f"{session_id}:train:4"
    # The same slot with another configuration is a conflict, not a silent reuse.
    assert_error(api.create_model(session_id, 3, rank=16), 409, error="conflict")
    runs = api.get(f"/api/v1/sessions/{session_id}").json()["training_run_ids"]
    assert runs == [f"{session_id}:train:3", f"{session_id}:train:4"]


def test_unknown_session_is_404(api: Api) -> None:
    assert_error(api.create_model("s-doesnotexist"), 404, error="not_found")


def test_finished_session_is_410(api: Api) -> None:
    session_id = api.session()
    assert api.post(f"/api/v1/sessions/{session_id}/finish", {"reason": {"type": "success"}}).status_code == 200
    assert_error(api.create_model(session_id), 410, error="session_finished")
    body = {"session_id": session_id, "sampling_session_seq_id": 0, "base_model": BASE_MODEL}
    assert_error(api.post("/api/v1/create_sampling_session", body), 410, error="session_finished")
