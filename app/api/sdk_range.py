"""Which `tinker` SDK versions this server serves, and how a request says which one it is.

Every SDK version from 0.25 to 0.38 is tested against this server (`make test`, docs/compatibility.md).
Older clients speak another wire format (0.24 sends `forward_backward` as JSON, which this
protobuf-only server rejects, and the run's later ops then wait forever for that seq_id), so they
are refused at `create_session`, where the SDK raises the message to the caller before anything is
queued.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

Version = tuple[int, int]

OLDEST_SUPPORTED: Version = (0, 25)
NEWEST_TESTED: Version = (0, 38)
# The first SDK whose Checkpoint model accepts checkpoint_type "external" (types/checkpoint.py).
# Older ones reject a whole listing that holds one, so they are not shown them.
EXTERNAL_LISTED_FROM: Version = (0, 28)

_VERSION = re.compile(r"(\d{1,6})\.(\d{1,6})")
_UA_VERSION = re.compile(r"Tinker/Python (\d{1,6}\.\d{1,6})")


def parse(raw: object) -> Version | None:
    """`"0.38.0"` -> (0, 38); None for anything that does not start with `<major>.<minor>`."""
    if not isinstance(raw, str):
        return None
    match = _VERSION.match(raw.strip())
    return (int(match[1]), int(match[2])) if match else None


def from_headers(headers: Mapping[str, str]) -> Version | None:
    """The caller's SDK version from its headers: 0.38 sends x-sdk-version inside public calls;
    every Stainless client sends X-Stainless-Package-Version and a User-Agent `AsyncTinker/Python <v>`."""
    match = _UA_VERSION.search(headers.get("user-agent", ""))
    for raw in (headers.get("x-sdk-version"), headers.get("x-stainless-package-version"), match and match[1]):
        version = parse(raw)
        if version is not None:
            return version
    return None


def _name(version: Version) -> str:
    return f"{version[0]}.{version[1]}"


SUPPORTED_RANGE = f"{_name(OLDEST_SUPPORTED)} to {_name(NEWEST_TESTED)}"


def refusal(raw_version: str | None) -> str | None:
    """The message refusing a session to a client too old to work, or None (served). A client that
    names no version (raw HTTP) is served."""
    version = parse(raw_version)
    if version is None or version >= OLDEST_SUPPORTED:
        return None
    return (
        f"tinker SDK {raw_version} is not supported by this server, which serves tinker {SUPPORTED_RANGE}: "
        f"upgrade with `pip install 'tinker>={_name(OLDEST_SUPPORTED)}'`"
    )


def warning(raw_version: str | None) -> str | None:
    """A note for a client newer than any tested here (it is served; the SDK logs the note)."""
    version = parse(raw_version)
    if version is None or version <= NEWEST_TESTED:
        return None
    return f"tinker SDK {raw_version} is newer than this server has been tested with ({SUPPORTED_RANGE})"
