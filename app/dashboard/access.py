"""Who is looking: the API key from the X-API-Key header (curl, scripts) or from the dashboard's
cookie (a browser, after the login form), resolved to a tenant exactly as for the SDK.

The cookie holds the key itself and is HttpOnly (page scripts cannot read it; the pages have none
anyway), SameSite=Strict (no other site's page can make the browser send it) and Secure when the
request came over https. It carries no Path attribute, so the browser scopes it to the folder of
the login URL, `<prefix>/dashboard`, whatever prefix a reverse proxy adds. Nothing is signed or
kept on the server: every request resolves the key again, so a revoked key stops working within
the key cache's 10 s (app/auth.py). The dashboard is read-only (GET pages), so a forged
cross-site request could change nothing; the login form also refuses cross-site posts."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from app.api.state import AppState
from app.domain.errors import Unauthorized

COOKIE = "tuft_dashboard_key"
# A working day; logging in again only means pasting the key.
COOKIE_MAX_AGE = 8 * 3600
# A key is ~50 characters; the form body has nothing else.
MAX_LOGIN_BYTES = 4096


@dataclass(frozen=True)
class Viewer:
    tenant: str
    admin: bool

    @property
    def scope(self) -> str | None:
        """The tenant the queries are limited to; None for an admin (every tenant)."""
        return None if self.admin else self.tenant

    @property
    def label(self) -> str:
        return f"{self.tenant} (admin: all tenants)" if self.admin else self.tenant


async def viewer_of(request: Request, key: str | None = None) -> Viewer | None:
    state: AppState = request.app.state.tuft
    key = key or request.headers.get("x-api-key") or request.cookies.get(COOKIE)
    if not key:
        return None
    try:
        tenant = await run_in_threadpool(state.keys.tenant_for, key)
    except Unauthorized:
        return None
    return Viewer(tenant, tenant in state.settings.dashboard_admin_tenants)


def cross_site(request: Request) -> bool:
    """A form post from another site's page (browsers send Sec-Fetch-Site on every request)."""
    return request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none")


def set_key_cookie(response: Response, request: Request, key: str) -> None:
    # path=None: the browser's default path is the login URL's folder (RFC 6265 §5.1.4).
    response.set_cookie(
        COOKIE,
        key,
        max_age=COOKIE_MAX_AGE,
        path=None,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def clear_key_cookie(response: Response, request: Request) -> None:
    response.set_cookie(COOKIE, "", max_age=0, path=None, httponly=True, samesite="strict")


def cookie_safe(key: str) -> bool:
    """Keys made by `tuft keys create` are URL-safe base64; a configured key with a character a
    cookie cannot carry must be sent as a header instead."""
    return 0 < len(key) <= 512 and all(c.isascii() and c.isprintable() and c not in ' ;,"\\' for c in key)
