"""OpenAI-compatible completions over sampler checkpoints and base models (docs/openai.md).

A completion is one durable op (app/domain/oai.py) that a worker tokenizes, samples and
detokenizes; the request is held until it is done, resolved by the same poller as retrieve_future.
Errors come in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`, not Tinker's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session as DbSession
from starlette.concurrency import run_in_threadpool

from app.api.deps import State, body_as
from app.api.state import AppState
from app.db.models import Checkpoint
from app.domain.errors import DomainError, InvalidInput, NotFound, ServerError, Unauthorized
from app.domain.ids import checkpoint_path, parse_tinker_path
from app.domain.oai import OaiCompletionOp, parse_oai_result
from app.queue import backpressure, checkpoints
from app.queue import oai as oai_queue
from app.queue.backpressure import SampleQueueFull, SampleQueueLimits
from app.queue.futures import mark_delivered
from app.queue.submit import Wakeup
from app.wire import oai as oai_wire
from app.wire.errors import http_status_for

log = logging.getLogger("tuft.api")

# How long a request is held for its result (the openai package itself gives up after 600 s).
# Past it the answer is a 504; the op still runs, and its result is dropped after the retention period.
WAIT_SECONDS = 300.0
MAX_LISTED_CHECKPOINTS = 1000


def _error(status: int, message: str, code: str | None) -> JSONResponse:
    type_ = "server_error" if status >= 500 else "invalid_request_error"
    return JSONResponse(oai_wire.error_body(message, type_=type_, code=code), status_code=status)


def _domain_error(request: Request, exc: DomainError) -> JSONResponse:
    status = http_status_for(exc)
    level = logging.WARNING if status < 500 else logging.ERROR
    log.log(level, "%s %s -> %d: %s", request.method, request.url.path, status, exc.message)
    if isinstance(exc, Unauthorized):
        code = "invalid_api_key"
    elif isinstance(exc, NotFound):
        code = "model_not_found"  # the only lookup these routes make
    else:
        code = "invalid_value" if status == 400 else "internal_error"
    return _error(status, exc.message, code)


class _OaiRoute(APIRoute):
    """Turns errors, including those raised by dependencies (the API key), into OpenAI's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except DomainError as exc:
                return _domain_error(request, exc)
            except DBAPIError as exc:
                log.warning("%s %s -> 503: database unavailable (%s)", request.method, request.url.path, exc)
                return _error(503, "the database is unavailable; retry", "service_unavailable")

        return handle


router = APIRouter(prefix="/oai/api/v1", route_class=_OaiRoute)


async def oai_tenant(request: Request, state: State) -> str:
    """The openai package sends `Authorization: Bearer <key>`; X-API-Key works as everywhere else."""
    key = request.headers.get("x-api-key")
    if not key:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        key = token.strip() if scheme.lower() == "bearer" else None
    if not key:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    return await run_in_threadpool(state.keys.tenant_for, key)


OaiTenant = Annotated[str, Depends(oai_tenant)]


def _resolve(s: DbSession, state: AppState, tenant: str, model: str) -> tuple[str, Checkpoint | None]:
    """(base model, checkpoint or None). Another tenant's unpublished checkpoint is a 404 exactly
    like a missing one."""
    if model.startswith("tinker://"):
        path = parse_tinker_path(model)
        if path.kind != "sampler":
            raise InvalidInput(f"{model} is a training checkpoint; serve weights saved with save_weights_for_sampler")
        ckpt = checkpoints.resolve(s, tenant, path)
        return ckpt.base_model, ckpt
    if model not in state.catalog.specs:
        raise NotFound(f"model {model!r} not found; GET /oai/api/v1/models lists the models you can use")
    return model, None


Build = Callable[[str, str | None], OaiCompletionOp]


