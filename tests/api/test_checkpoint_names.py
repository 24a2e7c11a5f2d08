"""Checkpoint names become directory names: anything that could leave the checkpoint folder (or
hide in it) is refused as a user error, and no file appears anywhere."""

from __future__ import annotations

from typing import Any

import pytest

from tests.api.helpers import Api, assert_error

BAD_NAMES = {
    "slash": "a/b",
    "dotdot": "..",
    "dotdot_slash": "../x",
    "deep_escape": "../../../../tmp/evil",
    "absolute": "/etc/passwd",
    "empty": "",
    "dot": ".",
    "leading_dot": ".hidden",
    "too_long": "x" * 129,
    "nul": "a\x00b",
    "backslash": "a\\..\\b",
    "space": "my ckpt",
    "newline": "ckpt\n",
    "non_ascii": "ckpt-é",
    "inner_dotdot": "a..b",
}

ENDPOINTS = ["save_weights", "save_weights_for_sampler"]


def _save_request(api: Api, endpoint: str, model_id: str, name: str, seq: int = 1) -> Any:
    body = {"model_id": model_id, "path": name, "seq_id": seq, "type": endpoint}
    if endpoint == "save_weights_for_sampler":
        body["kind"] = "snapshot"
    return api.post(f"/api/v1/{endpoint}", body)


def _save(api: Api, endpoint: str, model_id: str, name: str, seq: int = 1) -> str:
    return api.accepted(_save_request(api, endpoint, model_id, name, seq))


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("case", sorted(BAD_NAMES))
def test_bad_checkpoint_name_is_a_failed_future_and_writes_nothing(api: Api, endpoint: str, case: str) -> None:
    model_id = api.model()
    before = api.files()
    message = api.refused(_save_request(api, endpoint, model_id, BAD_NAMES[case]))
    assert "name" in message or "path" in message, message
    assert api.files() == before
    # The next seq is still accepted.
    api.queued(_save(api, endpoint, model_id, "good", seq=2))
    assert api.files() == before


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("name", ["ckpt-1", "step_000100", "v1.2", "A", "x" * 128])
def test_good_checkpoint_names_are_queued(api: Api, endpoint: str, name: str) -> None:
    api.queued(_save(api, endpoint, api.model(), name))


def test_nothing_escapes_the_checkpoint_dir(api: Api) -> None:
    """After every test above: nothing but the database, (once a worker runs) checkpoints, and
    the wake-up registry of the API's and workers' datagram ports (app/localbell.py: a file per
    listening process, no user data)."""
    allowed_top = {"checkpoints", "cache", "wake"}
    for rel in api.files():
        assert rel.split("/")[0] in allowed_top, rel


def test_sampler_save_needs_a_name_or_a_sampling_session(api: Api) -> None:
    model_id = api.model()
    bare = {"model_id": model_id, "seq_id": 1, "type": "save_weights_for_sampler"}
    assert "sampling_session_seq_id" in api.failed_future(
        api.accepted(api.post("/api/v1/save_weights_for_sampler", bare))
    )
    ephemeral = {**bare, "seq_id": 2, "sampling_session_seq_id": 0, "kind": "inflight"}
    api.queued(api.accepted(api.post("/api/v1/save_weights_for_sampler", ephemeral)))
    negative = {**bare, "seq_id": 3, "sampling_session_seq_id": -1}
    api.failed_future(api.accepted(api.post("/api/v1/save_weights_for_sampler", negative)))


@pytest.mark.parametrize("ttl", [0, -5, 3650 * 86400 + 1])
def test_out_of_range_ttl_is_a_failed_future(api: Api, ttl: int) -> None:
    body = {"model_id": api.model(), "path": "ckpt", "seq_id": 1, "ttl_seconds": ttl, "overwrite": False}
    assert "ttl_seconds" in api.failed_future(api.accepted(api.post("/api/v1/save_weights", body)))


def test_save_without_seq_id_is_400(api: Api) -> None:
    body = {"model_id": api.model(), "path": "ckpt", "type": "save_weights"}
    assert_error(api.post("/api/v1/save_weights", body), 400, contains="seq_id")
    assert_error(api.post("/api/v1/save_weights_for_sampler", body), 400, contains="seq_id")
