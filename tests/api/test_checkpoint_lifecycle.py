"""Checkpoint lifecycle over REST (docs/checkpoints.md), on SQLite and PostgreSQL: TTL, expiry by
the sweeper, publish/unpublish, copy_weights, and the listings (pagination, user_metadata,
expires_at, external checkpoints hidden from old SDKs).

No worker runs here: checkpoints are recorded as a worker records them, with their files written
where a worker writes them, so the files' fate can be checked too.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update
from tinker import types

from app.checkpoint_store import new_storage_path
from app.db.engine import db_now
from app.db.models import Checkpoint, Run, Session
from app.queue import checkpoints
from app.queue.checkpoints import MAX_TTL_SECONDS
from app.queue.sweeper import sweep
from app.sweeper import remove_checkpoint_files
from tests.api.helpers import BASE_MODEL, KEY_A, KEY_B, TENANT_B, Api, assert_error, fb_body

SEGMENT = {"training": "weights", "sampler": "sampler_weights", "external": "external_weights"}
OLD_SDK = {"User-Agent": "AsyncTinker/Python 0.25.0", "X-Stainless-Package-Version": "0.25.0"}
NEW_SDK = {"User-Agent": "AsyncTinker/Python 0.38.0", "x-sdk-version": "0.38.0"}


# helpers


def make(
    api: Api,
    model_id: str,
    name: str,
    *,
    kind: str = "training",
    ttl: int | None = None,
    metadata: dict[str, str] | None = None,
) -> str:
    """Record a checkpoint and write its files as a worker would; returns its tinker:// path."""
    request_id = f"req-test-{uuid.uuid4().hex[:8]}"
    with api.db.write() as s:
        run = s.get(Run, model_id)
        assert run is not None
        row = checkpoints.record(
            s,
            tenant=run.tenant,
            run_id=model_id,
            kind=kind,
            name=name,
            storage_path=new_storage_path(model_id, kind, name, request_id),
            base_model=run.base_model,
            lora_config=dict(run.lora_config),
            with_optimizer=kind == "training",
            ephemeral=False,
            size_bytes=7,
            user_metadata=metadata,
            ttl_seconds=ttl,
            request_id=request_id,
            overwrite=False,
        )
        folder = api.settings.resolved_checkpoint_dir() / row.storage_path
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    (folder / "manifest.json").write_text(json.dumps({"tinker_path": "src", "format": "peft-lora"}))
    return f"tinker://{model_id}/{SEGMENT[kind]}/{name}"


def row(api: Api, path: str) -> Checkpoint | None:
    run_id, segment, name = path.removeprefix("tinker://").split("/")
    kind = {v: k for k, v in SEGMENT.items()}[segment]
    with api.db.read() as s:
        return checkpoints.find(s, run_id, kind, name, expired=True)


def folder(api: Api, path: str) -> Path:
    """The checkpoint's files: its row's folder; once the row is gone, the name's folder, which
    must be gone too (every save has its own folder under `<run>/<kind>/<name>/`)."""
    found = row(api, path)
    if found is not None:
        return api.settings.resolved_checkpoint_dir() / found.storage_path
    run_id, segment, name = path.removeprefix("tinker://").split("/")
    kind = {v: k for k, v in SEGMENT.items()}[segment]
    return api.settings.resolved_checkpoint_dir() / run_id.replace(":", "_") / kind / name


def url(path: str, suffix: str = "") -> str:
    run_id, checkpoint_id = path.removeprefix("tinker://").split("/", 1)
    return f"/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id}{suffix}"


def call(api: Api, method: str, target: str, body: Any = None, *, key: str = KEY_A, raw: bytes | None = None) -> Any:
    headers = {"X-API-Key": key}
    content = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    if content is not None:
        headers["Content-Type"] = "application/json"
    return api.client.request(method, target, content=content, headers=headers)


def set_ttl(api: Api, path: str, ttl: Any, *, key: str = KEY_A) -> httpx.Response:
    return call(api, "PUT", url(path, "/ttl"), {"ttl_seconds": ttl}, key=key)


