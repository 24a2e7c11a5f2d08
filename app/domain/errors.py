"""Domain errors carry a meaning and a Tinker error category, never an HTTP status.

app/wire/errors.py is the one place that maps them onto the wire (a 4xx JSON body for a rejected
request, `200 {"error", "category"}` for a failed future).
"""

from __future__ import annotations

from typing import Literal

Category = Literal["user", "server", "unknown"]


class DomainError(Exception):
    category: Category = "user"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(DomainError):
    """The request is well-formed but its content is unusable (bad token ids, shapes, names...)."""


class MalformedRequest(DomainError):
    """The request body cannot be parsed at all."""


class NotFound(DomainError):
    """Unknown id, or an id that belongs to another tenant (never confirm foreign ids)."""


class Conflict(DomainError):
    """A seq_id reused with a different body, or a name that already exists."""


class PayloadTooLarge(DomainError):
    pass


class Unauthorized(DomainError):
    pass


class SessionFinished(DomainError):
    """The session was finished; the SDK stops heartbeating on the 410 this maps to."""


class ResultExpired(DomainError):
    """The result was delivered and then dropped after the retention period."""


class ServerError(DomainError):
    category: Category = "server"
