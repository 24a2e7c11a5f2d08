"""REST for RestClient and the `tinker` CLI: training runs and checkpoints (tinker-protocol.md §5.2)."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool

from app.api.deps import State, Tenant
from app.db.models import Checkpoint, Run
from app.domain.ids import checkpoint_path, parse_checkpoint_id
from app.queue import checkpoints, submit
from app.wire.json_models import ListQuery, parse_body

router = APIRouter()

_SEGMENT = {"training": "weights", "sampler": "sampler_weights"}


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def checkpoint_json(c: Checkpoint) -> dict[str, Any]:
    return {
        "checkpoint_id": f"{_SEGMENT[c.kind]}/{c.name}",
        "checkpoint_type": c.kind,
        "time": _iso(c.created_at),
        "tinker_path": checkpoint_path(c.run_id, c.kind, c.name),  # type: ignore[arg-type]
        "size_bytes": c.size_bytes,
        "public": c.public,
        "user_metadata": c.user_metadata,
        "expires_at": _iso(c.expires_at),
    }


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


def _page(request: Request, default_limit: int) -> tuple[int, int]:
    q = parse_body(ListQuery, {"limit": default_limit, **dict(request.query_params)})
    return max(1, min(q.limit, 1000)), max(0, min(q.offset, 2**31 - 1))


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
async def list_run_checkpoints(run_id: str, state: State, tenant: Tenant) -> dict[str, Any]:
    def work() -> dict[str, Any]:
        with state.db.read() as s:
            submit.get_run(s, tenant, run_id)
            rows = checkpoints.list_for_run(s, tenant, run_id)
            return {
                "checkpoints": [checkpoint_json(c) for c in rows],
                "cursor": {"offset": 0, "limit": len(rows), "total_count": len(rows)},
            }

    return await run_in_threadpool(work)


@router.get("/api/v1/checkpoints")
async def list_user_checkpoints(request: Request, state: State, tenant: Tenant) -> dict[str, Any]:
    limit, offset = _page(request, 100)

    def work() -> dict[str, Any]:
        with state.db.read() as s:
            rows, total = checkpoints.list_for_tenant(s, tenant, limit, offset)
            return {
                "checkpoints": [checkpoint_json(c) for c in rows],
                "cursor": {"offset": offset, "limit": limit, "total_count": total},
            }

    return await run_in_threadpool(work)


@router.delete("/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id:path}")
async def delete_checkpoint(run_id: str, checkpoint_id: str, state: State, tenant: Tenant) -> dict[str, Any]:
    kind, name = parse_checkpoint_id(checkpoint_id)

    def work() -> None:
        with state.db.write() as s:
            row = checkpoints.delete(s, tenant, run_id, kind, name)
            storage = row.storage_path
        # Files go after the row: a crash in between leaves orphan files, never a listed
        # checkpoint without files.
        shutil.rmtree(state.settings.resolved_checkpoint_dir() / storage, ignore_errors=True)

    await run_in_threadpool(work)
    return {}
