"""The shared world of the tenant-isolation tests (test_isolation_endpoints.py,
test_isolation_training.py): tenant A's session, run, sampler, checkpoints and pending future, a
tenant B with its own run, and the checks every test makes: B naming A's object gets exactly the
answer an unknown id of the same form gets, and A's objects are unchanged afterwards."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import or_, select, update

from app.db.models import Checkpoint, Op, Run, Sampler, Session
from tests.api.helpers import (
    BASE_MODEL,
    KEY_B,
    TENANT_B,
    Api,
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


def new_session_id() -> str:
    return f"s-{uuid.uuid4().hex[:16]}"


def write_files(api: Api, path: str) -> None:
    """The files a worker would have written for the checkpoint at `path`."""
    with api.db.read() as s:
        row = checkpoint_row(s, path)
        assert row is not None
        folder = api.settings.resolved_checkpoint_dir() / row.storage_path
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    (folder / "adapter_config.json").write_text("{}")


def checkpoint_row(s: Any, path: str) -> Checkpoint | None:
    run_id, segment, name = path.removeprefix("tinker://").split("/")
    kind = "training" if segment == "weights" else "sampler"
    return s.execute(
        select(Checkpoint).where(Checkpoint.run_id == run_id, Checkpoint.kind == kind, Checkpoint.name == name)
    ).scalar_one_or_none()


def publish(api: Api, path: str) -> None:
    with api.db.write() as s:
        row = checkpoint_row(s, path)
        assert row is not None
        s.execute(update(Checkpoint).where(Checkpoint.id == row.id).values(public=True))


def sample_body(sampler_id: str, seq: int = 0) -> dict[str, Any]:
    return {
        "sampling_session_id": sampler_id,
        "seq_id": seq,
        "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
        "sampling_params": {"max_tokens": 4},
        "type": "sample",
    }


def legacy_load(model_id: str, path: str, seq: int = 1) -> dict[str, Any]:
    return {"model_id": model_id, "seq_id": seq, "path": path, "optimizer": False, "type": "load_weights"}


def create_via_load(session_id: str, path: str) -> dict[str, Any]:
    return {"session_id": session_id, "model_seq_id": 0, "path": path, "optimizer": False, "type": "load_weights"}


def sampling_session(session_id: str, seq: int = 0, **extra: Any) -> dict[str, Any]:
    return {"session_id": session_id, "sampling_session_seq_id": seq, "type": "create_sampling_session", **extra}


def delete(api: Api, path: str, *, key: str) -> Any:
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


@pytest.fixture(name="w")
def w_fixture(api: Api) -> World:
    """A's and B's objects; imported by the test modules, which take it as `w`."""
    session_a = api.session()
    r = api.create_model(session_a)
    assert r.status_code == 200, r.text
    model_a = r.json()["model_id"]
    created = api.post("/api/v1/create_sampling_session", sampling_session(session_a, base_model=BASE_MODEL))
    assert created.status_code == 200, created.text
    sampler_a = created.json()["sampling_session_id"]
    ckpt_a = record_checkpoint(api, model_a, "a-ckpt")
    sampler_ckpt_a = record_checkpoint(api, model_a, "a-sampler", kind="sampler")
    write_files(api, ckpt_a)
    write_files(api, sampler_ckpt_a)
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
        unknown_session=new_session_id(),
    )
