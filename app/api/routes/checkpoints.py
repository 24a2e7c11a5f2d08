"""Checkpoint lifecycle over REST: TTL, publish/unpublish, and copy_weights (tinker-protocol.md
§5.2; docs/checkpoints.md). Listings and DELETE are in routes/rest.py.

Changes are the owner's alone: another tenant naming a checkpoint, published or not, gets the 404
an unknown checkpoint gets (tests/api/test_isolation_endpoints.py). Reading a published
checkpoint (weights_info, load_weights, sampling, copy_weights) is open to every tenant.
"""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from app.api.deps import State, Tenant, body_as
from app.api.routes.rest import SEGMENT, checkpoint_kind
from app.api.state import AppState
from app.checkpoint_store import CheckpointStore
from app.db.models import Checkpoint, Run
from app.domain.errors import InvalidInput, ServerError
from app.domain.ids import TinkerPath, parse_tinker_path, run_id_for
from app.queue import checkpoints, submit
from app.wire.json_models import CopyWeightsRequest, SetTtlRequest

router = APIRouter()

_CHECKPOINT = "/api/v1/training_runs/{run_id}/checkpoints/{segment}/{name}"


def _path(row: Checkpoint) -> str:
    return f"tinker://{row.run_id}/{SEGMENT[row.kind]}/{row.name}"


async def _change(state: AppState, tenant: str, run_id: str, segment: str, name: str, apply: Any) -> dict[str, Any]:
    kind, name = checkpoint_kind(segment, name)

    def work() -> None:
        with state.db.write() as s:
            apply(s, checkpoints.owned(s, tenant, run_id, kind, name, label=f"{segment}/{name}"))

    await run_in_threadpool(work)
    return {}


@router.put(_CHECKPOINT + "/ttl")
async def set_checkpoint_ttl(
    run_id: str, segment: str, name: str, request: Request, state: State, tenant: Tenant
) -> dict[str, Any]:
    req = await body_as(request, SetTtlRequest)
    checkpoints.check_ttl(req.ttl_seconds)
    return await _change(
        state, tenant, run_id, segment, name, lambda s, row: checkpoints.set_ttl(s, row, req.ttl_seconds)
    )


def _set_public(public: bool) -> Any:
    def apply(s: Any, row: Checkpoint) -> None:
        row.public = public
        s.flush()

    return apply


@router.post(_CHECKPOINT + "/publish")
async def publish_checkpoint(run_id: str, segment: str, name: str, state: State, tenant: Tenant) -> dict[str, Any]:
    return await _change(state, tenant, run_id, segment, name, _set_public(True))


@router.delete(_CHECKPOINT + "/publish")
async def unpublish_checkpoint(run_id: str, segment: str, name: str, state: State, tenant: Tenant) -> dict[str, Any]:
    return await _change(state, tenant, run_id, segment, name, _set_public(False))


# copy_weights (0.38)


def _copy(state: AppState, tenant: str, req: CopyWeightsRequest, source: TinkerPath, key: str) -> str:
    # The key is hashed with the tenant: two tenants' keys never meet, and the token is short
    # enough for created_by_op and a session id.
    token = hashlib.sha256(f"{tenant}\x00{key}".encode()).hexdigest()[:16]
    new_session = req.session_id is None
    session_id = f"s-{token}" if req.session_id is None else req.session_id
    model_seq_id = req.model_seq_id or 0
    run_id = run_id_for(session_id, model_seq_id)
    # 400, not 409: the SDK retries a 409 for minutes, and this one never changes.
    taken = InvalidInput(f"model_seq_id {model_seq_id} of session {session_id} already names a training run")
    with state.db.read() as s:
        done = checkpoints.find_copy(s, tenant, run_id, token)
        if done is not None:
            return _path(done)
        src = checkpoints.resolve(s, tenant, source)
        if not new_session:
            submit.get_session(s, tenant, session_id)
        if s.get(Run, run_id) is not None:
            raise taken
    store = CheckpointStore(state.settings.resolved_checkpoint_dir())
    stamp = {
        "tinker_path": f"tinker://{run_id}/{SEGMENT[src.kind]}/{src.name}",
        "run_id": run_id,
        "copied_from": str(source),
        # Not an op's attempt: the sweeper judges an unregistered copy by its age alone.
        "written_by": {"copy": token},
    }
    try:
        # A folder of this request's own (a retry with the same key copies again), so a copy never
        # touches a folder another request wrote, registered or not.
        storage = store.copy(src.storage_path, run_id, src.kind, src.name, f"copy:{tenant}:{token}", stamp)
    except FileNotFoundError:
        raise ServerError(f"the files of {source} are missing from the checkpoint store") from None
    try:
        with state.db.write() as s:
            row = checkpoints.record_copy(
                s,
                tenant=tenant,
                source=src,
                source_path=str(source),
                run_id=run_id,
                session_id=session_id,
                model_seq_id=model_seq_id,
                new_session=new_session,
                project_id=req.destination_project_id,
                token=token,
                storage_path=storage,
                ttl_seconds=req.ttl_seconds,
            )
            return _path(row)
    except IntegrityError:
        store.remove(storage)  # rolled back: these files are ours alone and unregistered
    except BaseException:
        # The commit may have landed before the error: remove them only if no row names them;
        # if even that cannot be checked now, the sweeper removes them once they are orphans.
        with contextlib.suppress(Exception):
            store.remove_unregistered(state.db, [storage])
        raise
    with state.db.read() as s:
        done = checkpoints.find_copy(s, tenant, run_id, token)
    if done is None:
        raise taken from None
    return _path(done)


@router.post("/api/v1/copy_weights")
async def copy_weights(request: Request, state: State, tenant: Tenant) -> dict[str, Any]:
    """A new checkpoint owned by the caller with the files of one it may read (its own or a
    published one), in a run of its own that cannot be trained. Idempotent per X-Idempotency-Key
    (the SDK reuses one key across all retries of a call)."""
    req = await body_as(request, CopyWeightsRequest)
    source = parse_tinker_path(req.source_path)
    checkpoints.check_ttl(req.ttl_seconds)
    if (req.session_id is None) != (req.model_seq_id is None):
        raise InvalidInput("session_id and model_seq_id must be given together (or neither)")
    key = request.headers.get("x-idempotency-key") or uuid.uuid4().hex
    return {"tinker_path": await run_in_threadpool(_copy, state, tenant, req, source, key)}
