"""Sessions: create, heartbeat, finish, list, get, search; and the sampler lookup.

A session whose client went quiet is reported `expired` but keeps working: its next heartbeat or
request makes it active again (docs/sessions.md).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from app.api import sdk_range
from app.api.deps import State, Tenant, body_as
from app.db.engine import db_now
from app.db.models import Run, Sampler, Session
from app.domain.errors import InvalidInput
from app.queue import sessions, submit
from app.wire.json_models import (
    CreateSessionRequest,
    FinishSessionRequest,
    ListQuery,
    SessionHeartbeatRequest,
    SessionSearchRequest,
    parse_body,
)

router = APIRouter()
# A heartbeat writes last_heartbeat_at only when the stored one is older than this share of
# session_timeout_seconds (60 s of the default 600).
HEARTBEAT_WRITE_FRACTION = 0.1
# TuFT has no projects: every session of a tenant is in this one.
PROJECT_ID = "default"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@router.post("/api/v1/create_session")
async def create_session(request: Request, state: State, tenant: Tenant) -> dict[str, Any]:
    req = await body_as(request, CreateSessionRequest)
    # Every SDK sends its version in this body; an SDK older than the supported range is refused
    # here with a message naming the range (sdk_range.py says why), before it can queue an op.
    version = req.sdk_version or request.headers.get("x-stainless-package-version")
    refusal = sdk_range.refusal(version)
    if refusal is not None:
        raise InvalidInput(refusal)

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
    body: dict[str, Any] = {"session_id": session_id, "type": "create_session"}
    warning = sdk_range.warning(version)
    if warning is not None:
        body["warning_message"] = warning  # the SDK logs it as a warning
    return body


@router.post("/api/v1/session_heartbeat")
async def session_heartbeat(request: Request, state: State, tenant: Tenant) -> dict[str, Any]:
    req = await body_as(request, SessionHeartbeatRequest)

    def work() -> None:
        # The SDK beats every 10 s, so 1,000 live sessions are 100 heartbeats a second. Expiry needs
        # the time only to a fraction of session_timeout_seconds: a heartbeat that finds a recent
        # enough one is a read (the 410 check), and only the others write (issue 11).
        with state.db.read() as s:
            row = submit.get_session(s, tenant, req.session_id, live=True)
            if db_now(s) - row.last_heartbeat_at < state.settings.session_timeout_seconds * HEARTBEAT_WRITE_FRACTION:
                return
        with state.db.write() as s:
            # An expired session is revived by this write; only a finished one gets the 410.
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
            session_state, last_active = sessions.session_state(s, session_id, state.settings.session_timeout_seconds)
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
                # TuFT's own fields, for raw HTTP clients: the SDK's response models drop unknown keys.
                "tuft_state": session_state,
                "last_active_at": _iso(last_active),
            }

    return await run_in_threadpool(work)


@router.post("/api/v1/sessions/search")
async def search_sessions(request: Request, state: State, tenant: Tenant) -> dict[str, Any]:
    req = await body_as(request, SessionSearchRequest)
    filters = _filters(req)
    # Owners are tenants, and a tenant sees only its own sessions ("accessible" included).
    if req.owner.type == "user" and tenant not in req.owner.owner_urns:
        return {"sessions": []}

    def work() -> tuple[list[sessions.SessionView], bool]:
        with state.db.read() as s:
            return sessions.search(s, tenant, filters, state.settings.session_timeout_seconds)

    page, more = await run_in_threadpool(work)
    body: dict[str, Any] = {"sessions": [_summary(v) for v in page]}
    if more:
        last = page[-1]
        body["next_cursor"] = {"last_created_at": _from_micros(last.created_us), "last_session_id": last.session_id}
    return body


def _filters(req: SessionSearchRequest) -> sessions.SearchFilters:
    unknown = sorted(set(req.project_ids or []) - {PROJECT_ID})
    if unknown:
        raise InvalidInput(f"unknown project(s) {unknown}: this server has one project per tenant, {PROJECT_ID!r}")
    if req.owner.type == "user" and not 1 <= len(req.owner.owner_urns) <= 10:
        raise InvalidInput("owner.owner_urns must list 1 to 10 owners")
    after = None
    if req.cursor is not None:
        try:
            when = datetime.fromisoformat(req.cursor.last_created_at)
        except ValueError as exc:
            raise InvalidInput(f"cursor.last_created_at is not an ISO 8601 time: {exc}") from exc
        if when.tzinfo is None:
            raise InvalidInput("cursor.last_created_at needs a UTC offset: pass next_cursor back unchanged")
        after = ((when - _EPOCH) // timedelta(microseconds=1), req.cursor.last_session_id)
    statuses = None
    if req.statuses is not None:
        statuses = tuple(sessions.StatusQuery(q.type, tuple(q.reasons) if q.reasons else None) for q in req.statuses)
    return sessions.SearchFilters(
        session_id=req.session_id,
        display_name=req.display_name,
        user_metadata=req.user_metadata,
        statuses=statuses,
        limit=req.limit,
        after=after,
    )


def _summary(v: sessions.SessionView) -> dict[str, Any]:
    """A SessionSummary. `status` follows the SDK's model, where an expired session is None
    ("neither finished nor known to be running"); `tuft_state` names it."""
    status: dict[str, Any] | None = None
    if v.state == "finished":
        status = {"type": "client_finished", "reason": {"type": v.finish_reason or "success"}}
    elif v.state == "active":
        status = {"type": "active"}
    return {
        "session_id": v.session_id,
        "created_at": _from_micros(v.created_us),
        "owner": v.tenant,
        "project_id": PROJECT_ID,
        "status": status,
        "checkpoints_count": v.checkpoints_count,
        "display_name": v.display_name,
        "user_metadata": v.user_metadata,
        "checkpoint_storage_bytes": v.checkpoint_bytes,
        "tuft_state": v.state,
        "last_active_at": _iso(v.last_active),
    }


def _from_micros(us: int) -> str:
    return (_EPOCH + timedelta(microseconds=us)).isoformat()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


@router.get("/api/v1/samplers/{sampler_id:path}")
async def get_sampler(sampler_id: str, state: State, tenant: Tenant) -> dict[str, Any]:
    def work() -> dict[str, Any]:
        with state.db.read() as s:
            row = submit.get_sampler(s, tenant, sampler_id)
            return {"sampler_id": row.sampler_id, "base_model": row.base_model, "model_path": row.model_path}

    return await run_in_threadpool(work)
