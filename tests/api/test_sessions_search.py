"""`POST /api/v1/sessions/search` (0.38's experimental RestClient.search_sessions): requests are
built and replies validated with the SDK's own models; filters, keyset pagination, tenant scope,
and clear 400s for bad input. The list and get endpoints carry what both SDK versions parse.

Every test tags its sessions with a fresh user_metadata value, so the shared app's other sessions
never show up in its results.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import update
from tinker import types

from app.db.models import Session
from tests.api.helpers import KEY_A, KEY_B, TENANT_B, Api, assert_error, record_checkpoint


def _session(api: Api, *, key: str = KEY_A, display_name: str | None = None, **metadata: str) -> str:
    body: dict[str, Any] = {"tags": [], "user_metadata": metadata, "sdk_version": "0.38.0", "type": "create_session"}
    if display_name is not None:
        body["display_name"] = display_name
    r = api.post("/api/v1/create_session", body, key=key)
    assert r.status_code == 200, r.text
    return str(r.json()["session_id"])


def _search(api: Api, request: types.SessionSearchRequest, *, key: str = KEY_A) -> types.SessionSearchResponse:
    """Exactly what RestClient.search_sessions sends, and the reply as the SDK parses it."""
    r = api.post("/api/v1/sessions/search", request.model_dump(mode="json", exclude_none=True), key=key)
    assert r.status_code == 200, r.text
    return types.SessionSearchResponse.model_validate(r.json())


def _ids(page: types.SessionSearchResponse) -> list[str]:
    return [s.session_id for s in page.sessions]


def _tag() -> str:
    return uuid.uuid4().hex


def test_summary_fields_and_newest_first(api: Api) -> None:
    tag = _tag()
    older = _session(api, display_name="Nightly eval", tag=tag, team="search")
    newer = _session(api, tag=tag)
    model = api.create_model(older)
    assert model.status_code == 200, model.text
    record_checkpoint(api, model.json()["model_id"], "ckpt-1")
    record_checkpoint(api, model.json()["model_id"], "ckpt-2", kind="sampler")

    page = _search(api, types.SessionSearchRequest(user_metadata={"tag": tag}))
    assert _ids(page) == [newer, older]
    assert page.next_cursor is None
    summary = page.sessions[1]
    assert summary.owner == "default" and summary.project_id == "default"
    assert summary.display_name == "Nightly eval"
    assert summary.user_metadata == {"tag": tag, "team": "search"}
    assert isinstance(summary.status, types.SessionActive)
    assert summary.checkpoints_count == 2 and summary.checkpoint_storage_bytes == 2
    assert summary.created_at.tzinfo is not None and summary.created_at <= page.sessions[0].created_at
    assert page.sessions[0].checkpoints_count == 0
    # TuFT's own fields, for raw HTTP clients (the SDK's models drop unknown keys).
    raw = api.post("/api/v1/sessions/search", {"user_metadata": {"tag": tag}}).json()
    assert [s["tuft_state"] for s in raw["sessions"]] == ["active", "active"]
    assert all(s["last_active_at"].endswith("+00:00") for s in raw["sessions"])


def test_filters(api: Api) -> None:
    tag = _tag()
    a = _session(api, display_name="RL sweep: lr 1e-4", tag=tag, kind="rl")
    b = _session(api, display_name="SFT baseline", tag=tag, kind="sft")
    c = _session(api, tag=tag, kind="rl")

    def ids(**kw: Any) -> list[str]:
        return _ids(_search(api, types.SessionSearchRequest(**kw)))

    # user_metadata: every pair must hold, exactly.
    assert ids(user_metadata={"tag": tag, "kind": "rl"}) == [c, a]
    assert ids(user_metadata={"tag": tag, "kind": "RL"}) == []
    assert ids(user_metadata={"tag": tag, "missing": ""}) == []
    # display_name: case-insensitive substrings, every word somewhere in the name.
    assert ids(user_metadata={"tag": tag}, display_name="sweep RL") == [a]
    assert ids(user_metadata={"tag": tag}, display_name="sft rl") == []
    # LIKE wildcards are plain characters.
    assert ids(user_metadata={"tag": tag}, display_name="%") == []
    # session_id and display_name: either may match.
    assert ids(user_metadata={"tag": tag}, session_id=c, display_name="baseline") == [c, b]
    assert ids(user_metadata={"tag": tag}, session_id=c) == [c]

    # Statuses: a finished session is client_finished with its reason.
    assert api.post(f"/api/v1/sessions/{b}/finish", {"reason": {"type": "interrupted"}}).status_code == 200
    active = [types.ActiveSessionStatusQuery()]
    finished = [types.ClientFinishedSessionStatusQuery()]
    assert ids(user_metadata={"tag": tag}, statuses=active) == [c, a]
    assert ids(user_metadata={"tag": tag}, statuses=finished) == [b]
    assert ids(user_metadata={"tag": tag}, statuses=[types.ClientFinishedSessionStatusQuery(reasons=["success"])]) == []
    status = _search(api, types.SessionSearchRequest(session_id=b)).sessions[0].status
    assert isinstance(status, types.ClientSessionFinished)
    assert isinstance(status.reason, types.ClientSessionFinishInterrupted)
    # TuFT neither cancels nor fails sessions.
    gone = [types.CancelledSessionStatusQuery(), types.FailedSessionStatusQuery()]
    assert ids(user_metadata={"tag": tag}, statuses=gone) == []


def test_pagination_is_exact_even_with_equal_creation_times(api: Api) -> None:
    tag = _tag()
    created = [_session(api, tag=tag) for _ in range(5)]
    # Two pairs with identical creation times: the session id breaks the tie.
    with api.db.write() as s:
        first = s.get(Session, created[0])
        assert first is not None
        s.execute(update(Session).where(Session.session_id.in_(created[1:3])).values(created_at=first.created_at + 1))
        s.execute(update(Session).where(Session.session_id.in_(created[3:5])).values(created_at=first.created_at + 2))
    expected = sorted(created[3:5], reverse=True) + sorted(created[1:3], reverse=True) + [created[0]]

    request = types.SessionSearchRequest(user_metadata={"tag": tag}, limit=2)
    pages = []
    while True:
        page = _search(api, request)
        pages.append(_ids(page))
        if page.next_cursor is None:
            break
        assert isinstance(page.next_cursor, types.SessionSearchCursor)
        request = request.model_copy(update={"cursor": page.next_cursor})
    assert pages == [expected[0:2], expected[2:4], expected[4:5]]

    # A page that ends exactly at the last match has no next_cursor.
    page = _search(api, types.SessionSearchRequest(user_metadata={"tag": tag}, limit=5))
    assert _ids(page) == expected and page.next_cursor is None


def test_tenant_scope(api: Api) -> None:
    tag = _tag()
    mine = _session(api, tag=tag)
    theirs = _session(api, key=KEY_B, tag=tag)

    def ids(key: str, **kw: Any) -> list[str]:
        return _ids(_search(api, types.SessionSearchRequest(user_metadata={"tag": tag}, **kw), key=key))

    assert ids(KEY_A) == [mine]
    assert ids(KEY_B) == [theirs]
    # "accessible" is still only the caller's own: tenants share no sessions.
    assert ids(KEY_A, owner=types.AccessibleSearchOwner()) == [mine]
    assert ids(KEY_A, owner=types.UserSearchOwner(owner_urns=["default"])) == [mine]
    assert ids(KEY_A, owner=types.UserSearchOwner(owner_urns=[TENANT_B])) == []
    assert ids(KEY_B, owner=types.UserSearchOwner(owner_urns=["default", TENANT_B])) == [theirs]
    # A foreign session id matches nothing, exactly like an unknown one.
    assert ids(KEY_B, session_id=mine) == ids(KEY_B, session_id="s-unknown") == []


@pytest.mark.parametrize(
    ("body", "contains"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 201}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"statuses": []}, "statuses"),
        ({"statuses": [{"type": "sleeping"}]}, "statuses"),
        ({"owner": {"type": "everyone"}}, "owner"),
        ({"owner": {"type": "user"}}, "owner_urns"),
        ({"owner": {"type": "user", "owner_urns": [f"u{i}" for i in range(11)]}}, "owner_urns"),
        ({"display_name": ""}, "display_name"),
        ({"display_name": "   "}, "display_name"),
        ({"project_ids": ["other"]}, "project"),
        ({"session_id": "s-\x00"}, "NUL"),
        ({"user_metadata": {"k": 1}}, "user_metadata"),
        ({"cursor": {"last_created_at": "yesterday", "last_session_id": "s"}}, "last_created_at"),
        ({"cursor": {"last_created_at": "2026-01-01T00:00:00", "last_session_id": "s"}}, "offset"),
        ({"cursor": {"last_created_at": "2026-01-01T00:00:00Z", "last_session_id": "s\x00"}}, "NUL"),
        ({"cursor": {"last_session_id": "s"}}, "last_created_at"),
    ],
)
def test_bad_requests_are_400(api: Api, body: dict[str, Any], contains: str) -> None:
    assert_error(api.post("/api/v1/sessions/search", body), 400, error="invalid_input", contains=contains)


def test_bad_json_is_400_and_key_is_required(api: Api) -> None:
    r = api.post("/api/v1/sessions/search", content=b"{", headers={"Content-Type": "application/json"})
    assert_error(r, 400)
    assert_error(api.post("/api/v1/sessions/search", {}, key=None), 401)
    # The default project is a valid filter; an empty body is the first page of everything.
    assert api.post("/api/v1/sessions/search", {"project_ids": ["default"], "limit": 1}).status_code == 200


def test_list_and_get_parse_in_the_sdk(api: Api) -> None:
    tag = _tag()
    session_id = _session(api, display_name="shown", tag=tag)
    model_id = api.create_model(session_id).json()["model_id"]
    listed = types.ListSessionsResponse.model_validate(api.get("/api/v1/sessions?limit=1000").json())
    assert session_id in listed.sessions
    got = api.get(f"/api/v1/sessions/{session_id}")
    info = types.GetSessionResponse.model_validate(got.json())
    assert info.training_run_ids == [model_id] and info.sampler_ids == []
    assert info.user_metadata == {"tag": tag} and info.display_name == "shown"
    assert got.json()["tuft_state"] == "active"
