"""Domain errors -> HTTP (tinker-protocol.md §1.6, §3.4).

This is the only module that knows statuses. Two shapes exist:

- a rejected request: a 4xx/5xx with a JSON body. It must never be empty: the SDK treats a bare
  400 without a body as an injected Cloudflare error and retries it as a connection error (§0.13);
- a failed future: HTTP 200 with `{"error", "category"}` (`failed_future_body`), because any other
  4xx on `retrieve_future` is a fatal `ValueError` rather than a `RequestFailedError` (§3.4).
"""

from __future__ import annotations

import re
from typing import Any

from app.domain.errors import (
    Conflict,
    DomainError,
    InvalidInput,
    MalformedRequest,
    NotFound,
    PayloadTooLarge,
    ResultExpired,
    ServerError,
    SessionFinished,
    Unauthorized,
)
from app.wire.responses import failed_future_body

# Most specific first, should a subclass ever extend another.
_STATUS: tuple[tuple[type[DomainError], int], ...] = (
    (InvalidInput, 400),
    (MalformedRequest, 400),
    (Unauthorized, 401),
    (NotFound, 404),
    (Conflict, 409),  # the SDK retries 409 (§1.6); used for a seq_id reused with another body
    (SessionFinished, 410),  # stops the heartbeat loop (§2.5)
    (ResultExpired, 410),  # "promise expired": a sample is re-submitted, a training future fails (§3.4)
    (PayloadTooLarge, 413),
    (ServerError, 500),
)


def http_status_for(err: DomainError) -> int:
    for cls, status in _STATUS:
        if isinstance(err, cls):
            return status
    return 500 if err.category == "server" else 400


def error_code(err: DomainError) -> str:
    """`InvalidInput` -> "invalid_input"."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(err).__name__).lower()


def error_body(err: DomainError) -> dict[str, Any]:
    message = err.message or error_code(err).replace("_", " ")
    return {"error": error_code(err), "message": message, "category": err.category, "detail": message}


def failed_future_body_for(err: DomainError) -> dict[str, Any]:
    """A failed future carrying a domain error (HTTP 200, §3.3)."""
    return failed_future_body(err.message, err.category)
