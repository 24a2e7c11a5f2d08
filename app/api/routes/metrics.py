"""GET /metrics: Prometheus exposition for operators (docs/metrics.md). Not an API-key route: the
numbers cover every tenant, so it takes the metrics token (Authorization: Bearer) and answers 404
without one, as if absent, rather than tell a tenant's key that something is there."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from starlette.concurrency import run_in_threadpool

from app.domain.errors import NotFound
from app.metrics.exporter import MetricsExporter

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, authorization: Annotated[str | None, Header()] = None) -> Response:
    exporter: MetricsExporter = request.app.state.tuft_metrics
    if not exporter.allowed(authorization):
        raise NotFound("GET /metrics: not found (set metrics_token and send it as a bearer token)")
    body = await run_in_threadpool(exporter.render)
    return Response(body, media_type=exporter.content_type)