def listed(api: Api, path: str, *, key: str = KEY_A, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """The run's listing, checked against the SDK's own response model."""
    run_id = path.removeprefix("tinker://").split("/")[0]
    r = api.client.get(f"/api/v1/training_runs/{run_id}/checkpoints", headers={"X-API-Key": key, **(headers or {})})
    assert r.status_code == 200, r.text
    types.CheckpointsListResponse.model_validate(r.json())
    body: dict[str, Any] = r.json()
    return body


def entry(api: Api, path: str) -> dict[str, Any] | None:
    return next((c for c in listed(api, path)["checkpoints"] if c["tinker_path"] == path), None)


def expire_now(api: Api, path: str) -> None:
    target = row(api, path)
    assert target is not None
    with api.db.write() as s:
        s.execute(update(Checkpoint).where(Checkpoint.id == target.id).values(expires_at=db_now(s) - 1))


def same_404(foreign: httpx.Response, unknown: httpx.Response, foreign_id: str, unknown_id: str) -> None:
    """Another tenant's checkpoint answers exactly as one that does not exist."""
    f = assert_error(foreign, 404, error="not_found")
    u = assert_error(unknown, 404, error="not_found")
    assert f["message"].replace(foreign_id, "<id>") == u["message"].replace(unknown_id, "<id>"), (f, u)


def copy(api: Api, source: str, *, key: str = KEY_A, idem: str | None = None, **body: Any) -> httpx.Response:
    headers = {"X-API-Key": key, "Content-Type": "application/json"}
    if idem is not None:
        headers["X-Idempotency-Key"] = idem
    payload = {"source_path": source, "destination_project_id": "proj", **body}
    return api.client.post("/api/v1/copy_weights", content=json.dumps(payload).encode(), headers=headers)


# TTL


def test_ttl_given_at_save_time_is_the_expiry(api: Api) -> None:
    model = api.model()
    path = make(api, model, "saved-with-ttl", ttl=3600, metadata={"step": "3"})
    r = row(api, path)
    assert r is not None and r.expires_at is not None
    assert r.expires_at == pytest.approx(r.created_at + 3600)
    shown = entry(api, path)
    assert shown is not None
    assert shown["user_metadata"] == {"step": "3"}
    parsed = types.Checkpoint.model_validate(shown)
    assert parsed.expires_at is not None and parsed.expires_at.timestamp() == pytest.approx(r.expires_at, abs=1e-3)


def test_set_and_clear_ttl(api: Api) -> None:
    model = api.model()
    path = make(api, model, "ttl-me")
    assert entry(api, path)["expires_at"] is None  # type: ignore[index]
    with api.db.read() as s:
        before = db_now(s)
    r = set_ttl(api, path, 7200)
    assert r.status_code == 200, r.text
    expires = row(api, path).expires_at  # type: ignore[union-attr]
    assert expires is not None and before + 7200 <= expires <= before + 7200 + 60
    assert types.Checkpoint.model_validate(entry(api, path)).expires_at is not None
    # A new TTL counts from now again; null removes the expiry.
    assert set_ttl(api, path, 60).status_code == 200
    assert row(api, path).expires_at < expires  # type: ignore[operator,union-attr]
    assert set_ttl(api, path, None).status_code == 200
    assert row(api, path).expires_at is None  # type: ignore[union-attr]
    assert entry(api, path)["expires_at"] is None  # type: ignore[index]


BAD_TTL_BODIES: dict[str, bytes] = {
    "not_json": b"{ttl_seconds: 5",
    "array": b"[3600]",
    "missing_key": b"{}",
    "string": b'{"ttl_seconds": "3600"}',
    "float": b'{"ttl_seconds": 3600.5}',
    "bool": b'{"ttl_seconds": true}',
    "zero": b'{"ttl_seconds": 0}',
    "negative": b'{"ttl_seconds": -5}',
    "over_ten_years": json.dumps({"ttl_seconds": MAX_TTL_SECONDS + 1}).encode(),
    "huge": b'{"ttl_seconds": 99999999999999999999999}',
}


@pytest.mark.parametrize("case", sorted(BAD_TTL_BODIES))
def test_malformed_ttl_is_400_and_changes_nothing(api: Api, case: str) -> None:
    model = api.model()
    path = make(api, model, "keep-ttl", ttl=3600)
    expires = row(api, path).expires_at  # type: ignore[union-attr]
    body = assert_error(call(api, "PUT", url(path, "/ttl"), raw=BAD_TTL_BODIES[case]), 400)
    assert body["category"] == "user"
    assert row(api, path).expires_at == expires  # type: ignore[union-attr]


def test_ttl_of_a_missing_checkpoint(api: Api) -> None:
    model = api.model()
    make(api, model, "exists")
    assert_error(set_ttl(api, f"tinker://{model}/weights/nope", 3600), 404, error="not_found", contains="not found")
    assert_error(set_ttl(api, f"tinker://{model}/sampler_weights/exists", 3600), 404, error="not_found")
    assert_error(set_ttl(api, "tinker://s-0000000000000000:train:0/weights/exists", 3600), 404, error="not_found")
    # A malformed checkpoint id is a 400, not a 404.
    assert_error(set_ttl(api, f"tinker://{model}/bogus/exists", 3600), 400, contains="checkpoint id")
    assert_error(set_ttl(api, f"tinker://{model}/weights/bad name!", 3600), 400, contains="name")


# Expiry


def test_an_expired_name_can_be_saved_again(api: Api) -> None:
    """Workers look checkpoints up with find(), which no longer sees an expired one (so sampling
    from it stops too); a new save under its name replaces it without overwrite=True."""
    model = api.model()
    path = make(api, model, "reused", ttl=3600)
    expire_now(api, path)
    run_id, _, name = path.removeprefix("tinker://").split("/")
    with api.db.read() as s:
        assert checkpoints.find(s, run_id, "training", name) is None
    make(api, model, "reused")
    fresh = row(api, path)
    assert fresh is not None and fresh.expires_at is None
    assert [c["tinker_path"] for c in listed(api, path)["checkpoints"]] == [path]


def test_sweeper_deletes_expired_rows_and_files(api: Api) -> None:
    model = api.model()
    keep = make(api, model, "survivor", ttl=3600)
    short = make(api, model, "short-lived")
    published = make(api, model, "published-expiring")
    assert call(api, "POST", url(published, "/publish")).status_code == 200
    assert set_ttl(api, short, 1).status_code == 200
    expire_now(api, published)  # a TTL applies to published checkpoints too
    deadline = time.monotonic() + 10
    while True:  # wait for the 1 s TTL by the database clock
        with api.db.read() as s:
            r = row(api, short)
            if r is None or r.expires_at < db_now(s):  # type: ignore[operator]
                break
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # The app's own sweeper may get there first; either way the outcome is the same.
    with api.db.write() as s:
        report = sweep(s, lease_ttl=api.settings.lease_ttl_seconds, result_retention=0)
    remove_checkpoint_files(api.db, api.settings.resolved_checkpoint_dir(), report.expired_checkpoints)
    for path in (short, published):
        assert row(api, path) is None
        assert not folder(api, path).exists()
        assert_error(api.post("/api/v1/weights_info", {"tinker_path": path}), 404)
    assert row(api, keep) is not None and (folder(api, keep) / "adapter_model.safetensors").exists()
    assert [c["tinker_path"] for c in listed(api, keep)["checkpoints"]] == [keep]


# Publish / unpublish


def test_publish_makes_it_readable_by_others_and_unpublish_takes_it_back(api: Api) -> None:
    model = api.model()
    path = make(api, model, "to-share")
    sampler_path = make(api, model, "to-share-sampler", kind="sampler")
    assert_error(api.post("/api/v1/weights_info", {"tinker_path": path}, key=KEY_B), 404)
    for target in (path, sampler_path):
        assert call(api, "POST", url(target, "/publish")).status_code == 200
        assert call(api, "POST", url(target, "/publish")).status_code == 200  # idempotent
        assert entry(api, target)["public"] is True  # type: ignore[index]
    info = api.post("/api/v1/weights_info", {"tinker_path": path}, key=KEY_B)
    assert info.status_code == 200 and info.json()["base_model"] == BASE_MODEL
    session_b = api.session(key=KEY_B)
    sampling = {"session_id": session_b, "sampling_session_seq_id": 0, "model_path": sampler_path}
    created = api.post("/api/v1/create_sampling_session", sampling, key=KEY_B)
    assert created.status_code == 200, created.text
    load = {"session_id": session_b, "model_seq_id": 0, "path": path, "optimizer": False, "type": "load_weights"}
    loaded = api.post("/api/v1/load_weights", load, key=KEY_B)
    assert loaded.status_code == 200 and loaded.json()["model_id"] == f"{session_b}:train:0"
    # The run itself stays private.
    assert_error(api.get(f"/api/v1/training_runs/{model}/checkpoints", key=KEY_B), 404)
    assert call(api, "DELETE", url(path, "/publish")).status_code == 200
    assert entry(api, path)["public"] is False  # type: ignore[index]
    assert_error(api.post("/api/v1/weights_info", {"tinker_path": path}, key=KEY_B), 404, error="not_found")
    assert call(api, "DELETE", url(path, "/publish")).status_code == 200  # idempotent too
    assert row(api, path) is not None  # DELETE …/publish is unpublish, never the checkpoint's DELETE


def test_publish_errors(api: Api) -> None:
    model = api.model()
    assert_error(call(api, "POST", f"/api/v1/training_runs/{model}/checkpoints/weights/nope/publish"), 404)
    assert_error(call(api, "DELETE", f"/api/v1/training_runs/{model}/checkpoints/weights/nope/publish"), 404)
    assert_error(call(api, "POST", f"/api/v1/training_runs/{model}/checkpoints/nope/x/publish"), 400)
    assert_error(call(api, "POST", f"/api/v1/training_runs/{model}/checkpoints/weights/x/publish", key="tml-bad"), 401)


@pytest.mark.parametrize("published", [False, True], ids=["private", "published"])
def test_another_tenant_can_change_nothing(api: Api, published: bool) -> None:
    """Delete, TTL, publish and unpublish of A's checkpoint by B: the 404 of an unknown checkpoint,
    published or not, and A's row and files are untouched."""
    model = api.model()
    path = make(api, model, "a-owned", ttl=3600)
    if published:
        assert call(api, "POST", url(path, "/publish")).status_code == 200
    before = row(api, path)
    session = model.split(":")[0]
    unknown_session = f"s-{uuid.uuid4().hex[:16]}"
    unknown = path.replace(session, unknown_session)
    for method, suffix, body in (
        ("DELETE", "", None),
        ("PUT", "/ttl", {"ttl_seconds": None}),
        ("POST", "/publish", None),
        ("DELETE", "/publish", None),
    ):
        foreign = call(api, method, url(path, suffix), body, key=KEY_B)
        same_404(foreign, call(api, method, url(unknown, suffix), body, key=KEY_B), session, unknown_session)
    after = row(api, path)
    assert after is not None and before is not None
    assert (after.public, after.expires_at, after.tenant) == (published, before.expires_at, before.tenant)
    assert (folder(api, path) / "adapter_model.safetensors").exists()
    if published:  # still readable by B
        assert api.post("/api/v1/weights_info", {"tinker_path": path}, key=KEY_B).status_code == 200


def test_owner_delete_removes_row_then_files(api: Api) -> None:
    model = api.model()
    path = make(api, model, "delete-me")
    assert call(api, "DELETE", url(path)).status_code == 200
    assert row(api, path) is None and not folder(api, path).exists()
    assert_error(call(api, "DELETE", url(path)), 404)
    assert_error(call(api, "DELETE", f"/api/v1/training_runs/{model}/checkpoints/bogus/delete-me"), 400)


# copy_weights


def test_copy_own_checkpoint(api: Api) -> None:
    model = api.model()
    source = make(api, model, "original", metadata={"k": "v"})
    key = str(uuid.uuid4())
    r = copy(api, source, idem=key, ttl_seconds=7200)
    assert r.status_code == 200, r.text
    dest = types.CopyWeightsResponse.model_validate(r.json()).tinker_path
    parsed = types.ParsedCheckpointTinkerPath.from_tinker_path(dest)
    assert parsed.checkpoint_id == "weights/original" and parsed.training_run_id != model
    # A retry with the same key is the same copy; another key is another copy.
    assert copy(api, source, idem=key, ttl_seconds=7200).json()["tinker_path"] == dest
    other = copy(api, source, idem=str(uuid.uuid4())).json()["tinker_path"]
    assert other != dest
    with api.db.read() as s:
        copies = s.execute(select(Checkpoint).where(Checkpoint.created_by_op.like("copy:%"))).scalars().all()
        assert sum(c.run_id == parsed.training_run_id for c in copies) == 1
        run = s.get(Run, parsed.training_run_id)
        assert run is not None and run.tenant == "default" and run.status == "cancelled"
        session = s.get(Session, run.session_id)
        assert session is not None and session.tenant == "default" and session.finished_at is not None
        assert session.user_metadata == {"copied_from": source, "project_id": "proj"}
    # Files: a real copy, its manifest naming the copy and its source; the source is untouched.
    assert (folder(api, dest) / "adapter_model.safetensors").read_bytes() == b"weights"
    manifest = json.loads((folder(api, dest) / "manifest.json").read_text())
    assert (manifest["tinker_path"], manifest["copied_from"], manifest["format"]) == (dest, source, "peft-lora")
    assert json.loads((folder(api, source) / "manifest.json").read_text())["tinker_path"] == "src"
    assert not [p for p in folder(api, dest).parent.iterdir() if p.name.startswith(".")]  # no temp folders left
    shown = entry(api, dest)
    assert shown is not None and shown["user_metadata"] == {"k": "v"} and shown["public"] is False
    assert shown["expires_at"] is not None and entry(api, other)["expires_at"] is None  # type: ignore[index]
    # The copy is readable like any checkpoint, and its run cannot be trained: it lives in a
    # finished session of its own, which takes no new ops.
    assert api.post("/api/v1/weights_info", {"tinker_path": dest}).json()["lora_rank"] == 8
    assert_error(api.post_proto(fb_body(parsed.training_run_id, 1)), 410, error="session_finished")
    # Deleting the source leaves the copy whole.
    assert call(api, "DELETE", url(source)).status_code == 200
    assert (folder(api, dest) / "adapter_model.safetensors").exists()
    assert api.post("/api/v1/weights_info", {"tinker_path": dest}).status_code == 200


def test_copy_into_a_session_slot(api: Api) -> None:
    model = api.model()
    source = make(api, model, "slot-src", kind="sampler")
    session = api.session()
    key = str(uuid.uuid4())
    r = copy(api, source, idem=key, session_id=session, model_seq_id=5)
    assert r.status_code == 200, r.text
    assert r.json()["tinker_path"] == f"tinker://{session}:train:5/sampler_weights/slot-src"
    assert copy(api, source, idem=key, session_id=session, model_seq_id=5).json() == r.json()
    # In the caller's live session the copy's run is cancelled: an op on it fails, saying so.
    run_id = f"{session}:train:5"
    assert "cancelled" in api.failed_future(api.accepted(api.post_proto(fb_body(run_id, 1))))
    # The slot is taken now: another copy there is refused (400, not a retried 409).
    assert_error(copy(api, source, idem=str(uuid.uuid4()), session_id=session, model_seq_id=5), 400, contains="5")
    # A slot of a run that exists already, and half a slot, are refused too.
    assert_error(copy(api, source, session_id=model.split(":")[0], model_seq_id=0), 400, contains="already")
    assert_error(copy(api, source, session_id=session), 400, contains="together")
    assert_error(copy(api, source, session_id=session, model_seq_id=-1), 400)
    # Another tenant's session: the 404 of an unknown session.
    session_b = api.session(key=KEY_B)
    assert_error(copy(api, source, session_id=session_b, model_seq_id=0), 404, contains="session")


def test_copy_across_tenants_needs_a_published_source(api: Api) -> None:
    model = api.model()
    source = make(api, model, "shared-src")
    key = str(uuid.uuid4())
    assert_error(copy(api, source, key=KEY_B, idem=key), 404, error="not_found")
    assert call(api, "POST", url(source, "/publish")).status_code == 200
    # The same key as A's own copy below: keys are per tenant.
    r = copy(api, source, key=KEY_B, idem=key)
    assert r.status_code == 200, r.text
    dest_b = r.json()["tinker_path"]
    dest_a = copy(api, source, idem=key).json()["tinker_path"]
    assert dest_a != dest_b
    b_row = row(api, dest_b)
    assert b_row is not None and b_row.tenant == TENANT_B and b_row.public is False
    b_paths = {c["tinker_path"] for c in api.get("/api/v1/checkpoints?limit=1000", key=KEY_B).json()["checkpoints"]}
    a_paths = {c["tinker_path"] for c in api.get("/api/v1/checkpoints?limit=1000").json()["checkpoints"]}
    assert dest_b in b_paths and dest_b not in a_paths and dest_a in a_paths
    # B owns its copy: B may delete it, and A may not.
    assert_error(call(api, "DELETE", url(dest_b)), 404)
    assert call(api, "DELETE", url(dest_b), key=KEY_B).status_code == 200
    assert row(api, dest_b) is None and not folder(api, dest_b).exists()


def test_copy_errors(api: Api) -> None:
    model = api.model()
    source = make(api, model, "err-src")
    assert_error(copy(api, f"tinker://{model}/weights/missing"), 404, error="not_found")
    assert_error(copy(api, "tinker://s-0000000000000000:train:0/weights/x"), 404, error="not_found")
    assert_error(copy(api, "not-a-tinker-path"), 400, contains="tinker://")
    assert_error(copy(api, f"tinker://{model}/weights"), 400)
    assert_error(copy(api, source, ttl_seconds=0), 400, contains="ttl_seconds")
    assert_error(copy(api, source, ttl_seconds="1h"), 400, contains="ttl_seconds")
    assert_error(api.post("/api/v1/copy_weights", {"destination_project_id": "p"}), 400, contains="source_path")
    # A row whose files are gone is a server-side fault, reported as such, and no copy is made.
    broken = make(api, model, "files-gone")
    for p in folder(api, broken).iterdir():
        p.unlink()
    folder(api, broken).rmdir()
    assert_error(copy(api, broken), 500, contains="missing")


# Listings


def test_run_listing_pagination(api: Api) -> None:
    model = api.model()
    paths = [make(api, model, f"page-{i}") for i in range(5)]
    newest_first = paths[::-1]
    everything = listed(api, paths[0])
    assert [c["tinker_path"] for c in everything["checkpoints"]] == newest_first
    assert everything["cursor"] == {"offset": 0, "limit": 5, "total_count": 5}
    base = f"/api/v1/training_runs/{model}/checkpoints"
    seen = []
    for offset in (0, 2, 4):
        page = api.get(f"{base}?limit=2&offset={offset}").json()
        assert page["cursor"] == {"offset": offset, "limit": 2, "total_count": 5}
        seen += [c["tinker_path"] for c in page["checkpoints"]]
    assert seen == newest_first
    past_end = api.get(f"{base}?limit=2&offset=5").json()
    assert past_end["checkpoints"] == [] and past_end["cursor"]["total_count"] == 5
    assert api.get(f"{base}?limit=5000").json()["cursor"]["limit"] == 1000
    for query in ("limit=0", "limit=-1", "offset=-1", "limit=abc", "offset=1.5"):
        assert_error(api.get(f"{base}?{query}"), 400)


def test_user_listing_pagination(api: Api) -> None:
    model = api.model()
    for i in range(3):
        make(api, model, f"user-page-{i}", metadata={"i": str(i)})
    full = api.get("/api/v1/checkpoints?limit=1000").json()
    total = full["cursor"]["total_count"]
    assert total == len(full["checkpoints"]) >= 3
    times = [types.Checkpoint.model_validate(c).time for c in full["checkpoints"]]
    assert times == sorted(times, reverse=True)
    assert [c["user_metadata"] for c in full["checkpoints"][:3]] == [{"i": "2"}, {"i": "1"}, {"i": "0"}]
    pages: list[str] = []
    offset = 0
    while offset < total:
        page = api.get(f"/api/v1/checkpoints?limit=2&offset={offset}").json()
        assert page["cursor"] == {"offset": offset, "limit": 2, "total_count": total}
        pages += [c["tinker_path"] for c in page["checkpoints"]]
        offset += 2
    assert pages == [c["tinker_path"] for c in full["checkpoints"]]
    default = api.get("/api/v1/checkpoints").json()["cursor"]
    assert (default["offset"], default["limit"]) == (0, 100)
    assert api.get("/api/v1/checkpoints?offset=99999999999999999999").json()["checkpoints"] == []
    for query in ("limit=0", "offset=-3", "limit=x"):
        assert_error(api.get(f"/api/v1/checkpoints?{query}"), 400)


def test_external_checkpoints_are_hidden_from_old_sdks(api: Api) -> None:
    model = api.model()
    training = make(api, model, "ext-neighbour")
    external = make(api, model, "exported", kind="external")
    new = listed(api, training, headers=NEW_SDK)
    shown = {c["tinker_path"]: c for c in new["checkpoints"]}
    assert set(shown) == {training, external} and new["cursor"]["total_count"] == 2
    assert (shown[external]["checkpoint_id"], shown[external]["checkpoint_type"]) == (
        "external_weights/exported",
        "external",
    )
    assert external.endswith("/external_weights/exported")
    # 0.25 (User-Agent and Stainless headers, no x-sdk-version) would reject the whole listing.
    old = listed(api, training, headers=OLD_SDK)
    assert [c["tinker_path"] for c in old["checkpoints"]] == [training] and old["cursor"]["total_count"] == 1
    old_user = api.client.get("/api/v1/checkpoints?limit=1000", headers={"X-API-Key": KEY_A, **OLD_SDK}).json()
    assert all(c["checkpoint_type"] != "external" for c in old_user["checkpoints"])
    assert old_user["cursor"]["total_count"] == len(old_user["checkpoints"])
    new_user = api.client.get("/api/v1/checkpoints?limit=1000", headers={"X-API-Key": KEY_A, **NEW_SDK}).json()
    assert external in {c["tinker_path"] for c in new_user["checkpoints"]}
    # Lifecycle routes take the external segment like the others.
    assert set_ttl(api, external, 3600).status_code == 200
    assert call(api, "POST", url(external, "/publish")).status_code == 200
    assert call(api, "DELETE", url(external)).status_code == 200
    assert row(api, external) is None


# The sweeper's database part on its own (no app running, so no other sweeper races it)


def test_expire_checkpoints_deletes_only_expired_rows_and_keeps_reused_folders(db: Any, tmp_path: Path) -> None:
    from app.domain.ops import LoraConfig
    from app.queue import submit

    with db.write() as s:
        session_id = submit.create_session(s, "t", sdk_version=None, tags=[], user_metadata={}, display_name=None)
        run = submit.create_run(
            s, "t", session_id=session_id, model_seq_id=0, base_model="m", lora=LoraConfig(rank=2), user_metadata={}
        )
        run_id = run.run_id

    def rec(name: str, ttl: int | None, request_id: str) -> str:
        with db.write() as s:
            r = checkpoints.record(
                s,
                tenant="t",
                run_id=run_id,
                kind="training",
                name=name,
                storage_path=new_storage_path(run_id, "training", name, request_id),
                base_model="m",
                lora_config={"rank": 2},
                with_optimizer=True,
                ephemeral=False,
                size_bytes=1,
                user_metadata=None,
                ttl_seconds=ttl,
                request_id=request_id,
                overwrite=False,
            )
            (tmp_path / r.storage_path).mkdir(parents=True, exist_ok=True)
            return r.storage_path

    old = rec("old", 3600, "r1")
    fresh = rec("fresh", 3600, "r2")
    with db.write() as s:
        s.execute(update(Checkpoint).where(Checkpoint.name == "old").values(expires_at=db_now(s) - 5))
    with db.write() as s:
        report = sweep(s, lease_ttl=15, result_retention=0)
    assert report.expired_checkpoints == [old]
    with db.read() as s:
        assert {c.name for c in s.execute(select(Checkpoint)).scalars()} == {"fresh"}
    # The name is saved anew before the files go: the new save has a folder of its own, so
    # removing the expired checkpoint's files cannot touch it.
    new = rec("old", None, "r3")
    assert new != old and new.rsplit("/", 1)[0] == old.rsplit("/", 1)[0]
    assert remove_checkpoint_files(db, tmp_path, [old]) == 1
    assert not (tmp_path / old).exists() and (tmp_path / new).is_dir() and (tmp_path / fresh).is_dir()
    with db.write() as s:
        assert sweep(s, lease_ttl=15, result_retention=0).expired_checkpoints == []
