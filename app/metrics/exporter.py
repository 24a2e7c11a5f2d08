"""What the API process serves: the registry for GET /metrics, and the optional unauthenticated
listener on metrics_port (docs/metrics.md "Access")."""

from __future__ import annotations

import hmac
import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest, start_http_server

from app.config import Settings
from app.db.engine import Database
from app.metrics.collector import build_registry

log = logging.getLogger("tuft.metrics")


class MetricsExporter:
    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.registry = build_registry(
            db, lease_ttl=settings.lease_ttl_seconds, cache_seconds=settings.metrics_cache_seconds
        )
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    content_type = CONTENT_TYPE_LATEST

    def render(self) -> bytes:
        """The exposition text (runs the database queries unless cached: call it off the loop)."""
        return generate_latest(self.registry)

    def allowed(self, authorization: str | None) -> bool:
        """Whether a request to /metrics on the API port may read it: only with the metrics token."""
        token = self.settings.metrics_token
        if not token or not authorization:
            return False
        scheme, _, given = authorization.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())

    def start(self) -> None:
        port = self.settings.metrics_port
        if port is None:
            return
        self._server, self._thread = start_http_server(port, addr=self.settings.metrics_host, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics (no authentication)", self.settings.metrics_host, port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
