"""GET pages under /dashboard (docs/dashboard.md). Each page is one read-only transaction of
bounded queries (app/dashboard/queries.py), scoped to the viewer's tenant unless it is an admin."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from sqlalchemy.orm import Session as DbSession
from starlette.concurrency import run_in_threadpool
from starlette.responses import HTMLResponse, RedirectResponse, Response

from app.api.state import AppState
from app.dashboard import access, pages, queries
from app.dashboard.access import Viewer
from app.dashboard.metrics import run_metrics
from app.db.engine import db_now

router = APIRouter(prefix="/dashboard", include_in_schema=False)

# The pages have no scripts and load nothing from elsewhere; frames and other sites' forms are out.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


def _html(body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(body, status_code=status, headers=_HEADERS)


def _see(location: str) -> Response:
    # Relative Location: the browser resolves it against the URL it used, prefix included.
    return RedirectResponse(location, status_code=303, headers=_HEADERS)


async def _page(
    request: Request, base: str, title: str, render: Callable[[DbSession, Viewer], tuple[int, str]]
) -> Response:
    viewer = await access.viewer_of(request)
    if viewer is None:
        return _see(f"{base}login")
    state: AppState = request.app.state.tuft

    def work() -> tuple[int, str]:
        with state.db.read() as s:
            return render(s, viewer)

    status, body = await run_in_threadpool(work)
    return _html(pages.layout(base, title, viewer.label, body), status)


@router.get("")
async def root() -> Response:
    return _see("dashboard/")  # relative links need the trailing slash


@router.get("/")
async def runs(request: Request) -> Response:
    def render(s: DbSession, viewer: Viewer) -> tuple[int, str]:
        rows = queries.runs(s, viewer.scope)
        return 200, pages.runs_page("./", rows, db_now(s), queries.RUNS_LIMIT)

    return await _page(request, "./", "Runs", render)


@router.get("/runs/{run_id}")
async def run(request: Request, run_id: str) -> Response:
    def render(s: DbSession, viewer: Viewer) -> tuple[int, str]:
        row = queries.run(s, viewer.scope, run_id)
        if row is None:
            return 404, "<p>No such run (or not yours).</p>"
        metrics = run_metrics(queries.metric_ops(s, run_id), row.optimizer_steps)
        ops = queries.timeline(s, run_id)
        ckpts = queries.checkpoints(s, viewer.scope, run_id)
        return 200, pages.run_page("../", row, metrics, ops, ckpts, db_now(s))

    return await _page(request, "../", f"Run {run_id}", render)


@router.get("/checkpoints")
async def checkpoints(request: Request) -> Response:
    def render(s: DbSession, viewer: Viewer) -> tuple[int, str]:
        rows = queries.checkpoints(s, viewer.scope)
        note = f'<p class="muted">The {queries.CHECKPOINTS_LIMIT} newest are shown.</p>'
        return 200, pages.checkpoint_table("./", rows) + (note if len(rows) >= queries.CHECKPOINTS_LIMIT else "")

    return await _page(request, "./", "Checkpoints", render)


@router.get("/workers")
async def workers(request: Request) -> Response:
    state: AppState = request.app.state.tuft

    def render(s: DbSession, viewer: Viewer) -> tuple[int, str]:
        rows = queries.workers(s)
        held: dict[str, list[str]] = {}
        # A tenant sees the shared workers but only its own runs on them.
        for worker_id, run_id, _ in queries.held_runs(s, viewer.scope, [w.worker_id for w in rows]):
            held.setdefault(worker_id, []).append(run_id)
        return 200, pages.workers_page("./", rows, held, db_now(s), state.settings.lease_ttl_seconds)

    return await _page(request, "./", "Workers", render)


@router.get("/queue")
async def queue(request: Request) -> Response:
    def render(s: DbSession, viewer: Viewer) -> tuple[int, str]:
        groups, capped = queries.queue(s, viewer.scope)
        return 200, pages.queue_page(groups, capped, db_now(s), queries.QUEUE_LIMIT)

    return await _page(request, "./", "Queue", render)


@router.get("/login")
async def login_form() -> Response:
    return _html(pages.login("./"))


@router.post("/login")
async def login(request: Request) -> Response:
    if access.cross_site(request):
        return _html(pages.login("./", "Log in from this dashboard's own page."), 403)
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > access.MAX_LOGIN_BYTES:
            return _html(pages.login("./", "The form is too large."), 413)
    key = (parse_qs(body.decode("utf-8", "replace")).get("key") or [""])[0].strip()
    if not access.cookie_safe(key) or await access.viewer_of(request, key) is None:
        return _html(pages.login("./", "That API key is not valid."), 401)
    response = _see("./")
    access.set_key_cookie(response, request, key)
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    response = _see("login")
    access.clear_key_cookie(response, request)
    return response
