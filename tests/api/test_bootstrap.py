"""Client bootstrap and the session lifecycle (tinker-protocol.md §2, §5.1)."""

from __future__ import annotations

from pathlib import Path

from tinker import types

from tests.api.helpers import BASE_MODEL, Api, assert_error, make_settings, running_app


def test_client_config_parses_as_the_sdk_reads_it(api: Api) -> None:
    r = api.post("/api/v1/client/config", {"sdk_version": "0.38.0"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    config = types.ClientConfigResponse.model_validate(r.json())
    # The server decompresses zstd, so it asks the SDK to compress forward_backward bodies.
    assert config.proto_compress_fwdbwd is True
    assert config.pjwt_auth_enabled is False
    # The SDK's HTTP runs on httpx's own transport unless client_pyqwest_transport says otherwise.
    assert config.use_pyqwest_transport is False


def test_client_config_turns_the_pyqwest_transport_on_when_configured(tmp_path: Path) -> None:
    with running_app(make_settings(tmp_path, None, client_pyqwest_transport=True)) as api:
        config = types.ClientConfigResponse.model_validate(
            api.post("/api/v1/client/config", {"sdk_version": "0.38.0"}).json()
        )
    assert config.use_pyqwest_transport is True


def test_dynamic_config(api: Api) -> None:
    r = api.post("/api/v1/client/dynamic_config", {"sdk_version": "0.38.0"})
    assert r.status_code == 200, r.text
    types.ClientDynamicConfigResponse.model_validate(r.json())


def test_telemetry_is_accepted_whatever_its_shape(api: Api) -> None:
    for body in (
        {"events": [{"event": "SESSION_START"}], "platform": "linux", "sdk_version": "0.38.0", "session_id": "s-x"},
        {},
        {"events": "not a list"},
    ):
        r = api.post("/api/v1/telemetry", body)
        assert r.status_code == 200, r.text
        assert r.json() == {"status": "accepted"}
    r = api.post("/api/v1/telemetry", content=b"\xff not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 200
    assert r.json() == {"status": "accepted"}


def test_server_capabilities_list_the_builtin_model_first(api: Api) -> None:
    r = api.get("/api/v1/get_server_capabilities")
    assert r.status_code == 200, r.text
    caps = types.GetServerCapabilitiesResponse.model_validate(r.json())
    first = caps.supported_models[0]
    assert first.model_name == BASE_MODEL
    assert first.max_context_length == 2048
    assert first.trainable is True
    assert first.sampleable is True


def test_session_lifecycle_ends_in_410(api: Api) -> None:
    body = {"tags": ["b", "a", "a"], "user_metadata": {"k": "v"}, "sdk_version": "0.38.0", "display_name": "n"}
    r = api.post("/api/v1/create_session", body)
    assert r.status_code == 200, r.text
    session_id = types.CreateSessionResponse.model_validate(r.json()).session_id
    assert session_id and "/" not in session_id

    r = api.post("/api/v1/session_heartbeat", {"session_id": session_id, "type": "session_heartbeat"})
    assert r.status_code == 200, r.text
    types.SessionHeartbeatResponse.model_validate(r.json())

    got = api.get(f"/api/v1/sessions/{session_id}")
    assert got.status_code == 200, got.text
    info = types.GetSessionResponse.model_validate(got.json())
    assert info.training_run_ids == [] and info.sampler_ids == []

    finish = {"reason": {"type": "success"}, "detail": "done"}
    r = api.post(f"/api/v1/sessions/{session_id}/finish", finish)
    assert r.status_code == 200, r.text
    # The first finish wins; a second one is harmless.
    assert api.post(f"/api/v1/sessions/{session_id}/finish", {"reason": {"type": "errored"}}).status_code == 200

    r = api.post("/api/v1/session_heartbeat", {"session_id": session_id, "type": "session_heartbeat"})
    err = assert_error(r, 410, error="session_finished")
    assert session_id in err["message"]


def test_heartbeat_and_finish_of_unknown_session_are_404(api: Api) -> None:
    assert_error(api.post("/api/v1/session_heartbeat", {"session_id": "s-unknown"}), 404, error="not_found")
    assert_error(api.post("/api/v1/sessions/s-unknown/finish", {}), 404, error="not_found")
    assert_error(api.get("/api/v1/sessions/s-unknown"), 404, error="not_found")


def test_heartbeat_without_session_id_is_400(api: Api) -> None:
    assert_error(api.post("/api/v1/session_heartbeat", {"type": "session_heartbeat"}), 400)
    assert_error(
        api.post("/api/v1/create_session", content=b"{not json", headers={"Content-Type": "application/json"}), 400
    )
    assert_error(api.post("/api/v1/create_session", [1, 2]), 400)


def test_unknown_route_is_a_json_404(api: Api) -> None:
    assert_error(api.post("/api/v1/forward", {}), 404, error="not_found")
