"""Checks every JSON request body passes before a wire model sees it (docs/robustness.md).

Whatever a field's type, a few values can never be meant and would only fail later, deep in the
database driver, as a 5xx that the SDK retries forever (tinker-protocol.md §1.6): PostgreSQL text
cannot hold NUL, UTF-8 cannot encode a lone surrogate (JSON's `"\\ud800"`), no column or library
takes an integer wider than 64 bits, and a body nested thousands deep overflows the parser's stack.
They are refused here, once, with the path of the offending value, as `InvalidInput` (a 400, or a
failed future for a training op whose model and seq can still be read).
"""

from __future__ import annotations

import json
import re
from typing import Any

from app.domain.errors import InvalidInput, MalformedRequest

# No SDK body nests beyond 4 levels; free-form metadata gets plenty of room.
MAX_DEPTH = 64
# Signed int64 for counters and ids, unsigned 64-bit for seeds (torch takes either range).
INT_MIN = -(2**63)
INT_MAX = 2**64 - 1
_SURROGATE = re.compile("[\ud800-\udfff]")


def loads(body: bytes | str) -> Any:
    """Parse a JSON body and check every value in it; raise a domain error naming the problem."""
    try:
        value = json.loads(body or b"{}")
    except RecursionError:
        # The C decoder stops at the interpreter's recursion limit (~1000): cheap, but a 500
        # unless caught.
        raise MalformedRequest(f"request body nests deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedRequest(f"request body is not valid JSON: {exc}") from exc
    check(value)
    return value


def check(value: Any) -> None:
    """Depth, NUL, surrogates and 64-bit integers, for every key and value (iterative: a deep body
    must not overflow this walk either). Paths are built only for containers and errors."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        node, path = stack.pop()
        if len(path) >= MAX_DEPTH:
            raise MalformedRequest(f"request body nests deeper than {MAX_DEPTH} levels (at {_where(path)})")
        items: Any
        if isinstance(node, dict):
            items = node.items()
            for key in node:
                _check_str(key, path, key)
        elif isinstance(node, list):
            items = enumerate(node)
        else:
            _check_scalar(node, path[:-1], path[-1] if path else None)
            continue
        for key, child in items:
            if isinstance(child, dict | list):
                stack.append((child, (*path, key)))
            else:
                _check_scalar(child, path, key)


def _check_scalar(value: Any, parent: tuple[str | int, ...], key: str | int | None) -> None:
    if isinstance(value, str):
        _check_str(value, parent, key)
    elif isinstance(value, int) and not isinstance(value, bool) and not INT_MIN <= value <= INT_MAX:
        where = _where((*parent, key) if key is not None else parent)
        raise InvalidInput(f"{where}: the integer {_short(value)} does not fit in 64 bits")


def _check_str(value: str, parent: tuple[str | int, ...], key: str | int | None) -> None:
    if "\x00" in value:
        where = _where((*parent, key) if key is not None else parent)
        raise InvalidInput(f"{where}: must not contain NUL characters (\\u0000)")
    if not value.isascii() and _SURROGATE.search(value):
        where = _where((*parent, key) if key is not None else parent)
        raise InvalidInput(f"{where}: contains an unpaired UTF-16 surrogate, which is not valid Unicode")


def _where(path: tuple[str | int, ...]) -> str:
    if not path:
        return "body"
    text = ".".join(str(p) for p in path)
    return text if len(text) <= 200 else text[:200] + "..."


def _short(value: int) -> str:
    # str() of a huge int is itself slow (and capped at 4300 digits by Python).
    return str(value) if value.bit_length() < 256 else f"of {value.bit_length()} bits"
