"""REST for RestClient and the `tinker` CLI: training runs, checkpoint listings and deletion
(tinker-protocol.md §5.2). Checkpoint TTL, publishing and copies are in routes/checkpoints.py."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool

from app.api import sdk_range
from app.api.deps import State, Tenant
from app.db.models import Checkpoint, Run
from app.domain.errors import InvalidInput
from app.domain.ids import validate_checkpoint_name
from app.queue import checkpoints, submit
from app.sweeper import remove_checkpoint_files
from app.wire.json_models import ListQuery, parse_body

router = APIRouter()

# Checkpoint kinds and their tinker:// path segments (the SDK's types/checkpoint.py).
SEGMENT = {"training": "weights", "sampler": "sampler_weights", "external": "external_weights"}
KIND = {segment: kind for kind, segment in SEGMENT.items()}
_MAX_LIMIT = 1000


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def checkpoint_kind(segment: str, name: str) -> tuple[str, str]:
    """The `{kind}/{name}` of a checkpoint URL -> (kind, name), validated."""
    if segment not in KIND:
        raise InvalidInput(f"invalid checkpoint id {segment}/{name!r}: expected one of {', '.join(KIND)}/<name>")
    return KIND[segment], validate_checkpoint_name(name)


def checkpoint_json(c: Checkpoint) -> dict[str, Any]:
    segment = SEGMENT[c.kind]
    return {
        "checkpoint_id": f"{segment}/{c.name}",
        "checkpoint_type": c.kind,
        "time": _iso(c.created_at),
        "tinker_path": f"tinker://{c.run_id}/{segment}/{c.name}",
        "size_bytes": c.size_bytes,
        "public": c.public,
        "user_metadata": c.user_metadata,
        "expires_at": _iso(c.expires_at),
    }


def listed_kinds(request: Request) -> set[str] | None:
    """None (every kind) unless the client is an SDK too old to parse external checkpoints
    (before 0.28, whose Checkpoint model rejects the whole listing if one appears)."""
    version = sdk_range.from_headers(request.headers)
    if version is not None and version < sdk_range.EXTERNAL_LISTED_FROM:
        return {"training", "sampler"}
    return None


def run_json(s: Any, run: Run) -> dict[str, Any]:
    last = checkpoints.latest_for_run(s, run.run_id, "training")
    last_sampler = checkpoints.latest_for_run(s, run.run_id, "sampler")
    return {
        "training_run_id": run.run_id,
        "base_model": run.base_model,
        "model_owner": run.tenant,
        "is_lora": True,
        "corrupted": run.status == "blocked",
        "lora_rank": run.lora_config.get("rank"),
        "last_request_time": _iso(run.last_request_at),
        "last_checkpoint": checkpoint_json(last) if last else None,
        "last_sampler_checkpoint": checkpoint_json(last_sampler) if last_sampler else None,
        "user_metadata": {k: str(v) for k, v in (run.user_metadata or {}).items()} or None,
    }


def _page(request: Request, default_limit: int | None) -> tuple[int | None, int]:
    """`?limit=&offset=`: a limit above the maximum is served as the maximum (the cursor says
    so); a limit below 1 or a negative offset is a 400."""
    q = parse_body(ListQuery, dict(request.query_params))
    limit = q.limit if "limit" in request.query_params else default_limit
    if limit is not None and limit < 1:
        raise InvalidInput(f"limit must be at least 1, got {limit}")
    if q.offset < 0:
        raise InvalidInput(f"offset must not be negative, got {q.offset}")
    return (None if limit is None else min(limit, _MAX_LIMIT)), min(q.offset, 2**31 - 1)


def _listing(rows: list[Checkpoint], total: int, limit: int | None, offset: int) -> dict[str, Any]:
    return {
        "checkpoints": [checkpoint_json(c) for c in rows],
        "cursor": {"offset": offset, "limit": total if limit is None else limit, "total_count": total},
    }


@router.get("/api/v1/training_runs")
async def list_training_runs(request: Request, state: State, tenant: Tenant) -> dict[str, Any]:
    limit, offset = _page(request, 20)

    def work() -> dict[str, Any]:
        with state.db.read() as s:
            total = s.execute(select(func.count()).select_from(Run).where(Run.tenant == tenant)).scalar_one()
            runs = s.execute(
                select(Run).where(Run.tenant == tenant).order_by(Run.created_at.desc()).limit(limit).offset(offset)
            ).scalars()
            return {
                "training_runs": [run_json(s, r) for r in runs],
                "cursor": {"offset": offset, "limit": limit, "total_count": int(total)},
            }

    return await run_in_threadpool(work)


@router.get("/api/v1/training_runs/{run_id}")
async def get_training_run(run_id: str, state: State, tenant: Tenant) -> dict[str, Any]:
    def work() -> dict[str, Any]:
        with state.db.read() as s:
            return run_json(s, submit.get_run(s, tenant, run_id))

    return await run_in_threadpool(work)


@router.get("/api/v1/training_runs/{run_id}/checkpoints")
async def list_run_checkpoints(run_id: str, request: Request, state: State, tenant: Tenant) -> dict[str, Any]:
    # The SDK sends no limit here and the CLI looks checkpoints up in this list: all by default.
    limit, offset = _page(request, None)
    kinds = listed_kinds(request)

    def work() -> dict[str, Any]:
        with state.db.read() as s:
            submit.get_run(s, tenant, run_id)
            rows, total = checkpoints.list_for_run(s, tenant, run_id, limit, offset, kinds)
            return _listing(rows, total, limit, offset)

    return await run_in_threadpool(work)


@router.get("/api/v1/checkpoints")
async def list_user_checkpoints(request: Request, state: State, tenant: Tenant) -> dict[str, Any]:
    limit, offset = _page(request, 100)
    kinds = listed_kinds(request)

    def work() -> dict[str, Any]:
        with state.db.read() as s:
            rows, total = checkpoints.list_for_tenant(s, tenant, limit or _MAX_LIMIT, offset, kinds)
            return _listing(rows, total, limit, offset)

    return await run_in_threadpool(work)


@router.delete("/api/v1/training_runs/{run_id}/checkpoints/{segment}/{name}")
async def delete_checkpoint(run_id: str, segment: str, name: str, state: State, tenant: Tenant) -> dict[str, Any]:
    kind, name = checkpoint_kind(segment, name)

    def work() -> None:
        with state.db.write() as s:
            row = checkpoints.delete(s, tenant, run_id, kind, name, label=f"{segment}/{name}")
            storage = row.storage_path
        remove_checkpoint_files(state.db, state.settings.resolved_checkpoint_dir(), [storage])

    await run_in_threadpool(work)
    return {}
