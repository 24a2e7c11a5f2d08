"""retrieve_future: long-polled, served from the ops table (tinker-protocol.md §3)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from app.api.deps import State, Tenant, body_as
from app.domain.errors import Category, ServerError
from app.domain.results import parse_result
from app.queue.futures import FutureView, get_future
from app.wire.json_models import RetrieveFutureRequest
from app.wire.responses import encode_result, failed_future_body, try_again_body

router = APIRouter()


@router.post("/api/v1/retrieve_future")
async def retrieve_future(request: Request, state: State, tenant: Tenant) -> Response:
    req = await body_as(request, RetrieveFutureRequest)

    def lookup() -> FutureView:
        with state.db.read() as s:
            return get_future(s, tenant, req.request_id)

    view: FutureView | None = await run_in_threadpool(lookup)
    assert view is not None
    if not view.done:
        view = await state.poller.wait(req.request_id, state.settings.long_poll_seconds)
    if view is None:
        return JSONResponse(try_again_body(req.request_id))
    if view.status == "failed":
        category: Category = view.error_category if view.error_category in ("user", "server") else "unknown"  # type: ignore[assignment]
        return JSONResponse(failed_future_body(view.error_message or "request failed", category))
    if view.result is None:
        raise ServerError(f"future {req.request_id} succeeded without a stored result")
    body, media_type = encode_result(parse_result(view.result), request.headers.get("accept"))
    return Response(body, media_type=media_type)
