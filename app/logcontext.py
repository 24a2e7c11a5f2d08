"""Request ids in log lines, and JSON logs on request (setting log_format; docs/metrics.md "Logs").

Every HTTP request gets an id: the client's `X-Request-Id` when it sends a sane one (a proxy that
already stamps requests keeps its id end to end), else a fresh one. It is echoed in the response's
`X-Request-Id` and set on every log record created while the request is handled, handlers run in
the thread pool included (anyio copies the context into its threads). Records from elsewhere (the
sweeper, start-up, workers) carry "-". The id rides on the log record factory, like
app/logredact.py, so every logger and formatter sees it without each call site passing it. The
middleware that sets it is app/api/request_id.py (this module stays stdlib-only: workers use it).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

REQUEST_ID: ContextVar[str] = ContextVar("tuft_request_id", default="-")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
_installed = False


def install_record_factory() -> None:
    """Give every log record a request_id attribute (idempotent, once per process)."""
    global _installed
    if _installed:
        return
    previous: Callable[..., logging.LogRecord] = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record.request_id = REQUEST_ID.get()
        return record

    logging.setLogRecordFactory(factory)
    _installed = True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, request_id, message (and exc when any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _with_request_id(record: logging.LogRecord) -> bool:
    if not hasattr(record, "request_id"):
        record.request_id = REQUEST_ID.get()
    return True


def configure(log_format: str) -> None:
    """The process's root handler: text lines with the request id, or JSON lines."""
    install_record_factory()
    handler = logging.StreamHandler()
    # A record made without the factory (logging.makeLogRecord, a library's own) still formats.
    handler.addFilter(_with_request_id)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
