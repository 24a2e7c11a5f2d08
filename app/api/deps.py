"""Request dependencies: the app state, the caller's tenant, and JSON bodies as wire models."""

from __future__ import annotations

from typing import Annotated, TypeVar

from fastapi import Depends, Header, Request
from starlette.concurrency import run_in_threadpool

from app.api.state import AppState
from app.wire.json_models import WireModel, parse_body

M = TypeVar("M", bound=WireModel)


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.tuft
    return state


State = Annotated[AppState, Depends(get_state)]


async def get_tenant(request: Request, x_api_key: Annotated[str | None, Header(alias="X-API-Key")] = None) -> str:
    state: AppState = request.app.state.tuft
    return await run_in_threadpool(state.keys.tenant_for, x_api_key)


Tenant = Annotated[str, Depends(get_tenant)]


async def body_as(request: Request, model: type[M]) -> M:
    return parse_body(model, await request.body())
