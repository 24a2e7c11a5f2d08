"""The SDK range over HTTP (docs/compatibility.md): create_session refuses an SDK older than 0.25
with a 400 naming the supported range, and external checkpoints are listed to 0.28+, the first SDK
whose Checkpoint type accepts them. tests/e2e/test_sdk_matrix.py drives the real SDKs."""

from __future__ import annotations

from typing import Any

import pytest

from tests.api.helpers import Api, assert_error
from tests.api.test_checkpoint_lifecycle import make


def create_session(api: Api, sdk_version: str | None, headers: dict[str, str] | None = None) -> Any:
    body: dict[str, Any] = {"tags": [], "user_metadata": {}, "type": "create_session"}
    if sdk_version is not None:
        body["sdk_version"] = sdk_version
    return api.post("/api/v1/create_session", body, headers=headers or {})


def sdk_headers(version: str) -> dict[str, str]:
    """What every Stainless-built SDK sends (0.38 adds x-sdk-version inside public calls only)."""
    return {"User-Agent": f"AsyncTinker/Python {version}", "X-Stainless-Package-Version": version}


@pytest.mark.parametrize("version", ["0.24.1", "0.24.0", "0.1.0"])
def test_create_session_refuses_sdks_below_the_range(api: Api, version: str) -> None:
    r = create_session(api, version, sdk_headers(version))
    body = assert_error(r, 400, error="invalid_input")
    assert body["category"] == "user"
    assert f"tinker SDK {version} is not supported by this server" in body["message"]
    assert "serves tinker 0.25 to 0.38" in body["message"] and "pip install 'tinker>=0.25'" in body["message"]


def test_a_version_in_the_headers_alone_is_refused_too(api: Api) -> None:
    r = create_session(api, None, sdk_headers("0.24.1"))
    assert "tinker SDK 0.24.1 is not supported" in assert_error(r, 400, error="invalid_input")["message"]


@pytest.mark.parametrize("version", ["0.25.0", "0.30.4", "0.38.0", None, "", "dev-build"])
def test_create_session_serves_the_range_and_clients_without_a_version(api: Api, version: str | None) -> None:
    r = create_session(api, version)
    assert r.status_code == 200, r.text
    assert r.json()["session_id"] and "warning_message" not in r.json()


def test_a_newer_sdk_is_served_with_a_warning(api: Api) -> None:
    r = create_session(api, "0.39.2", sdk_headers("0.39.2"))
    assert r.status_code == 200, r.text
    assert r.json()["warning_message"] == (
        "tinker SDK 0.39.2 is newer than this server has been tested with (0.25 to 0.38)"
    )


@pytest.mark.parametrize(
    ("version", "listed"),
    [("0.25.0", False), ("0.27.2", False), ("0.28.1", True), ("0.36.0", True), ("0.38.0", True)],
)
def test_external_checkpoints_are_listed_from_0_28(api: Api, version: str, listed: bool) -> None:
    """0.28-0.36 accept checkpoint_type "external" (and save them) but were never shown one."""
    model = api.model()
    training = make(api, model, "kept")
    external = make(api, model, "exported", kind="external")
    run = api.get(f"/api/v1/training_runs/{model}/checkpoints", headers=sdk_headers(version))
    assert run.status_code == 200, run.text
    shown = {c["tinker_path"]: c for c in run.json()["checkpoints"]}
    assert set(shown) == ({training, external} if listed else {training})
    assert run.json()["cursor"]["total_count"] == len(shown)
    if listed:
        assert shown[external]["checkpoint_type"] == "external"
        assert shown[external]["checkpoint_id"] == "external_weights/exported"
    user = api.get("/api/v1/checkpoints", params={"limit": 1000}, headers=sdk_headers(version))
    assert user.status_code == 200, user.text
    assert (external in {c["tinker_path"] for c in user.json()["checkpoints"]}) == listed
