"""Tenant isolation, one test per endpoint, for sampling, futures and the REST listings: tenant B
naming tenant A's sampler, future or checkpoint gets the 404 an unknown id of the same form gets
(same status, error code, category, and message once the id itself is masked), so ids are never
confirmed; and A's objects are exactly as they were afterwards. Sessions and training:
test_isolation_training.py.

A published checkpoint (its row's `public` set directly here; the publish endpoint has its own tests
in test_checkpoint_lifecycle.py) may be read by B, never deleted by B, and does not make A's run
visible to B.
"""

from __future__ import annotations

import uuid

from sqlalchemy import select
from tinker import types

from app.db.models import Run
from tests.api.helpers import (
    BASE_MODEL,
    KEY_A,
    KEY_B,
    TENANT_B,
    Api,
    assert_error,
)
from tests.api.isolation_world import (
    World,
    a_state,
    assert_like_unknown,
    b_runs,
    b_samplers,
    checkpoint_row,
    create_via_load,
    delete,
    legacy_load,
    publish,
    sample_body,
    sampling_session,
    w_fixture,  # noqa: F401  (the `w` fixture)
)

# Sampling


def test_create_sampling_session_from_foreign_checkpoint(api: Api, w: World) -> None:
    before = a_state(api, w)
    samplers_b = b_samplers(api)
    for path in (w.sampler_ckpt_a, w.ckpt_a):
        foreign = api.post("/api/v1/create_sampling_session", sampling_session(w.session_b, model_path=path), key=KEY_B)
        unknown = api.post(
            "/api/v1/create_sampling_session",
            sampling_session(w.session_b, model_path=w.unknown_path(path)),
            key=KEY_B,
        )
        assert_like_unknown(foreign, unknown, w.session_a, w.unknown_session)
    assert b_samplers(api) == samplers_b
    assert a_state(api, w) == before


def test_create_sampling_session_in_foreign_session(api: Api, w: World) -> None:
    before = a_state(api, w)
    samplers_b = b_samplers(api)
    # Seq 0 is A's existing sampler (B must not get its id back); seq 1 names none. Both with a
    # base model, and with B's own checkpoint as the model path.
    for seq in (0, 1):
        for extra in ({"base_model": BASE_MODEL}, {"model_path": w.ckpt_b}):
            foreign = api.post(
                "/api/v1/create_sampling_session", sampling_session(w.session_a, seq, **extra), key=KEY_B
            )
            unknown = api.post(
                "/api/v1/create_sampling_session", sampling_session(w.unknown_session, seq, **extra), key=KEY_B
            )
            assert_like_unknown(foreign, unknown, w.session_a, w.unknown_session)
    assert a_state(api, w) == before
    assert b_samplers(api) == samplers_b


def test_get_sampler(api: Api, w: World) -> None:
    before = a_state(api, w)
    foreign = api.get(f"/api/v1/samplers/{w.sampler_a}", key=KEY_B)
    unknown = api.get(f"/api/v1/samplers/{w.unknown_sampler}", key=KEY_B)
    assert_like_unknown(foreign, unknown, w.session_a, w.unknown_session)
    assert a_state(api, w) == before
    assert api.get(f"/api/v1/samplers/{w.sampler_a}").json()["sampler_id"] == w.sampler_a


def test_asample(api: Api, w: World) -> None:
    before = a_state(api, w)
    foreign = api.post("/api/v1/asample", sample_body(w.sampler_a), key=KEY_B)
    unknown = api.post("/api/v1/asample", sample_body(w.unknown_sampler), key=KEY_B)
    assert_like_unknown(foreign, unknown, w.session_a, w.unknown_session)
    assert a_state(api, w) == before  # no sample op on A's sampler
    api.queued(api.accepted(api.post("/api/v1/asample", sample_body(w.sampler_a))))


# Futures


def test_retrieve_future(api: Api, w: World) -> None:
    # A's futures in each state: queued (forward_backward), succeeded (create_model, never yet
    # delivered) and failed (a rejected save name).
    create_future = f"create-{w.model_a}"
    failed_future = api.accepted(
        api.post("/api/v1/save_weights", {"model_id": w.model_a, "seq_id": 2, "path": "../bad", "type": "save_weights"})
    )
    before = a_state(api, w)
    for request_id, unknown_id in (
        (w.future_a, f"req-{uuid.uuid4().hex}"),
        (failed_future, f"req-{uuid.uuid4().hex}"),
        (create_future, f"create-{w.unknown_model}"),
    ):
        assert_like_unknown(
            api.retrieve(request_id, key=KEY_B), api.retrieve(unknown_id, key=KEY_B), request_id, unknown_id
        )
    assert a_state(api, w) == before  # B's polls marked nothing delivered
    # A still gets every one of them.
    api.pending_future(w.future_a)
    assert api.failed_future(failed_future)
    done = api.retrieve(create_future)
    assert done.status_code == 200, done.text
    assert done.json()["model_id"] == w.model_a


# Training runs and checkpoints (REST)


def test_list_training_runs(api: Api, w: World) -> None:
    r = api.get("/api/v1/training_runs?limit=1000", key=KEY_B)
    assert r.status_code == 200, r.text
    runs = types.TrainingRunsResponse.model_validate(r.json())
    ids = {x.training_run_id for x in runs.training_runs}
    assert w.model_b in ids and w.model_a not in ids
    assert all(x.model_owner == TENANT_B for x in runs.training_runs)
    assert runs.cursor.total_count == len(b_runs(api))
    assert all(w.session_a not in str(x) for x in r.json()["training_runs"])
    assert w.model_a in {
        x["training_run_id"] for x in api.get("/api/v1/training_runs?limit=1000").json()["training_runs"]
    }


