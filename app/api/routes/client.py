"""Bootstrap and background traffic: client config, capabilities, telemetry, health, readiness."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from app.api import readiness
from app.api.deps import State, Tenant

router = APIRouter()


@router.post("/api/v1/client/config")
async def client_config(state: State, _: Tenant) -> dict[str, Any]:
    # Every field is optional and `{}` gives the SDK's defaults (tinker-protocol.md §2.2). We
    # decompress zstd, so let the SDK compress forward_backward bodies. The transport switch is
    # the SDK's own kill switch for its pyqwest transport (it fetches this config over httpx).
    return {
        "proto_compress_fwdbwd": True,
        "use_pyqwest_transport": state.settings.client_pyqwest_transport,
    }


@router.post("/api/v1/client/dynamic_config")
async def dynamic_config(_: Tenant) -> dict[str, Any]:
    return {"refresh_interval_sec": 300}


@router.get("/api/v1/get_server_capabilities")
async def capabilities(state: State, _: Tenant) -> dict[str, Any]:
    return {"supported_models": state.catalog.capabilities()}


@router.post("/api/v1/telemetry")
async def telemetry(_: Tenant) -> dict[str, str]:
    # Accepted and dropped: the SDK's telemetry describes the client, not our server.
    return {"status": "accepted"}


@router.get("/api/v1/healthz")
@router.get("/healthz")
async def healthz(state: State) -> dict[str, str]:
    def _ping() -> None:
        with state.db.read() as s:
            s.execute(text("SELECT 1"))

    await run_in_threadpool(_ping)  # a database outage becomes a 503 (api/main.py)
    return {"status": "ok"}


@router.get("/api/v1/readyz", response_model=None)
@router.get("/readyz", response_model=None)
async def readyz(state: State) -> dict[str, str] | JSONResponse:
    """Ready when what the server announces is there (app/api/readiness.py); 503 before."""
    waiting = await run_in_threadpool(readiness.waiting_for, state)
    if waiting:
        body = {"status": "starting", "waiting_for": waiting}
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})
    return {"status": "ready"}
