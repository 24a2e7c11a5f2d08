"""Sessions: create, heartbeat, finish, list, get; and the sampler lookup."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from app.api.deps import State, Tenant, body_as
from app.db.engine import db_now
from app.db.models import Run, Sampler, Session
from app.queue import submit
from app.wire.json_models import (
    CreateSessionRequest,
    FinishSessionRequest,
    ListQuery,
    SessionHeartbeatRequest,
    parse_body,
)

router = APIRouter()


@router.post("/api/v1/create_session")
async def create_session(request: Request, state: State, tenant: Tenant) -> dict[str, Any]:
    req = await body_as(request, CreateSessionRequest)

    def work(s: Any) -> tuple[str, list[Any]]:
        session_id = submit.create_session(
            s,
            tenant,
            sdk_version=req.sdk_version,
            tags=sorted(set(req.tags)),
            user_metadata=req.user_metadata or {},
            display_name=req.display_name,
        )
        return session_id, []

    session_id = await run_in_threadpool(state.submit, work)
    return {"session_id": session_id, "type": "create_session"}


@router.post("/api/v1/session_heartbeat")
async def session_heartbeat(request: Request, state: State, tenant: Tenant) -> dict[str, Any]:
    req = await body_as(request, SessionHeartbeatRequest)

    def work() -> None:
        with state.db.write() as s:
            row = submit.get_session(s, tenant, req.session_id, live=True)
            row.last_heartbeat_at = db_now(s)

    await run_in_threadpool(work)
    return {"type": "session_heartbeat"}


@router.post("/api/v1/sessions/{session_id}/finish")
async def finish_session(session_id: str, request: Request, state: State, tenant: Tenant) -> dict[str, Any]:
    req = await body_as(request, FinishSessionRequest)

    def work() -> None:
        with state.db.write() as s:
            row = submit.get_session(s, tenant, session_id)
            if row.finished_at is None:  # first finish wins (SDK docstring)
                row.finished_at = db_now(s)
                row.finish_reason = (req.reason.type if req.reason else "success").replace("\x00", "")[:32]

    await run_in_threadpool(work)
    return {}


@router.get("/api/v1/sessions")
async def list_sessions(request: Request, state: State, tenant: Tenant) -> dict[str, Any]:
    q = parse_body(ListQuery, dict(request.query_params))

    def work() -> list[str]:
        with state.db.read() as s:
            return list(
                s.execute(
                    select(Session.session_id)
                    .where(Session.tenant == tenant)
                    .order_by(Session.created_at.desc())
                    .limit(max(1, min(q.limit, 1000)))
                    .offset(max(0, min(q.offset, 2**31 - 1)))
                ).scalars()
            )

    return {"sessions": await run_in_threadpool(work)}


@router.get("/api/v1/sessions/{session_id}")
async def get_session(session_id: str, state: State, tenant: Tenant) -> dict[str, Any]:
    def work() -> dict[str, Any]:
        with state.db.read() as s:
            row = submit.get_session(s, tenant, session_id)
            runs = s.execute(
                select(Run.run_id).where(Run.session_id == session_id).order_by(Run.model_seq_id)
            ).scalars()
            samplers = s.execute(
                select(Sampler.sampler_id).where(Sampler.session_id == session_id).order_by(Sampler.created_at)
            ).scalars()
            return {
                "training_run_ids": list(runs),
                "sampler_ids": list(samplers),
                "user_metadata": {k: str(v) for k, v in (row.user_metadata or {}).items()},
                "display_name": row.display_name,
            }

    return await run_in_threadpool(work)


@router.get("/api/v1/samplers/{sampler_id:path}")
async def get_sampler(sampler_id: str, state: State, tenant: Tenant) -> dict[str, Any]:
    def work() -> dict[str, Any]:
        with state.db.read() as s:
            row = submit.get_sampler(s, tenant, sampler_id)
            return {"sampler_id": row.sampler_id, "base_model": row.base_model, "model_path": row.model_path}

    return await run_in_threadpool(work)
