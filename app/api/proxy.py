"""X-Forwarded-Proto / -Host / -For from trusted reverse proxies (docs/deployment.md).

Download links are absolute URLs built from the request (unless `public_base_url` is set), so
behind a proxy they must name the host and scheme the client used, not the upstream name the proxy
dialled (`http://tuft_api/...` with nginx's defaults). The headers are believed only from a peer in
`trusted_proxies`: anyone else could otherwise make the API hand out links to a host of theirs.
uvicorn's own proxy-header support is switched off (app/cli/serve.py) so that this is the one
place that decides; it reads X-Forwarded-Proto and -For only, never -Host.
"""

from __future__ import annotations

import ipaddress
import re

from starlette.types import ASGIApp, Receive, Scope, Send

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# A host[:port] as it may appear in a Host header; anything else in X-Forwarded-Host is ignored.
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?$")


class TrustedProxies:
    def __init__(self, proxies: list[str]) -> None:
        self.any = "*" in proxies
        self.networks: list[Network] = [ipaddress.ip_network(p, strict=False) for p in proxies if p != "*"]

    def trusts(self, host: str | None) -> bool:
        if host is None:
            return False
        if self.any:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.networks)


def _first(value: str) -> str:
    return value.split(",")[0].strip()


class ForwardedHeaders:
    """ASGI middleware: for a request whose peer is a trusted proxy, take the scheme, the Host and
    the client address from the X-Forwarded-* headers it set."""

    def __init__(self, app: ASGIApp, proxies: list[str]) -> None:
        self.app = app
        self.trusted = TrustedProxies(proxies)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            client = scope.get("client")
            if client and self.trusted.trusts(client[0]):
                scope = self._apply(scope)
        await self.app(scope, receive, send)

    def _apply(self, scope: Scope) -> Scope:
        headers: list[tuple[bytes, bytes]] = list(scope.get("headers") or [])
        found = {k.lower(): v.decode("latin-1") for k, v in headers if k.lower().startswith(b"x-forwarded-")}
        scope = dict(scope)
        proto = _first(found.get(b"x-forwarded-proto", "")).lower()
        if proto in ("http", "https"):
            scope["scheme"] = proto if scope["type"] == "http" else {"http": "ws", "https": "wss"}[proto]
        host = _first(found.get(b"x-forwarded-host", ""))
        if host and _HOST.match(host):
            scope["headers"] = [(k, v) for k, v in headers if k.lower() != b"host"] + [(b"host", host.encode())]
        chain = [h.strip() for h in found.get(b"x-forwarded-for", "").split(",") if h.strip()]
        # The client is the last address not itself a trusted proxy (earlier entries are whatever
        # the client chose to send).
        for address in reversed(chain):
            if not self.trusted.trusts(address):
                scope["client"] = (address, 0)
                break
        return scope
