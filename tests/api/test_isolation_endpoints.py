"""Tenant isolation, one test per endpoint: tenant B naming tenant A's session, run, sampler,
future or checkpoint gets the 404 an unknown id of the same form gets (same status, error code,
category, and message once the id itself is masked), so ids are never confirmed; and A's objects
are exactly as they were afterwards (read back from the database and the checkpoint directory).

A published checkpoint (its row's `public` set directly here; the publish endpoint has its own tests in
test_checkpoint_lifecycle.py) may be read by B, never deleted by B, and does not make A's run visible to B.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import or_, select, update
from tinker import types

from app.db.models import Checkpoint, Op, Run, Sampler, Session
from tests.api.helpers import (
    BASE_MODEL,
    KEY_A,
    KEY_B,
    TENANT_B,
    Api,
    adam,
    assert_error,
    fb_body,
    record_checkpoint,
)

MASK = "<id>"


@dataclass
class World:
    session_a: str
    model_a: str
    sampler_a: str
    ckpt_a: str  # tinker://<model_a>/weights/a-ckpt
    sampler_ckpt_a: str  # tinker://<model_a>/sampler_weights/a-sampler
    future_a: str  # A's queued forward_backward
    session_b: str
    model_b: str
    ckpt_b: str
    # An id of each form that names nothing: a session that never existed, and its derived ids.
    unknown_session: str

    @property
    def unknown_model(self) -> str:
        return f"{self.unknown_session}:train:0"

    @property
    def unknown_sampler(self) -> str:
        return f"{self.unknown_session}:sample:0"

    def unknown_path(self, path: str) -> str:
        """The same checkpoint path on a run that does not exist."""
        return path.replace(self.session_a, self.unknown_session)


def _new_session_id() -> str:
    return f"s-{uuid.uuid4().hex[:16]}"


def _write_files(api: Api, path: str) -> None:
    """The files a worker would have written for the checkpoint at `path`."""
    with api.db.read() as s:
        row = _checkpoint_row(s, path)
        assert row is not None
        folder = api.settings.resolved_checkpoint_dir() / row.storage_path
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    (folder / "adapter_config.json").write_text("{}")


def _checkpoint_row(s: Any, path: str) -> Checkpoint | None:
    run_id, segment, name = path.removeprefix("tinker://").split("/")
    kind = "training" if segment == "weights" else "sampler"
    return s.execute(
        select(Checkpoint).where(Checkpoint.run_id == run_id, Checkpoint.kind == kind, Checkpoint.name == name)
    ).scalar_one_or_none()


def _publish(api: Api, path: str) -> None:
    with api.db.write() as s:
        row = _checkpoint_row(s, path)
        assert row is not None
        s.execute(update(Checkpoint).where(Checkpoint.id == row.id).values(public=True))


def _sample_body(sampler_id: str, seq: int = 0) -> dict[str, Any]:
    return {
        "sampling_session_id": sampler_id,
        "seq_id": seq,
        "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
        "sampling_params": {"max_tokens": 4},
        "type": "sample",
    }


def _legacy_load(model_id: str, path: str, seq: int = 1) -> dict[str, Any]:
    return {"model_id": model_id, "seq_id": seq, "path": path, "optimizer": False, "type": "load_weights"}


def _create_via_load(session_id: str, path: str) -> dict[str, Any]:
    return {"session_id": session_id, "model_seq_id": 0, "path": path, "optimizer": False, "type": "load_weights"}


def _sampling_session(session_id: str, seq: int = 0, **extra: Any) -> dict[str, Any]:
    return {"session_id": session_id, "sampling_session_seq_id": seq, "type": "create_sampling_session", **extra}


def _delete(api: Api, path: str, *, key: str) -> Any:
    """DELETE the checkpoint at `path` as `key` (the Api helpers have no DELETE)."""
    run_id, checkpoint_id = path.removeprefix("tinker://").split("/", 1)
    return api.client.delete(f"/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id}", headers={"X-API-Key": key})


def assert_like_unknown(foreign: httpx.Response, unknown: httpx.Response, foreign_id: str, unknown_id: str) -> None:
    """Both are the same 404: status, error code, category; and the messages are identical once
    each names its own id (so the answer says nothing about whether the foreign id exists)."""
    f = assert_error(foreign, 404, error="not_found")
    u = assert_error(unknown, 404, error="not_found")
    assert f["category"] == u["category"]
    for field in ("message", "detail"):
        assert f[field].replace(foreign_id, MASK) == u[field].replace(unknown_id, MASK), (f, u)
    assert foreign.headers["content-type"] == unknown.headers["content-type"]


def a_state(api: Api, w: World) -> dict[str, Any]:
    """Everything of A's the tests could disturb: session, runs and samplers of A's session, every
    op on them, their checkpoint rows, and the checkpoint files."""
    with api.db.read() as s:
        session = s.get(Session, w.session_a)
        assert session is not None
        runs = s.execute(select(Run).where(Run.session_id == w.session_a).order_by(Run.run_id)).scalars().all()
        run_ids = [r.run_id for r in runs]
        samplers = (
            s.execute(select(Sampler).where(Sampler.session_id == w.session_a).order_by(Sampler.sampler_id))
            .scalars()
            .all()
        )
        sampler_ids = [x.sampler_id for x in samplers]
        ops = s.execute(
            select(
                Op.request_id,
                Op.tenant,
                Op.run_id,
                Op.seq,
                Op.sampler_id,
                Op.sampler_seq,
                Op.kind,
                Op.status,
                Op.delivered_at,
            )
            .where(or_(Op.run_id.in_(run_ids), Op.sampler_id.in_(sampler_ids)))
            .order_by(Op.request_id)
        ).all()
        ckpts = (
            s.execute(select(Checkpoint).where(Checkpoint.run_id.in_(run_ids)).order_by(Checkpoint.id)).scalars().all()
        )
        state = {
            "session": (session.tenant, session.finished_at, session.finish_reason, session.last_heartbeat_at),
            "runs": [(r.run_id, r.tenant, r.status, r.next_seq, r.applied_seq, r.last_request_at) for r in runs],
            "samplers": [(x.sampler_id, x.tenant, x.base_model, x.model_path) for x in samplers],
            "ops": [tuple(o) for o in ops],
            "checkpoints": [
                (c.id, c.tenant, c.run_id, c.kind, c.name, c.public, c.storage_path, c.expires_at) for c in ckpts
            ],
        }
        storage = [c.storage_path for c in ckpts]
    root: Path = api.settings.resolved_checkpoint_dir()
    state["files"] = sorted(str(p.relative_to(root)) for folder in storage for p in (root / folder).rglob("*"))
    return state


def b_runs(api: Api) -> list[str]:
    with api.db.read() as s:
        return sorted(s.execute(select(Run.run_id).where(Run.tenant == TENANT_B)).scalars())


def b_samplers(api: Api) -> list[str]:
    with api.db.read() as s:
        return sorted(s.execute(select(Sampler.sampler_id).where(Sampler.tenant == TENANT_B)).scalars())


# Fixture


@pytest.fixture
def w(api: Api) -> World:
    session_a = api.session()
    r = api.create_model(session_a)
    assert r.status_code == 200, r.text
    model_a = r.json()["model_id"]
    created = api.post("/api/v1/create_sampling_session", _sampling_session(session_a, base_model=BASE_MODEL))
    assert created.status_code == 200, created.text
    sampler_a = created.json()["sampling_session_id"]
    ckpt_a = record_checkpoint(api, model_a, "a-ckpt")
    sampler_ckpt_a = record_checkpoint(api, model_a, "a-sampler", kind="sampler")
    _write_files(api, ckpt_a)
    _write_files(api, sampler_ckpt_a)
    future_a = api.accepted(api.post_proto(fb_body(model_a, 1)))
    session_b = api.session(key=KEY_B)
    r = api.create_model(session_b, key=KEY_B)
    assert r.status_code == 200, r.text
    model_b = r.json()["model_id"]
    ckpt_b = record_checkpoint(api, model_b, "b-ckpt")
    return World(
        session_a=session_a,
        model_a=model_a,
        sampler_a=sampler_a,
        ckpt_a=ckpt_a,
        sampler_ckpt_a=sampler_ckpt_a,
        future_a=future_a,
        session_b=session_b,
        model_b=model_b,
        ckpt_b=ckpt_b,
        unknown_session=_new_session_id(),
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
            "/api/v1/create_sampling_session", _sampling_session(sid, base_model=BASE_MODEL), key=KEY_B
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
        foreign = api.post("/api/v1/load_weights", _legacy_load(w.model_a, path, seq=2), key=KEY_B)
        unknown = api.post(
            "/api/v1/load_weights", _legacy_load(w.unknown_model, w.unknown_path(path), seq=2), key=KEY_B
        )
        assert_like_unknown(foreign, unknown, w.session_a, w.unknown_session)
    assert a_state(api, w) == before
    api.queued(api.accepted(api.post("/api/v1/load_weights", _legacy_load(w.model_a, w.ckpt_a, seq=2))))


def test_load_weights_legacy_from_foreign_checkpoint(api: Api, w: World) -> None:
    """Into B's own run: A's checkpoint fails the future exactly like a checkpoint that does not
    exist (the legacy form reports a bad path as a failed future, tests/api/test_load_weights.py)."""
    before = a_state(api, w)
    foreign = api.failed_future(
        api.accepted(api.post("/api/v1/load_weights", _legacy_load(w.model_b, w.ckpt_a, seq=1), key=KEY_B)), key=KEY_B
    )
    unknown = api.failed_future(
        api.accepted(
            api.post("/api/v1/load_weights", _legacy_load(w.model_b, w.unknown_path(w.ckpt_a), seq=2), key=KEY_B)
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
        foreign = api.post("/api/v1/load_weights", _create_via_load(session_b, path), key=KEY_B)
        unknown = api.post("/api/v1/load_weights", _create_via_load(session_b, w.unknown_path(path)), key=KEY_B)
        assert_like_unknown(foreign, unknown, w.session_a, w.unknown_session)
    assert b_runs(api) == runs_b
    assert api.get(f"/api/v1/sessions/{session_b}", key=KEY_B).json()["training_run_ids"] == []
    # B's own checkpoint into A's session: 404 like an unknown session; no run in A's session.
    foreign = api.post(
        "/api/v1/load_weights", {**_create_via_load(w.session_a, w.ckpt_b), "model_seq_id": 5}, key=KEY_B
    )
    unknown = api.post(
        "/api/v1/load_weights", {**_create_via_load(w.unknown_session, w.ckpt_b), "model_seq_id": 5}, key=KEY_B
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


# Sampling


def test_create_sampling_session_from_foreign_checkpoint(api: Api, w: World) -> None:
    before = a_state(api, w)
    samplers_b = b_samplers(api)
    for path in (w.sampler_ckpt_a, w.ckpt_a):
        foreign = api.post(
            "/api/v1/create_sampling_session", _sampling_session(w.session_b, model_path=path), key=KEY_B
        )
        unknown = api.post(
            "/api/v1/create_sampling_session",
            _sampling_session(w.session_b, model_path=w.unknown_path(path)),
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
                "/api/v1/create_sampling_session", _sampling_session(w.session_a, seq, **extra), key=KEY_B
            )
            unknown = api.post(
                "/api/v1/create_sampling_session", _sampling_session(w.unknown_session, seq, **extra), key=KEY_B
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
    foreign = api.post("/api/v1/asample", _sample_body(w.sampler_a), key=KEY_B)
    unknown = api.post("/api/v1/asample", _sample_body(w.unknown_sampler), key=KEY_B)
    assert_like_unknown(foreign, unknown, w.session_a, w.unknown_session)
    assert a_state(api, w) == before  # no sample op on A's sampler
    api.queued(api.accepted(api.post("/api/v1/asample", _sample_body(w.sampler_a))))


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
    _publish(api, w.ckpt_a)  # even a published checkpoint of A's is not in B's own listing
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
        foreign = _delete(api, path, key=KEY_B)
        unknown = _delete(api, w.unknown_path(path), key=KEY_B)
        assert_like_unknown(foreign, unknown, w.session_a, w.unknown_session)
    assert a_state(api, w) == before  # A's rows and files remain
    # The owner's delete works (the 404 above was not a broken route).
    assert _delete(api, w.ckpt_a, key=KEY_A).status_code == 200
    with api.db.read() as s:
        assert _checkpoint_row(s, w.ckpt_a) is None


# Published checkpoints


def test_published_checkpoint_is_readable_by_b(api: Api, w: World) -> None:
    _publish(api, w.ckpt_a)
    _publish(api, w.sampler_ckpt_a)
    before = a_state(api, w)
    info = api.post("/api/v1/weights_info", {"tinker_path": w.ckpt_a}, key=KEY_B)
    assert info.status_code == 200, info.text
    assert info.json()["base_model"] == BASE_MODEL and info.json()["lora_rank"] == 8
    sampler = api.post(
        "/api/v1/create_sampling_session", _sampling_session(w.session_b, model_path=w.sampler_ckpt_a), key=KEY_B
    )
    assert sampler.status_code == 200, sampler.text
    assert sampler.json()["sampling_session_id"].startswith(w.session_b)
    # load_weights from it: into B's run (legacy form) and as a new run in B's session.
    api.queued(api.accepted(api.post("/api/v1/load_weights", _legacy_load(w.model_b, w.ckpt_a), key=KEY_B)))
    session_b = api.session(key=KEY_B)
    created = api.post("/api/v1/load_weights", _create_via_load(session_b, w.ckpt_a), key=KEY_B)
    api.queued(api.accepted(created))
    assert created.json()["model_id"] == f"{session_b}:train:0"
    # Everything B made is B's; A's objects are as they were, and A's run stays hidden.
    with api.db.read() as s:
        assert s.get(Run, f"{session_b}:train:0").tenant == TENANT_B  # type: ignore[union-attr]
    assert a_state(api, w) == before
    assert_error(api.get(f"/api/v1/training_runs/{w.model_a}", key=KEY_B), 404, error="not_found")
    assert_error(api.get(f"/api/v1/training_runs/{w.model_a}/checkpoints", key=KEY_B), 404, error="not_found")


def test_published_checkpoint_is_not_deletable_by_b(api: Api, w: World) -> None:
    _publish(api, w.ckpt_a)
    _publish(api, w.sampler_ckpt_a)
    before = a_state(api, w)
    for path in (w.ckpt_a, w.sampler_ckpt_a):
        assert api.post("/api/v1/weights_info", {"tinker_path": path}, key=KEY_B).status_code == 200
        foreign = _delete(api, path, key=KEY_B)
        unknown = _delete(api, w.unknown_path(path), key=KEY_B)
        assert_like_unknown(foreign, unknown, w.session_a, w.unknown_session)
    assert a_state(api, w) == before  # rows (still public) and files remain
    assert api.post("/api/v1/weights_info", {"tinker_path": w.ckpt_a}, key=KEY_B).status_code == 200
    assert _delete(api, w.ckpt_a, key=KEY_A).status_code == 200
