"""load_weights in both addressings, weights_info and create_sampling_session(model_path): which
checkpoints a tenant may name, and how each refusal reaches the client."""

from __future__ import annotations

from typing import Any

import pytest

from tests.api.helpers import BASE_MODEL, KEY_A, KEY_B, Api, assert_error, record_checkpoint

MALFORMED_PATHS = [
    "not-a-tinker-path",
    "tinker://",
    "tinker://run-only",
    "tinker://run/weights",
    "tinker://run/bogus_kind/name",
    "tinker://run/weights/../../etc",
    "tinker://run/weights/a/b",
    "s3://bucket/weights/x",
]


def _legacy(api: Api, model_id: str, path: str, seq: int = 1, optimizer: bool = False, key: str = KEY_A) -> Any:
    body = {"model_id": model_id, "seq_id": seq, "path": path, "optimizer": optimizer, "type": "load_weights"}
    return api.post("/api/v1/load_weights", body, key=key)


def _create_via_load(api: Api, session_id: str, path: str, key: str = KEY_A, **extra: Any) -> Any:
    body = {
        "session_id": session_id,
        "model_seq_id": 0,
        "path": path,
        "optimizer": False,
        "type": "load_weights",
        **extra,
    }
    return api.post("/api/v1/load_weights", body, key=key)


@pytest.fixture
def own_checkpoint(api: Api) -> str:
    model_id = api.model()
    return record_checkpoint(api, model_id, "ckpt")


def test_own_checkpoint_loads_both_ways(api: Api, own_checkpoint: str) -> None:
    api.queued(api.accepted(_legacy(api, api.model(), own_checkpoint)))
    session_id = api.session()
    r = _create_via_load(api, session_id, own_checkpoint)
    api.queued(api.accepted(r))
    # The SDK derives this id itself (tinker-protocol.md §0.8).
    assert r.json()["model_id"] == f"{session_id}:train:0"
    info = api.post("/api/v1/weights_info", {"tinker_path": own_checkpoint})
    assert info.status_code == 200, info.text
    assert info.json()["base_model"] == BASE_MODEL


@pytest.mark.parametrize("path", MALFORMED_PATHS)
def test_malformed_path(api: Api, path: str) -> None:
    message = api.failed_future(api.accepted(_legacy(api, api.model(), path)))
    assert "path" in message or "checkpoint" in message
    assert_error(_create_via_load(api, api.session(), path), 400, error="invalid_input")
    assert_error(api.post("/api/v1/weights_info", {"tinker_path": path}), 400, error="invalid_input")


def test_unknown_checkpoint_session_form_is_404(api: Api, own_checkpoint: str) -> None:
    missing = own_checkpoint.replace("/ckpt", "/never-saved")
    assert_error(_create_via_load(api, api.session(), missing), 404, error="not_found")
    assert_error(api.post("/api/v1/weights_info", {"tinker_path": missing}), 404, error="not_found")


def test_another_tenants_checkpoint_session_form_is_404(api: Api, own_checkpoint: str) -> None:
    session_b = api.session(key=KEY_B)
    assert_error(_create_via_load(api, session_b, own_checkpoint, key=KEY_B), 404, error="not_found")
    assert_error(api.post("/api/v1/weights_info", {"tinker_path": own_checkpoint}, key=KEY_B), 404)
    body = {
        "session_id": session_b,
        "sampling_session_seq_id": 0,
        "model_path": own_checkpoint.replace("weights", "sampler_weights"),
    }
    assert_error(api.post("/api/v1/create_sampling_session", body, key=KEY_B), 404)


BUG_LOAD_NOT_FOUND = (
    "BUG: legacy load_weights naming an unknown (or another tenant's) checkpoint answers 404 and "
    "records nothing at its seq_id, so every later op of the run waits forever for that seq "
    "(app/api/routes/training.py::_submit_run_op catches only InvalidInput from build())"
)


def test_unknown_checkpoint_legacy_form_is_a_failed_future(api: Api, own_checkpoint: str) -> None:
    missing = own_checkpoint.replace("/ckpt", "/never-saved")
    model_id = api.model()
    r = _legacy(api, model_id, missing)
    assert "not found" in api.failed_future(api.accepted(r))


def test_another_tenants_checkpoint_legacy_form_is_a_failed_future(api: Api, own_checkpoint: str) -> None:
    model_b = api.model(key=KEY_B)
    r = _legacy(api, model_b, own_checkpoint, key=KEY_B)
    message = api.failed_future(api.accepted(r), key=KEY_B)
    assert "not found" in message


def test_incompatible_checkpoint_is_a_failed_future(api: Api, own_checkpoint: str) -> None:
    other_rank = api.create_model(api.session(), rank=16)
    message = api.failed_future(api.accepted(_legacy(api, other_rank.json()["model_id"], own_checkpoint)))
    assert "rank" in message
    # Optimizer state asked of a weights-only checkpoint.
    message = api.failed_future(api.accepted(_legacy(api, api.model(), own_checkpoint, optimizer=True)))
    assert "optimizer" in message
    assert_error(_create_via_load(api, api.session(), own_checkpoint, optimizer=True), 400, contains="optimizer")


def test_create_via_load_with_the_wrong_base_model_is_400(api: Api, own_checkpoint: str) -> None:
    assert_error(
        _create_via_load(api, api.session(), own_checkpoint, base_model="Qwen/other"), 400, contains="Qwen/other"
    )


def test_both_addressings_at_once_is_a_failed_future(api: Api, own_checkpoint: str) -> None:
    model_id = api.model()
    body = {"model_id": model_id, "seq_id": 1, "session_id": api.session(), "model_seq_id": 0, "path": own_checkpoint}
    assert "not both" in api.failed_future(api.accepted(api.post("/api/v1/load_weights", body)))


def test_load_weights_without_an_address_is_400(api: Api, own_checkpoint: str) -> None:
    assert_error(api.post("/api/v1/load_weights", {"path": own_checkpoint}), 400)
    assert_error(
        api.post("/api/v1/load_weights", {"model_id": api.model(), "path": own_checkpoint}), 400, contains="seq_id"
    )
