"""X-API-Key authentication: configured keys, database keys, revocation, and the open health check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.auth import create_key, revoke_key
from tests.api.helpers import KEY_A, Api, assert_error, fb_body, make_settings, running_app

# (method, path, body) of endpoints that need a key; bodies are valid so only auth can fail.
PROTECTED: list[tuple[str, str, Any]] = [
    ("POST", "/api/v1/client/config", {"sdk_version": "0.38.0"}),
    ("POST", "/api/v1/client/dynamic_config", {"sdk_version": "0.38.0"}),
    ("GET", "/api/v1/get_server_capabilities", None),
    ("POST", "/api/v1/telemetry", {"events": []}),
    ("POST", "/api/v1/create_session", {"tags": []}),
    ("POST", "/api/v1/session_heartbeat", {"session_id": "s-x", "type": "session_heartbeat"}),
    ("POST", "/api/v1/retrieve_future", {"request_id": "req-x"}),
    ("GET", "/api/v1/training_runs", None),
    ("GET", "/api/v1/sessions", None),
    ("GET", "/api/v1/checkpoints", None),
    ("POST", "/api/v1/optim_step", {"model_id": "s-x:train:0", "seq_id": 1, "adam_params": {}}),
]


def _call(api: Api, method: str, path: str, body: Any, key: str | None) -> Any:
    if method == "GET":
        return api.get(path, key=key)
    return api.post(path, body, key=key)


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED, ids=[p for _, p, _ in PROTECTED])
def test_missing_key_is_401_json(api: Api, method: str, path: str, body: Any) -> None:
    err = assert_error(_call(api, method, path, body, None), 401, error="unauthorized")
    assert err["category"] == "user"


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED, ids=[p for _, p, _ in PROTECTED])
def test_unknown_key_is_401_json(api: Api, method: str, path: str, body: Any) -> None:
    assert_error(_call(api, method, path, body, "tml-not-a-real-key"), 401, error="unauthorized")


def test_empty_key_and_forward_backward_need_auth(api: Api) -> None:
    assert_error(api.post("/api/v1/create_session", {}, key=""), 401, error="unauthorized")
    assert_error(api.post_proto(fb_body("s-x:train:0", 1), key=None), 401, error="unauthorized")
    assert_error(api.post_proto(fb_body("s-x:train:0", 1), key="tml-nope"), 401, error="unauthorized")


def test_healthz_needs_no_key(api: Api) -> None:
    for path in ("/api/v1/healthz", "/healthz"):
        r = api.get(path, key=None)
        assert r.status_code == 200, r.text
        assert r.json() == {"status": "ok"}


def test_database_keys_work_scoped_and_revocable(db_url: str, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, db_url)
    with running_app(settings) as api:
        with api.db.write() as s:
            key_id, acme_key = create_key(s, tenant="acme", name="ci")
            revoked_id, revoked_key = create_key(s, tenant="acme", name="old")
            _, revoked_by_prefix = create_key(s, tenant="acme", name="old2")
        with api.db.write() as s:
            # Revoked before its first use, so the resolver's 10 s cache cannot hold a stale hit.
            assert revoke_key(s, str(revoked_id)) == 1
            assert revoke_key(s, revoked_by_prefix[:12]) == 1

        acme_session = api.session(key=acme_key)
        dev_session = api.session(key=KEY_A)

        # The key resolves to its own tenant: it sees its session, not the dev tenant's, and back.
        assert api.get(f"/api/v1/sessions/{acme_session}", key=acme_key).status_code == 200
        assert_error(api.get(f"/api/v1/sessions/{dev_session}", key=acme_key), 404)
        assert_error(api.get(f"/api/v1/sessions/{acme_session}", key=KEY_A), 404)
        listed = api.get("/api/v1/sessions", key=acme_key).json()["sessions"]
        assert listed == [acme_session]
        assert acme_session not in api.get("/api/v1/sessions", key=KEY_A).json()["sessions"]

        for dead in (revoked_key, revoked_by_prefix):
            assert_error(api.post("/api/v1/create_session", {}, key=dead), 401, error="unauthorized")
            assert_error(api.get("/api/v1/get_server_capabilities", key=dead), 401)
        # The live key is unaffected by the others' revocation.
        assert api.post("/api/v1/client/config", {}, key=acme_key).status_code == 200
        assert key_id != revoked_id


def test_dev_key_is_off_once_a_database_url_is_set(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'other.db'}", api_keys=[])
    with running_app(settings) as api:
        assert_error(api.post("/api/v1/create_session", {}, key=KEY_A), 401, error="unauthorized")
        assert api.get("/api/v1/healthz", key=None).status_code == 200
