"""Request dependencies: the app state, the caller's tenant, and JSON bodies as wire models."""

from __future__ import annotations

import hashlib
from typing import Annotated, TypeVar

from fastapi import Depends, Header, Request
from starlette.concurrency import run_in_threadpool

from app.api.decoding import gate_of
from app.api.state import AppState
from app.wire.json_models import WireModel, parse_body

M = TypeVar("M", bound=WireModel)


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.tuft
    return state


State = Annotated[AppState, Depends(get_state)]


async def get_tenant(request: Request, x_api_key: Annotated[str | None, Header(alias="X-API-Key")] = None) -> str:
    state: AppState = request.app.state.tuft
    tenant = state.keys.known(x_api_key)
    if tenant is None:
        tenant = await run_in_threadpool(state.keys.tenant_for, x_api_key)
    request.state.tenant = tenant  # body_as shares decode slots per tenant
    return tenant


Tenant = Annotated[str, Depends(get_tenant)]


# A JSON body up to this size parses in well under a millisecond: on the event loop, without
# taking a decode slot (the SDK's many small polls and heartbeats must never get a 429).
INLINE_JSON_BYTES = 64 * 1024


async def body_as(request: Request, model: type[M]) -> M:
    """The JSON body as `model`; a large or chunked body is parsed off the event loop through
    the decode gate (app/api/decoding.py), counted against the caller's tenant."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) <= INLINE_JSON_BYTES:
        return parse_body(model, await request.body())
    tenant = getattr(request.state, "tenant", None) or _key_bucket(request)
    return await gate_of(request).decode(request, tenant, lambda body: parse_body(model, body))


def _key_bucket(request: Request) -> str:
    """A decode bucket for routes that resolve their caller themselves (the OpenAI ones): the key
    it presents, hashed, so that callers still do not share one bucket."""
    key = request.headers.get("x-api-key") or request.headers.get("authorization") or ""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]
