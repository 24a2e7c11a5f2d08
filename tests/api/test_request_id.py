"""X-Request-Id on responses and on the log lines of the request (app/api/request_id.py,
app/logcontext.py), and the JSON log format."""

from __future__ import annotations

import json
import logging

import pytest

from app.logcontext import TEXT_FORMAT, JsonFormatter
from tests.api.helpers import Api


def test_every_response_carries_an_id_and_a_sane_one_is_kept(api: Api) -> None:
    fresh = api.get("/healthz", key=None)
    assert len(fresh.headers["x-request-id"]) == 16
    assert api.get("/healthz", key=None).headers["x-request-id"] != fresh.headers["x-request-id"]
    kept = api.get("/healthz", key=None, headers={"X-Request-Id": "proxy-abc.123"})
    assert kept.headers["x-request-id"] == "proxy-abc.123"
    # Too long, or characters that could forge a log line: replaced, not echoed.
    for bad in ("x" * 65, "a b", "id;rm", 'x"y'):
        replaced = api.get("/healthz", key=None, headers={"X-Request-Id": bad})
        assert replaced.headers["x-request-id"] != bad and len(replaced.headers["x-request-id"]) == 16
    # Refused by a middleware before any route: still stamped.
    assert "x-request-id" in api.get("/api/v1/x%00", key=None).headers


def test_log_lines_of_a_request_carry_its_id(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tuft.api"):
        r = api.get("/api/v1/sessions/no-such-session", headers={"X-Request-Id": "req-42"})
    assert r.status_code == 404 and r.headers["x-request-id"] == "req-42"
    lines = [rec for rec in caplog.records if rec.name == "tuft.api" and "no-such-session" in rec.getMessage()]
    assert lines and all(getattr(rec, "request_id", None) == "req-42" for rec in lines)
    text = logging.Formatter(TEXT_FORMAT).format(lines[0])
    assert "[req-42]" in text


def test_json_lines() -> None:
    record = logging.LogRecord("tuft.api", logging.ERROR, __file__, 1, "op %s failed", ("r1",), None)
    record.request_id = "req-7"
    entry = json.loads(JsonFormatter().format(record))
    assert {k: entry[k] for k in ("level", "logger", "request_id", "message")} == {
        "level": "ERROR",
        "logger": "tuft.api",
        "request_id": "req-7",
        "message": "op r1 failed",
    }
    assert entry["ts"].endswith("+00:00")
