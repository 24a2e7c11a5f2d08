"""Deterministic crash points for the fault tests (reliability-design.md §5.1).

A signal sent from outside cannot hit "after the result was computed, before it was committed";
a named point in the code can. TUFT_FAULT lists points as `point:action[:skip[:times]]`, comma
separated: let `skip` hits pass, then fire `times` times (default 0 and 1). Hits are counted in
files under TUFT_FAULT_STATE, so a worker restarted after a crash does not crash again (unless
`times` says so: that is how a poison op is made). Unset, every call is a dictionary lookup.

Actions: `exit` (os._exit(137), as kill -9 leaves things), `stop` (SIGSTOP itself: a paused or
partitioned zombie), `enospc` (raise OSError(ENOSPC): a full disk), `device_fatal` and `oom` (raise
the engine's DeviceFatal / OutOfMemory: a sticky CUDA error, a device out of memory).

In-process tests may also attach a callable to a point (`set_hook`): it runs at every hit, e.g. to
cut the database's connections at the moment an op is about to read it.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def _parse(spec: str) -> dict[str, tuple[str, int, int]]:
    points: dict[str, tuple[str, int, int]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        fields = item.split(":")
        name, action = fields[0], fields[1] if len(fields) > 1 else "exit"
        skip = int(fields[2]) if len(fields) > 2 else 0
        times = int(fields[3]) if len(fields) > 3 else 1
        points[name] = (action, skip, times)
    return points


_POINTS = _parse(os.environ.get("TUFT_FAULT", ""))
_STATE = Path(os.environ.get("TUFT_FAULT_STATE", "/tmp/tuft-faults"))
_HOOKS: dict[str, Callable[[], None]] = {}


def set_hook(name: str, hook: Callable[[], None] | None) -> None:
    """Run `hook` at every hit of point `name` (None removes it). For in-process tests only."""
    if hook is None:
        _HOOKS.pop(name, None)
    else:
        _HOOKS[name] = hook


def _hit(name: str) -> int:
    """Count one more hit of `name` (across processes) and return the new count."""
    _STATE.mkdir(parents=True, exist_ok=True)
    path = _STATE / name
    count = int(path.read_text() or 0) + 1 if path.exists() else 1
    path.write_text(str(count))
    return count


def fault(name: str) -> None:
    hook = _HOOKS.get(name)
    if hook is not None:
        hook()
    spec = _POINTS.get(name)
    if spec is None:
        return
    action, skip, times = spec
    count = _hit(name)
    if not skip < count <= skip + times:
        return
    log.warning("FAULT %s: %s (hit %d)", name, action, count)
    if action == "exit":
        os._exit(137)
    elif action == "stop":
        # Directed at this thread, so that this thread takes the stop on its way out of the call:
        # a process-directed SIGSTOP may be taken by another thread, and under load this one runs
        # on past the point meanwhile. Either way the whole process stops.
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, f"injected: no space left on device ({name})")
    elif action in ("device_fatal", "oom"):
        # Imported here: the engine brings in torch, which the other actions do not need.
        from workers.engine.errors import DeviceFatal, OutOfMemory

        if action == "oom":
            raise OutOfMemory(f"injected: CUDA out of memory ({name})")
        raise DeviceFatal(f"injected: CUDA error: an illegal memory access was encountered ({name})")
