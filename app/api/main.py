"""create_app(settings): the FastAPI app, its lifespan, error handlers and body-size limit."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import logcontext, logredact
from app.api.catalog import ModelCatalog
from app.api.decoding import RETRY_AFTER_SECONDS, DecodeBusy, DecodeGate
from app.api.longpoll import FuturePoller
from app.api.proxy import ForwardedHeaders
from app.api.pushes import Pushes
from app.api.request_id import RequestIdMiddleware
from app.api.routes import (
    audit,
    checkpoints,
    client,
    downloads,
    futures,
    metrics,
    oai,
    rest,
    sampling,
    sessions,
    training,
)
from app.api.state import AppState
from app.auth import KeyResolver
from app.config import Settings
from app.dashboard.routes import router as dashboard_router
from app.db.engine import Database, DbTimeouts
from app.domain.errors import DomainError, InvalidInput, NotFound, PayloadTooLarge
from app.doorbell import make_doorbell
from app.metrics.exporter import MetricsExporter
from app.sweeper import SweeperThread
from app.wire.errors import error_body, http_status_for
from app.wire.oai import error_body as oai_error_body

log = logging.getLogger("tuft.api")


class BodyLimit:
    """413 with a JSON body for requests over the limit, checked on Content-Length and again while
    streaming (a chunked upload has no Content-Length)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # PostgreSQL text cannot hold NUL: an id with one names nothing (404, as for any unknown
        # id), and would otherwise reach the database as a DataError (a 5xx the SDK retries).
        if "\x00" in scope["path"]:
            await _refuse(404, NotFound(f"nothing is named with a NUL character (%00): {scope['path']!r}"), send, scope)
            return
        if b"%00" in scope.get("query_string", b""):
            await _refuse(400, InvalidInput("the query string must not contain NUL characters (%00)"), send, scope)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _too_large(self.max_bytes, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise PayloadTooLarge(f"request body exceeds the limit of {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)


async def _too_large(limit: int, send: Send) -> None:
    await _refuse(413, PayloadTooLarge(f"request body exceeds the limit of {limit} bytes"), send)


async def _refuse(status: int, err: DomainError, send: Send, scope: Scope | None = None) -> None:
    body = error_body(err)
    if scope is not None and scope["path"].startswith("/oai/"):
        # OpenAI clients read only their own error shape (docs/openai.md).
        body = oai_error_body(err.message, type_="invalid_request_error", code="invalid_value")
    response = JSONResponse(body, status_code=status)
    await response({"type": "http"}, _empty_receive, send)


async def _empty_receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


def _error_response(err: DomainError) -> JSONResponse:
    return JSONResponse(error_body(err), status_code=http_status_for(err))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _domain(request: Request, exc: DomainError) -> JSONResponse:
        status = http_status_for(exc)
        log.log(
            logging.WARNING if status < 500 else logging.ERROR,
            "%s %s -> %d: %s",
            request.method,
            request.url.path,
            status,
            exc.message,
        )
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        log.warning("%s %s -> 400: %s", request.method, request.url.path, problems)
        return JSONResponse(
            {"error": "invalid_input", "message": problems, "category": "user", "detail": problems},
            status_code=400,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else "http_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(
            {"error": code, "message": message, "category": "user", "detail": message},
            status_code=exc.status_code,
        )

    @app.exception_handler(DecodeBusy)
    async def _decode_busy(request: Request, exc: DecodeBusy) -> JSONResponse:
        log.info("%s %s -> 429: %s", request.method, request.url.path, exc.message)
        body = {"error": "too_many_requests", "message": exc.message, "category": "server", "detail": exc.message}
        return JSONResponse(body, status_code=429, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})

    @app.exception_handler(DataError)
    async def _bad_value(request: Request, exc: DataError) -> JSONResponse:
        # The database refused a value (out of range, too long, not encodable): the request's
        # input, since the server's own values fit its schema. The wire models and json_guard
        # should have caught it first, hence ERROR; a 400 stops the SDK retrying it forever.
        log.error("%s %s -> 400: the database refused a value: %s", request.method, request.url.path, exc.orig)
        message = "a value in the request is out of range or not storable (too long, too large or not valid text)"
        return _error_response(InvalidInput(message))

    @app.exception_handler(DBAPIError)
    async def _database_down(request: Request, exc: DBAPIError) -> JSONResponse:
        # The database is restarting or unreachable: a 503 the SDK retries, not a 500 with a trace.
        log.warning(
            "%s %s -> 503: database unavailable (%s)", request.method, request.url.path, type(exc.orig).__name__
        )
        message = "the database is unavailable; retry"
        body = {"error": "service_unavailable", "message": message, "category": "server", "detail": message}
        return JSONResponse(body, status_code=503)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        message = f"internal error: {type(exc).__name__}"
        return JSONResponse(
            {"error": "server_error", "message": message, "category": "server", "detail": message},
            status_code=500,
        )


def create_app(
    settings: Settings, *, db: Database | None = None, on_shutdown: Callable[[], None] | None = None
) -> FastAPI:
    """`on_shutdown` runs when the server stops, before uvicorn re-raises a SIGTERM: `tuft launch`
    stops its worker there (code after uvicorn.run() would never run on a signal)."""
    database = db or Database(
        settings.resolved_database_url(),
        process_name="api",
        timeouts=DbTimeouts.for_lease(settings.lease_ttl_seconds),  # bounds a paused transaction
        pool_size=settings.db_pool_size,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Sync handlers (DB work) run in anyio's thread pool; its default of 40 is small for many
        # clients submitting at once. Polls themselves hold no thread while they wait.
        anyio.to_thread.current_default_thread_limiter().total_tokens = 100
        poller = FuturePoller(database, settings.future_poll_interval)
        state = AppState(
            settings=settings,
            db=database,
            doorbell=make_doorbell(settings.redis_url, settings.resolved_data_dir()),
            catalog=ModelCatalog(settings),
            keys=KeyResolver(database, settings.configured_keys()),
            poller=poller,
            decode_gate=DecodeGate(settings.decode_threads, settings.decode_queue_per_tenant),
        )
        app.state.tuft = state
        poller.start()
        pushes = Pushes(database.url, settings.resolved_data_dir(), poller, listen_url=settings.database_listen_url)
        await pushes.start()
        sweeper = SweeperThread(settings, database, state.doorbell)
        sweeper.start()
        app.state.tuft_metrics = exporter = MetricsExporter(settings, database)
        exporter.start()
        try:
            yield
        finally:
            exporter.stop()
            sweeper.stop()
            await pushes.stop()
            await poller.stop()
            if on_shutdown is not None:
                await asyncio.to_thread(on_shutdown)
            state.doorbell.close()
            if db is None:
                database.dispose()

    app = FastAPI(title="TuFT", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    for module in (client, sessions, training, sampling, futures, rest, checkpoints, downloads, oai, audit, metrics):
        app.include_router(module.router)
    app.include_router(dashboard_router)  # read-only HTML pages (docs/dashboard.md)
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(ForwardedHeaders, proxies=settings.trusted_proxies)
    # Outermost: every response, refusals by the middlewares below included, carries its id.
    app.add_middleware(RequestIdMiddleware)
    logcontext.install_record_factory()
    logredact.install()  # signed download tokens never reach a log line
    return app
