"""Progress of long work (loading a base model, writing a checkpoint) in the logs and to listeners.

A line at the start, one each time another `step` of the work is done or `every` seconds passed
(never one per tensor), and one at the end with the time taken. Listeners (workers/metrics.py's
gauge) get every update; they are plain callables so this module imports nothing of the worker's
transport (the engine stays pure compute).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger("tuft.progress")

# (task kind, what, fraction done in [0, 1]; None once finished, failed or not)
Listener = Callable[[str, str, float | None], None]
_listeners: list[Listener] = []


def add_listener(listener: Listener) -> None:
    """Process-wide, like a logging handler: the worker registers its metrics gauge once."""
    if listener not in _listeners:
        _listeners.append(listener)


def remove_listener(listener: Listener) -> None:
    if listener in _listeners:
        _listeners.remove(listener)


def _notify(kind: str, what: str, fraction: float | None) -> None:
    for listener in list(_listeners):
        try:
            listener(kind, what, fraction)
        except Exception:  # a broken gauge must not fail a model load
            log.exception("progress listener failed")


class Progress:
    """`total` units of work (bytes, usually); `advance` as they are done."""

    def __init__(
        self, kind: str, what: str, total: float, *, level: int = logging.INFO, step: float = 0.2, every: float = 10.0
    ) -> None:
        self.kind, self.what, self.total = kind, what, max(total, 1.0)
        self.level, self.step, self.every = level, step, every
        self.done = 0.0
        self.started = time.monotonic()
        self._last_logged_at = self.started
        self._next_mark = step  # the next fraction that earns a line: step, 2*step, ...
        self._lock = threading.Lock()

    def start(self, detail: str = "") -> None:
        log.log(self.level, "%s %s%s … 0%%", self.kind, self.what, f" ({detail})" if detail else "")
        _notify(self.kind, self.what, 0.0)

    def advance(self, amount: float, stage: str = "") -> None:
        with self._lock:
            self.done = min(self.total, self.done + amount)
            fraction = self.done / self.total
            now = time.monotonic()
            due = fraction >= self._next_mark - 1e-9 or now - self._last_logged_at >= self.every
            if due and fraction < 1.0:
                self._last_logged_at = now
                while self._next_mark <= fraction + 1e-9:
                    self._next_mark += self.step
                stage_text = f" {stage}" if stage else ""
                log.log(self.level, "%s %s%s … %d%%", self.kind, self.what, stage_text, fraction * 100)
        _notify(self.kind, self.what, fraction)

    def beat(self, stage: str) -> None:
        """A line for a stage whose progress cannot be measured (e.g. reading weights): still alive."""
        log.log(self.level, "%s %s: %s, %.0f s", self.kind, self.what, stage, time.monotonic() - self.started)

    def finish(self, detail: str = "") -> None:
        seconds = time.monotonic() - self.started
        detail_text = f" ({detail})" if detail else ""
        log.log(self.level, "%s %s … 100%% in %.1f s%s", self.kind, self.what, seconds, detail_text)
        _notify(self.kind, self.what, None)

    def failed(self) -> None:
        _notify(self.kind, self.what, None)


@contextmanager
def heartbeat(progress: Progress, stage: str) -> Iterator[None]:
    """Log `stage` every `progress.every` seconds while the body runs (work with no progress hook)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(progress.every):
            progress.beat(stage)

    thread = threading.Thread(target=beat, name="tuft-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def size_text(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.1f} GB"
