"""retrieve_future: long-polled, served from the ops table (tinker-protocol.md §3)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import DBAPIError
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from app.api.deps import State, Tenant, body_as
from app.api.state import AppState
from app.domain.errors import Category, ResultExpired, ServerError
from app.domain.results import parse_result
from app.queue.futures import FutureView, get_future, mark_delivered
from app.queue.queue_state import ACTIVE, QueueReport, describe_wait
from app.wire.errors import error_body, http_status_for
from app.wire.json_models import RetrieveFutureRequest
from app.wire.responses import encode_result, failed_future_body, try_again_body

router = APIRouter()
log = logging.getLogger(__name__)


@router.post("/api/v1/retrieve_future")
async def retrieve_future(request: Request, state: State, tenant: Tenant) -> Response:
    req = await body_as(request, RetrieveFutureRequest)

    def lookup() -> FutureView:
        with state.db.read() as s:
            return get_future(s, tenant, req.request_id)

    # Watched before the lookup: a result pushed while the lookup runs still wakes this poll.
    waiter = state.poller.watch(req.request_id)
    try:
        view: FutureView | None = await run_in_threadpool(lookup)
        assert view is not None
        if not view.done:
            view = await state.poller.hold(waiter, state.settings.long_poll_seconds)
    except DBAPIError:
        # The database is down or restarting. The SDK re-polls a 5xx at once, with no backoff
        # (tinker-protocol.md §3.4): hold the poll a little so an outage is not a hot loop.
        await asyncio.sleep(1.0)
        return JSONResponse(error_body(ServerError("the database is unavailable; retry")), status_code=503)
    finally:
        state.poller.forget(req.request_id, waiter)
    if view is None:
        return JSONResponse(await _try_again(state, req.request_id))
    if view.status == "failed":
        category: Category = view.error_category if view.error_category in ("user", "server") else "unknown"  # type: ignore[assignment]
        response: Response = JSONResponse(failed_future_body(view.error_message or "request failed", category))
    elif view.result is None:
        # Delivered long ago and dropped after the retention period: 410 is "promise expired".
        expired = ResultExpired(f"the result of {req.request_id} has expired")
        return JSONResponse(error_body(expired), status_code=http_status_for(expired))
    else:
        body, media_type = encode_result(parse_result(view.result), request.headers.get("accept"))
        response = Response(body, media_type=media_type)

    if view.delivered_at is None:

        def delivered() -> None:
            with contextlib.suppress(DBAPIError), state.db.write_relaxed() as s:
                mark_delivered(s, req.request_id)

        # After the response is sent, off the client's wait (issue 11: a commit on its way). A mark
        # lost to a crash only keeps the result longer (retention counts from the first delivery).
        response.background = BackgroundTask(delivered)
    return response


async def _try_again(state: AppState, request_id: str) -> dict[str, Any]:
    """The try_again reply with the op's real queue state (app/queue/queue_state.py). Read once per
    hold, after the long poll gave up; if that read fails the reply still goes out, as `active`."""

    def describe() -> QueueReport:
        with state.db.read() as s:
            return describe_wait(s, request_id, state.settings.lease_ttl_seconds)

    try:
        report = await run_in_threadpool(describe)
    except DBAPIError as exc:
        log.warning("queue state of %s unavailable: %s", request_id, exc)
        report = ACTIVE
    return try_again_body(
        request_id,
        report.state,
        report.reason,
        position=report.position,
        estimate_seconds=report.estimate_seconds,
    )
