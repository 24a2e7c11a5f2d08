"""Audit log and usage for AdminClient and `tinker billing` (tinker-protocol.md §5.2;
docs/audit-and-usage.md). Each caller sees its own tenant's rows only; TuFT has no admin roles, so
every key may read its own tenant's log and usage.

- `GET /api/v1/audit?event_type=&day=` -> `{"entries": [...]}` (AuditLogResponse), plus
  `next_cursor` for the page after (the SDK sends no cursor: it gets the first page).
- `GET /api/v1/billing/usage/events?starting_on=&ending_before=` -> BillingUsageResponse.
- `GET /api/v1/billing/usage/checkpoints/current?project_id=` -> CurrentCheckpointStorageUsageResponse.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from datetime import UTC, date, datetime, timedelta
from typing import Any

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from app.api.deps import State, Tenant
from app.api.routes.sessions import PROJECT_ID
from app.domain.errors import InvalidInput
from app.queue import audit_log, usage_report
from app.queue.audit_log import Cursor

router = APIRouter()

# The SDK cannot page the audit log, so its one request gets up to this many entries.
AUDIT_MAX_LIMIT = 1000
USAGE_MAX_LIMIT = 10_000
# The SDK's documented window bound (GetBillingUsageRequest.ending_before).
USAGE_MAX_WINDOW = timedelta(days=14)
_GIGABYTE = 10**9


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def _limit(limit: int, most: int) -> int:
    if limit < 1:
        raise InvalidInput(f"limit must be at least 1, got {limit}")
    return min(limit, most)  # larger asks are served at the bound, as the checkpoint listings do


def _day(day: str | None) -> tuple[float, float]:
    if day is None:
        start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    else:
        try:
            if len(day) != 10:
                raise ValueError(day)
            start = datetime.combine(date.fromisoformat(day), datetime.min.time(), UTC)
        except ValueError:
            raise InvalidInput(f"day must be a date YYYY-MM-DD (UTC), got {day[:40]!r}") from None
    return start.timestamp(), (start + timedelta(days=1)).timestamp()


def _cursor_text(cursor: Cursor) -> str:
    raw = json.dumps([cursor.timestamp, cursor.source, cursor.key]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _parse_cursor(text: str | None) -> Cursor | None:
    if text is None:
        return None
    try:
        if len(text) > 400:
            raise ValueError("too long")
        ts, source, key = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        if not isinstance(ts, float | int) or not isinstance(source, int) or not isinstance(key, str):
            raise ValueError("bad types")
        if not 0 <= source <= 4 or (source == 3 and not key.isdigit()):
            raise ValueError("bad source")
        return Cursor(float(ts), source, key)
    except (ValueError, TypeError, binascii.Error):
        raise InvalidInput("cursor is not one this server returned (pass next_cursor back unchanged)") from None


@router.get("/api/v1/audit")
async def audit(
    state: State,
    tenant: Tenant,
    event_type: str = "all",
    day: str | None = None,
    limit: int = AUDIT_MAX_LIMIT,
    cursor: str | None = None,
) -> dict[str, Any]:
    if event_type not in audit_log.SOURCES:
        raise InvalidInput(f"event_type must be one of {', '.join(audit_log.SOURCES)}; got {event_type[:40]!r}")
    start, end = _day(day)
    size, after = _limit(limit, AUDIT_MAX_LIMIT), _parse_cursor(cursor)

    def work() -> tuple[list[audit_log.Entry], Cursor | None]:
        with state.db.read() as s:
            return audit_log.read_page(s, tenant, event_type, start, end, size, after)

    entries, more = await run_in_threadpool(work)
    return {
        "entries": [
            {
                "timestamp": _iso(e.timestamp),
                "event": e.event,
                "event_details": e.details,
                "model_id": e.model_id,
                "tinker_path": e.tinker_path,
            }
            for e in entries
        ],
        "next_cursor": _cursor_text(more) if more else None,
    }


def _hour_aligned(name: str, text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(f"{name} must be an RFC 3339 time such as 2026-07-13T00:00:00Z, got {text[:40]!r}") from None
    when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    if (when.minute, when.second, when.microsecond) != (0, 0, 0):
        raise InvalidInput(f"{name} must be aligned to a UTC hour boundary, got {text[:40]!r}")
    return when


@router.get("/api/v1/billing/usage/events")
async def usage_events(
    state: State, tenant: Tenant, starting_on: str, ending_before: str, limit: int = USAGE_MAX_LIMIT
) -> dict[str, Any]:
    start, end = _hour_aligned("starting_on", starting_on), _hour_aligned("ending_before", ending_before)
    if end <= start:
        raise InvalidInput("ending_before must be after starting_on")
    if end - start > USAGE_MAX_WINDOW:
        raise InvalidInput("ending_before must be at most 14 days after starting_on")
    if start.timestamp() > time.time():
        raise InvalidInput("starting_on must not be in the future")
    size = _limit(limit, USAGE_MAX_LIMIT)

    def work() -> tuple[list[usage_report.Bucket], bool, dict[str, dict[str, Any]]]:
        with state.db.read() as s:
            found, more = usage_report.buckets(s, tenant, start.timestamp(), end.timestamp(), size)
            sessions = {b.session_id for b in found if b.session_id}
            return found, more, usage_report.session_metadata(s, tenant, sessions)

    found, more, metadata = await run_in_threadpool(work)
    return {
        "data": [_usage_event(tenant, b) for b in found],
        "sessions": {
            sid: {"user_metadata": {str(k): str(v) for k, v in meta.items()} or None} for sid, meta in metadata.items()
        },
        "cost_data_through": None,
        # Extra keys the SDK ignores: the report was cut at `limit` buckets; narrow the window.
        "truncated": more,
    }


def _usage_event(tenant: str, b: usage_report.Bucket) -> dict[str, Any]:
    if b.usage == "checkpoint":
        info: dict[str, Any] = {"type": "checkpoint", "count": b.quantity}
    elif b.usage == "sampling_prefill":
        info = {"type": "sampling_prefill", "cached": False, "token_count": b.quantity}
    else:
        info = {"type": b.usage, "token_count": b.quantity}
    return {
        "bucket_start": _iso(b.hour * usage_report.HOUR),
        "bucket_end": _iso((b.hour + 1) * usage_report.HOUR),
        "base_model": b.base_model,
        "user_id": tenant,
        "user_name": tenant,
        "session_id": b.session_id,
        "project_id": PROJECT_ID,
        "estimated_cost_usd": None,  # TuFT has no prices
        "event_info": info,
    }


@router.get("/api/v1/billing/usage/checkpoints/current")
async def checkpoint_storage(state: State, tenant: Tenant, project_id: str | None = None) -> dict[str, Any]:
    if project_id is not None and project_id != PROJECT_ID:
        raise InvalidInput(
            f"unknown project {project_id[:80]!r}: this server has one project per tenant, {PROJECT_ID!r}"
        )

    def work() -> tuple[int, int]:
        with state.db.read() as s:
            return usage_report.checkpoint_storage(s, tenant)

    count, size = await run_in_threadpool(work)
    item = {
        "project_id": PROJECT_ID,
        "org_user_urn": tenant,
        "user_email": None,
        "user_name": tenant,
        "checkpoint_count": count,
        "size_bytes": size,
        "size_gigabytes": size / _GIGABYTE,
        "estimated_monthly_cost_usd": None,
    }
    return {"effective_rate_usd_per_gigabyte_month": None, "data": [item] if count else []}