async def _complete(state: AppState, tenant: str, model: str, build: Build) -> Response:
    created = int(time.time())

    def work(s: DbSession) -> tuple[tuple[str, OaiCompletionOp], list[Wakeup]]:
        base_model, ckpt = _resolve(s, state, tenant, model)
        op = build(base_model, model if ckpt is not None else None)
        max_len = state.catalog.get(base_model).max_model_len
        oai_wire.check_limits(op, vocab=state.catalog.vocab_size(base_model), max_len=max_len)
        # Completions share the sample queue, so they obey its backpressure limits too.
        backpressure.admit_new(s, tenant, limits)
        sub = oai_queue.submit_completion(s, tenant, op)
        return (sub.request_id, op), [sub.wakeup] if sub.wakeup else []

    settings = state.settings
    limits = SampleQueueLimits.of(settings)
    try:
        request_id, op = await run_in_threadpool(state.submit, work)
    except SampleQueueFull as exc:
        log.info("OpenAI completion -> 429: %s", exc.message)
        response = _error(429, exc.message, "rate_limit_exceeded")
        response.headers["Retry-After"] = "1"
        return response
    view = await state.poller.wait(request_id, WAIT_SECONDS)

    def delivered() -> None:
        # Retention counts from here, also after a timeout: nobody will ask for this result again.
        with state.db.write() as s:
            mark_delivered(s, request_id)

    try:
        await run_in_threadpool(delivered)
    except DBAPIError:
        log.warning("could not mark %s delivered", request_id)
    if view is None:
        message = f"no result within {WAIT_SECONDS:g} s (request {request_id}); the server is busy, retry later"
        return _error(504, message, "timeout")
    if view.status == "failed":
        message = view.error_message or "the completion failed"
        raise InvalidInput(message) if view.error_category == "user" else ServerError(message)
    if view.result is None:
        raise ServerError(f"the result of {request_id} is gone")
    result = parse_oai_result(view.result)
    body = oai_wire.response_body(result, op=op, request_id=request_id, model=model, created=created)
    return JSONResponse(body)


@router.post("/completions")
async def completions(request: Request, state: State, tenant: OaiTenant) -> Response:
    req = await body_as(request, oai_wire.CompletionRequest)
    max_n = state.settings.max_samples_per_request

    def build(base_model: str, model_path: str | None) -> OaiCompletionOp:
        return oai_wire.completion_op(req, base_model=base_model, model_path=model_path, max_n=max_n)

    return await _complete(state, tenant, req.model, build)


@router.post("/chat/completions")
async def chat_completions(request: Request, state: State, tenant: OaiTenant) -> Response:
    req = await body_as(request, oai_wire.ChatRequest)
    max_n = state.settings.max_samples_per_request

    def build(base_model: str, model_path: str | None) -> OaiCompletionOp:
        return oai_wire.chat_op(req, base_model=base_model, model_path=model_path, max_n=max_n)

    return await _complete(state, tenant, req.model, build)


def _base_entry(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "tuft", "root": name, "parent": None}


def _checkpoint_entry(row: Checkpoint, tenant: str) -> dict[str, Any]:
    return {
        "id": checkpoint_path(row.run_id, "sampler", row.name),
        "object": "model",
        "created": int(row.created_at),
        # Never another tenant's name: a published checkpoint only says that it is published.
        "owned_by": tenant if row.tenant == tenant else "published",
        "root": row.base_model,
        "parent": row.base_model,
    }


@router.get("/models")
async def list_models(state: State, tenant: OaiTenant) -> dict[str, Any]:
    def read() -> list[dict[str, Any]]:
        with state.db.read() as s:
            rows = oai_queue.visible_sampler_checkpoints(s, tenant, MAX_LISTED_CHECKPOINTS)
            return [_checkpoint_entry(r, tenant) for r in rows]

    listed = await run_in_threadpool(read)
    now = int(time.time())
    return {"object": "list", "data": [*(_base_entry(name, now) for name in state.catalog.specs), *listed]}


@router.get("/models/{model:path}")
async def get_model(model: str, state: State, tenant: OaiTenant) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        with state.db.read() as s:
            base_model, ckpt = _resolve(s, state, tenant, model)
            return _base_entry(base_model, int(time.time())) if ckpt is None else _checkpoint_entry(ckpt, tenant)

    return await run_in_threadpool(read)
