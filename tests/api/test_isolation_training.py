"""Tenant isolation, one test per endpoint, for sessions and training: tenant B naming tenant A's
session, run or checkpoint gets the 404 an unknown id of the same form gets (same status, error
code, category, and message once the id itself is masked), so ids are never confirmed; and A's
objects are exactly as they were afterwards (read back from the database and the checkpoint
directory). Sampling, futures, REST and published checkpoints: test_isolation_endpoints.py.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from tinker import types

from app.db.models import Session
from tests.api.helpers import (
    BASE_MODEL,
    KEY_B,
    TENANT_B,
    Api,
    adam,
    assert_error,
    fb_body,
)
from tests.api.isolation_world import (
    MASK,
    World,
    a_state,
    assert_like_unknown,
    b_runs,
    create_via_load,
    legacy_load,
    sampling_session,
    w_fixture,  # noqa: F401  (the `w` fixture)
)

# Sessions


def test_get_session(api: Api, w: World) -> None:
    before = a_state(api, w)
    foreign = api.get(f"/api/v1/sessions/{w.session_a}", key=KEY_B)
    unknown = api.get(f"/api/v1/sessions/{w.unknown_session}", key=KEY_B)
    assert_like_unknown(foreign, unknown, w.session_a, w.unknown_session)
    assert a_state(api, w) == before
    own = api.get(f"/api/v1/sessions/{w.session_a}")
    assert own.status_code == 200, own.text
    assert own.json()["training_run_ids"] == [w.model_a] and own.json()["sampler_ids"] == [w.sampler_a]


def test_session_heartbeat(api: Api, w: World) -> None:
    before = a_state(api, w)
    foreign = api.post("/api/v1/session_heartbeat", {"session_id": w.session_a}, key=KEY_B)
    unknown = api.post("/api/v1/session_heartbeat", {"session_id": w.unknown_session}, key=KEY_B)
    assert_like_unknown(foreign, unknown, w.session_a, w.unknown_session)
    assert a_state(api, w) == before  # last_heartbeat_at untouched
    assert api.post("/api/v1/session_heartbeat", {"session_id": w.session_a}).status_code == 200
    # A finished session of A's is still just "not found" to B (not "session finished", which
    # would confirm it exists): the tenant is checked before liveness.
    finished = api.session()
    assert api.post(f"/api/v1/sessions/{finished}/finish", {}).status_code == 200
    assert_error(api.post("/api/v1/session_heartbeat", {"session_id": finished}), 410, error="session_finished")
    for request in (
        lambda sid: api.post("/api/v1/session_heartbeat", {"session_id": sid}, key=KEY_B),
        lambda sid: api.create_model(sid, key=KEY_B),
        lambda sid: api.post(
            "/api/v1/create_sampling_session", sampling_session(sid, base_model=BASE_MODEL), key=KEY_B
        ),
    ):
        assert_like_unknown(request(finished), request(w.unknown_session), finished, w.unknown_session)


def test_finish_session(api: Api, w: World) -> None:
    before = a_state(api, w)
    body = {"reason": {"type": "errored"}}
    foreign = api.post(f"/api/v1/sessions/{w.session_a}/finish", body, key=KEY_B)
    unknown = api.post(f"/api/v1/sessions/{w.unknown_session}/finish", body, key=KEY_B)
    assert_like_unknown(foreign, unknown, w.session_a, w.unknown_session)
    assert a_state(api, w) == before  # finished_at still None
    # A's session is still live: A can heartbeat it and create in it.
    assert api.post("/api/v1/session_heartbeat", {"session_id": w.session_a}).status_code == 200
    assert api.create_model(w.session_a, 1).status_code == 200


def test_list_sessions(api: Api, w: World) -> None:
    listed_b = api.get("/api/v1/sessions?limit=1000", key=KEY_B)
    assert listed_b.status_code == 200, listed_b.text
    sessions_b = listed_b.json()["sessions"]
    assert w.session_b in sessions_b and w.session_a not in sessions_b
    with api.db.read() as s:
        tenants = set(s.execute(select(Session.tenant).where(Session.session_id.in_(sessions_b))).scalars())
    assert tenants == {TENANT_B}
    assert w.session_a in api.get("/api/v1/sessions?limit=1000").json()["sessions"]


# Training


def test_create_model_in_foreign_session(api: Api, w: World) -> None:
    before = a_state(api, w)
    # model_seq_id 0 names A's existing run (a different config would be a 409 for A); 1 names none.
    for seq in (0, 1):
        foreign = api.create_model(w.session_a, seq, key=KEY_B, rank=4)
        unknown = api.create_model(w.unknown_session, seq, key=KEY_B, rank=4)
        assert_like_unknown(foreign, unknown, w.session_a, w.unknown_session)
    assert a_state(api, w) == before
    assert w.session_a not in str(b_runs(api))


def test_get_info(api: Api, w: World) -> None:
    before = a_state(api, w)
    foreign = api.post("/api/v1/get_info", {"model_id": w.model_a, "type": "get_info"}, key=KEY_B)
    unknown = api.post("/api/v1/get_info", {"model_id": w.unknown_model, "type": "get_info"}, key=KEY_B)
    assert_like_unknown(foreign, unknown, w.session_a, w.unknown_session)
    assert a_state(api, w) == before
    assert api.post("/api/v1/get_info", {"model_id": w.model_a}).json()["model_id"] == w.model_a


def test_forward_backward(api: Api, w: World) -> None:
    before = a_state(api, w)
    # A valid body, and one whose content is broken (empty data: the server records such a
    # request as a failed op at its seq, so it must look the run up under B's tenant first).
    no_data: list[types.Datum] = []
    for data in (None, no_data):
        foreign = api.post_proto(fb_body(w.model_a, 2, data), key=KEY_B)
        unknown = api.post_proto(fb_body(w.unknown_model, 2, data), key=KEY_B)
        assert_like_unknown(foreign, unknown, w.session_a, w.unknown_session)
    assert a_state(api, w) == before  # no op added to A's run
    api.queued(api.accepted(api.post_proto(fb_body(w.model_a, 2))))


def test_optim_step(api: Api, w: World) -> None:
    before = a_state(api, w)

    def body(model_id: str) -> dict[str, Any]:
        return {"model_id": model_id, "seq_id": 2, "adam_params": adam(), "type": "optim_step"}

    foreign = api.post("/api/v1/optim_step", body(w.model_a), key=KEY_B)
    unknown = api.post("/api/v1/optim_step", body(w.unknown_model), key=KEY_B)
    assert_like_unknown(foreign, unknown, w.session_a, w.unknown_session)
    assert a_state(api, w) == before
    api.queued(api.accepted(api.post("/api/v1/optim_step", body(w.model_a))))


def test_save_weights(api: Api, w: World) -> None:
    before = a_state(api, w)

    def body(model_id: str, name: str = "b-steals") -> dict[str, Any]:
        return {"model_id": model_id, "seq_id": 2, "path": name, "type": "save_weights"}

    foreign = api.post("/api/v1/save_weights", body(w.model_a), key=KEY_B)
    unknown = api.post("/api/v1/save_weights", body(w.unknown_model), key=KEY_B)
    assert_like_unknown(foreign, unknown, w.session_a, w.unknown_session)
    # Naming A's existing checkpoint with overwrite is the same 404.
    clobber = {**body(w.model_a, "a-ckpt"), "overwrite": True}
    assert_like_unknown(
        api.post("/api/v1/save_weights", clobber, key=KEY_B),
        api.post("/api/v1/save_weights", {**clobber, "model_id": w.unknown_model}, key=KEY_B),
        w.session_a,
        w.unknown_session,
    )
    assert a_state(api, w) == before
    api.queued(api.accepted(api.post("/api/v1/save_weights", body(w.model_a, "a-own"))))


def test_save_weights_for_sampler(api: Api, w: World) -> None:
    before = a_state(api, w)

    def body(model_id: str) -> dict[str, Any]:
        return {
            "model_id": model_id,
            "seq_id": 2,
            "path": "b-steals",
            "kind": "snapshot",
            "type": "save_weights_for_sampler",
        }

    foreign = api.post("/api/v1/save_weights_for_sampler", body(w.model_a), key=KEY_B)
    unknown = api.post("/api/v1/save_weights_for_sampler", body(w.unknown_model), key=KEY_B)
    assert_like_unknown(foreign, unknown, w.session_a, w.unknown_session)
    assert a_state(api, w) == before
    api.queued(api.accepted(api.post("/api/v1/save_weights_for_sampler", body(w.model_a))))


def test_load_weights_legacy_into_foreign_run(api: Api, w: World) -> None:
    before = a_state(api, w)
    # B's own checkpoint into A's run, and A's checkpoint into A's run: both 404 like an unknown run.
    for path in (w.ckpt_b, w.ckpt_a):
        foreign = api.post("/api/v1/load_weights", legacy_load(w.model_a, path, seq=2), key=KEY_B)
        unknown = api.post("/api/v1/load_weights", legacy_load(w.unknown_model, w.unknown_path(path), seq=2), key=KEY_B)
        assert_like_unknown(foreign, unknown, w.session_a, w.unknown_session)
    assert a_state(api, w) == before
    api.queued(api.accepted(api.post("/api/v1/load_weights", legacy_load(w.model_a, w.ckpt_a, seq=2))))


def test_load_weights_legacy_from_foreign_checkpoint(api: Api, w: World) -> None:
    """Into B's own run: A's checkpoint fails the future exactly like a checkpoint that does not
    exist (the legacy form reports a bad path as a failed future, tests/api/test_load_weights.py)."""
    before = a_state(api, w)
    foreign = api.failed_future(
        api.accepted(api.post("/api/v1/load_weights", legacy_load(w.model_b, w.ckpt_a, seq=1), key=KEY_B)), key=KEY_B
    )
    unknown = api.failed_future(
        api.accepted(
            api.post("/api/v1/load_weights", legacy_load(w.model_b, w.unknown_path(w.ckpt_a), seq=2), key=KEY_B)
        ),
        key=KEY_B,
    )
    assert "not found" in foreign
    assert foreign.replace(w.session_a, MASK) == unknown.replace(w.unknown_session, MASK)
    assert a_state(api, w) == before


def test_load_weights_create_via_load(api: Api, w: World) -> None:
    before = a_state(api, w)
    runs_b = b_runs(api)
    # A's checkpoint into a fresh session of B's: 404 like an unknown checkpoint, and no run.
    session_b = api.session(key=KEY_B)
    for path in (w.ckpt_a, w.sampler_ckpt_a):
        foreign = api.post("/api/v1/load_weights", create_via_load(session_b, path), key=KEY_B)
        unknown = api.post("/api/v1/load_weights", create_via_load(session_b, w.unknown_path(path)), key=KEY_B)
        assert_like_unknown(foreign, unknown, w.session_a, w.unknown_session)
    assert b_runs(api) == runs_b
    assert api.get(f"/api/v1/sessions/{session_b}", key=KEY_B).json()["training_run_ids"] == []
    # B's own checkpoint into A's session: 404 like an unknown session; no run in A's session.
    foreign = api.post("/api/v1/load_weights", {**create_via_load(w.session_a, w.ckpt_b), "model_seq_id": 5}, key=KEY_B)
    unknown = api.post(
        "/api/v1/load_weights", {**create_via_load(w.unknown_session, w.ckpt_b), "model_seq_id": 5}, key=KEY_B
    )
    assert_like_unknown(foreign, unknown, w.session_a, w.unknown_session)
    assert a_state(api, w) == before
    assert b_runs(api) == runs_b


def test_weights_info(api: Api, w: World) -> None:
    before = a_state(api, w)
    for path in (w.ckpt_a, w.sampler_ckpt_a):
        foreign = api.post("/api/v1/weights_info", {"tinker_path": path}, key=KEY_B)
        unknown = api.post("/api/v1/weights_info", {"tinker_path": w.unknown_path(path)}, key=KEY_B)
        assert_like_unknown(foreign, unknown, w.session_a, w.unknown_session)
        assert api.post("/api/v1/weights_info", {"tinker_path": path}).status_code == 200
    assert a_state(api, w) == before
