"""Tenant isolation: another tenant's ids behave exactly like unknown ones, and listings are per
tenant."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from tinker import types

from tests.api.helpers import KEY_A, KEY_B, Api, adam, assert_error, fb_body, record_checkpoint


@dataclass
class World:
    session_a: str
    model_a: str
    sampler_a: str
    ckpt_a: str
    session_b: str
    model_b: str


@pytest.fixture
def world(api: Api) -> World:
    session_a = api.session()
    r = api.create_model(session_a)
    model_a = r.json()["model_id"]
    body = {"session_id": session_a, "sampling_session_seq_id": 0, "base_model": "tuft/tiny-qwen3"}
    sampler_a = api.post("/api/v1/create_sampling_session", body).json()["sampling_session_id"]
    ckpt_a = record_checkpoint(api, model_a, "a-ckpt")
    record_checkpoint(api, model_a, "a-sampler", kind="sampler")
    session_b = api.session(key=KEY_B)
    model_b = api.create_model(session_b, key=KEY_B).json()["model_id"]
    return World(session_a, model_a, sampler_a, ckpt_a, session_b, model_b)


def test_b_cannot_read_a(api: Api, world: World) -> None:
    for path in (
        f"/api/v1/training_runs/{world.model_a}",
        f"/api/v1/training_runs/{world.model_a}/checkpoints",
        f"/api/v1/sessions/{world.session_a}",
        f"/api/v1/samplers/{world.sampler_a}",
    ):
        assert api.get(path, key=KEY_A).status_code == 200, path
        assert_error(api.get(path, key=KEY_B), 404, error="not_found")
    assert_error(api.post("/api/v1/get_info", {"model_id": world.model_a}, key=KEY_B), 404)


def test_b_cannot_act_on_a(api: Api, world: World) -> None:
    assert_error(api.create_model(world.session_a, 1, key=KEY_B), 404)
    assert_error(api.post("/api/v1/session_heartbeat", {"session_id": world.session_a}, key=KEY_B), 404)
    assert_error(api.post(f"/api/v1/sessions/{world.session_a}/finish", {}, key=KEY_B), 404)
    assert_error(api.post_proto(fb_body(world.model_a, 1), key=KEY_B), 404)
    optim = {"model_id": world.model_a, "seq_id": 1, "adam_params": adam()}
    assert_error(api.post("/api/v1/optim_step", optim, key=KEY_B), 404)
    save = {"model_id": world.model_a, "seq_id": 1, "path": "x"}
    assert_error(api.post("/api/v1/save_weights", save, key=KEY_B), 404)
    checkpoint_id = world.ckpt_a.split("/", 3)[3]
    delete = api.client.delete(
        f"/api/v1/training_runs/{world.model_a}/checkpoints/{checkpoint_id}", headers={"X-API-Key": KEY_B}
    )
    assert_error(delete, 404)
    # A's objects are untouched: A's session is alive and A's run has no ops from B.
    assert api.post("/api/v1/session_heartbeat", {"session_id": world.session_a}).status_code == 200
    listed = api.get(f"/api/v1/training_runs/{world.model_a}/checkpoints").json()["checkpoints"]
    assert {c["checkpoint_id"] for c in listed} == {"weights/a-ckpt", "sampler_weights/a-sampler"}
    api.accepted(api.post_proto(fb_body(world.model_a, 1)))


def test_listings_are_per_tenant(api: Api, world: World) -> None:
    runs_b = types.TrainingRunsResponse.model_validate(api.get("/api/v1/training_runs?limit=1000", key=KEY_B).json())
    ids_b = {r.training_run_id for r in runs_b.training_runs}
    assert world.model_b in ids_b and world.model_a not in ids_b
    assert all(r.model_owner == "tenant-b" for r in runs_b.training_runs)
    assert runs_b.cursor.total_count == len(ids_b)

    runs_a = api.get("/api/v1/training_runs?limit=1000").json()
    ids_a = {r["training_run_id"] for r in runs_a["training_runs"]}
    assert world.model_a in ids_a and world.model_b not in ids_a

    sessions_b = api.get("/api/v1/sessions?limit=1000", key=KEY_B).json()["sessions"]
    assert world.session_b in sessions_b and world.session_a not in sessions_b

    ckpts_b = types.CheckpointsListResponse.model_validate(api.get("/api/v1/checkpoints", key=KEY_B).json())
    assert all(world.model_a not in c.tinker_path for c in ckpts_b.checkpoints)
    ckpts_a = api.get("/api/v1/checkpoints?limit=1000").json()["checkpoints"]
    assert world.ckpt_a in {c["tinker_path"] for c in ckpts_a}


def test_training_run_shape(api: Api, world: World) -> None:
    r = api.get(f"/api/v1/training_runs/{world.model_a}")
    run = types.TrainingRun.model_validate(r.json())
    assert run.training_run_id == world.model_a
    assert run.model_owner == "default"
    assert run.last_checkpoint is not None and run.last_checkpoint.tinker_path == world.ckpt_a