def test_get_training_run(api: Api, w: World) -> None:
    before = a_state(api, w)
    foreign = api.get(f"/api/v1/training_runs/{w.model_a}", key=KEY_B)
    unknown = api.get(f"/api/v1/training_runs/{w.unknown_model}", key=KEY_B)
    assert_like_unknown(foreign, unknown, w.session_a, w.unknown_session)
    assert a_state(api, w) == before
    assert api.get(f"/api/v1/training_runs/{w.model_a}").json()["training_run_id"] == w.model_a


def test_list_run_checkpoints(api: Api, w: World) -> None:
    before = a_state(api, w)
    foreign = api.get(f"/api/v1/training_runs/{w.model_a}/checkpoints", key=KEY_B)
    unknown = api.get(f"/api/v1/training_runs/{w.unknown_model}/checkpoints", key=KEY_B)
    assert_like_unknown(foreign, unknown, w.session_a, w.unknown_session)
    assert a_state(api, w) == before
    own = api.get(f"/api/v1/training_runs/{w.model_a}/checkpoints").json()["checkpoints"]
    assert {c["tinker_path"] for c in own} == {w.ckpt_a, w.sampler_ckpt_a}


def test_list_user_checkpoints(api: Api, w: World) -> None:
    publish(api, w.ckpt_a)  # even a published checkpoint of A's is not in B's own listing
    r = api.get("/api/v1/checkpoints?limit=1000", key=KEY_B)
    assert r.status_code == 200, r.text
    listed = types.CheckpointsListResponse.model_validate(r.json())
    paths = {c.tinker_path for c in listed.checkpoints}
    assert w.ckpt_b in paths
    assert all(w.session_a not in p for p in paths)
    with api.db.read() as s:
        owners = {
            s.execute(select(Run.tenant).where(Run.run_id == p.removeprefix("tinker://").split("/")[0])).scalar_one()
            for p in paths
        }
    assert owners == {TENANT_B}
    assert listed.cursor is not None
    assert listed.cursor.total_count == len(paths)
    own = {c["tinker_path"] for c in api.get("/api/v1/checkpoints?limit=1000").json()["checkpoints"]}
    assert {w.ckpt_a, w.sampler_ckpt_a} <= own


def test_delete_checkpoint(api: Api, w: World) -> None:
    before = a_state(api, w)
    assert len(before["files"]) == 4  # two checkpoint folders, two files each
    for path in (w.ckpt_a, w.sampler_ckpt_a):
        foreign = delete(api, path, key=KEY_B)
        unknown = delete(api, w.unknown_path(path), key=KEY_B)
        assert_like_unknown(foreign, unknown, w.session_a, w.unknown_session)
    assert a_state(api, w) == before  # A's rows and files remain
    # The owner's delete works (the 404 above was not a broken route).
    assert delete(api, w.ckpt_a, key=KEY_A).status_code == 200
    with api.db.read() as s:
        assert checkpoint_row(s, w.ckpt_a) is None


# Published checkpoints


def test_published_checkpoint_is_readable_by_b(api: Api, w: World) -> None:
    publish(api, w.ckpt_a)
    publish(api, w.sampler_ckpt_a)
    before = a_state(api, w)
    info = api.post("/api/v1/weights_info", {"tinker_path": w.ckpt_a}, key=KEY_B)
    assert info.status_code == 200, info.text
    assert info.json()["base_model"] == BASE_MODEL and info.json()["lora_rank"] == 8
    sampler = api.post(
        "/api/v1/create_sampling_session", sampling_session(w.session_b, model_path=w.sampler_ckpt_a), key=KEY_B
    )
    assert sampler.status_code == 200, sampler.text
    assert sampler.json()["sampling_session_id"].startswith(w.session_b)
    # load_weights from it: into B's run (legacy form) and as a new run in B's session.
    api.queued(api.accepted(api.post("/api/v1/load_weights", legacy_load(w.model_b, w.ckpt_a), key=KEY_B)))
    session_b = api.session(key=KEY_B)
    created = api.post("/api/v1/load_weights", create_via_load(session_b, w.ckpt_a), key=KEY_B)
    api.queued(api.accepted(created))
    assert created.json()["model_id"] == f"{session_b}:train:0"
    # Everything B made is B's; A's objects are as they were, and A's run stays hidden.
    with api.db.read() as s:
        assert s.get(Run, f"{session_b}:train:0").tenant == TENANT_B  # type: ignore[union-attr]
    assert a_state(api, w) == before
    assert_error(api.get(f"/api/v1/training_runs/{w.model_a}", key=KEY_B), 404, error="not_found")
    assert_error(api.get(f"/api/v1/training_runs/{w.model_a}/checkpoints", key=KEY_B), 404, error="not_found")


def test_published_checkpoint_is_not_deletable_by_b(api: Api, w: World) -> None:
    publish(api, w.ckpt_a)
    publish(api, w.sampler_ckpt_a)
    before = a_state(api, w)
    for path in (w.ckpt_a, w.sampler_ckpt_a):
        assert api.post("/api/v1/weights_info", {"tinker_path": path}, key=KEY_B).status_code == 200
        foreign = delete(api, path, key=KEY_B)
        unknown = delete(api, w.unknown_path(path), key=KEY_B)
        assert_like_unknown(foreign, unknown, w.session_a, w.unknown_session)
    assert a_state(api, w) == before  # rows (still public) and files remain
    assert api.post("/api/v1/weights_info", {"tinker_path": w.ckpt_a}, key=KEY_B).status_code == 200
    assert delete(api, w.ckpt_a, key=KEY_A).status_code == 200
