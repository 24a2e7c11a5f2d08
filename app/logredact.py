"""Download link tokens never reach a log line (docs/downloads.md).

A signed link is a bearer credential until it expires, and its token sits in the URL path
(`/api/v1/downloads/<token>/<file>`). Any log line that carries the path (uvicorn's access log, our
error handlers' `GET <path> -> 404`, a traceback's message) would leak it to whoever reads logs.
Rather than trust every call site, the process's log record factory rewrites each record's
message and arguments as it is created, whatever logger or handler emits it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

_TOKEN = re.compile(r"(/api/v1/downloads/)[^/\s?#\"']+")
REDACTED = r"\1<redacted>"
_installed = False


def redact(text: str) -> str:
    return _TOKEN.sub(REDACTED, text)


def _redact_arg(arg: Any) -> Any:
    if isinstance(arg, str):
        return redact(arg)
    if isinstance(arg, (int, float, bool)) or arg is None:
        return arg
    text = str(arg)
    cleaned = redact(text)
    # Keep the object (a format like %d may need it) unless its text held a token.
    return cleaned if cleaned != text else arg


def _clean(record: logging.LogRecord) -> None:
    if isinstance(record.msg, str):
        record.msg = redact(record.msg)
    if isinstance(record.args, tuple):
        # Element by element: uvicorn's access formatter reads its arguments by position.
        record.args = tuple(_redact_arg(a) for a in record.args)
    elif isinstance(record.args, Mapping):
        record.args = {k: _redact_arg(v) for k, v in record.args.items()}


def install() -> None:
    """Wrap the log record factory once per process (idempotent)."""
    global _installed
    if _installed:
        return
    previous: Callable[..., logging.LogRecord] = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        _clean(record)
        return record

    logging.setLogRecordFactory(factory)
    _installed = True
