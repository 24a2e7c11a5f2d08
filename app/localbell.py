"""A doorbell without a broker, for workers on the API's own host (`tuft launch`, or any setup
without Redis): each worker listens on a localhost UDP port and announces it in a small file under
`<data_dir>/wake/`; the API sends one datagram to every worker of its host after a commit.

Best effort like every ring (app/doorbell.py): a lost datagram, a stale file or a missing folder
costs only the worker's poll tick (`worker_poll_seconds`, 0.1 s). Without it, a client that waits
for each result found the worker asleep for half a tick on average at every op (docs/performance.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from pathlib import Path

log = logging.getLogger(__name__)

_SUFFIX = ".port"  # a worker's port: the API rings it after committing an op
API_SUFFIX = ".api"  # an API's port: a worker rings it after committing a result (issue 11)


def bell_dir(data_dir: Path) -> Path:
    return data_dir / "wake"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: not ours to judge
    return True


class BellSender:
    """The API's side: one datagram to each worker listening on this host (or, with
    suffix=API_SUFFIX, a worker's side: one to each API of this host)."""

    def __init__(self, folder: Path, suffix: str = _SUFFIX) -> None:
        self.folder = folder
        self.suffix = suffix
        self.host = socket.gethostname()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._ports: dict[str, int | None] = {}  # file name -> port (None: another host's worker)
        self._lock = threading.Lock()  # request threads and the sweeper ring concurrently

    def ring(self) -> int:
        """How many workers were rung."""
        try:
            names = [e.name for e in os.scandir(self.folder) if e.name.endswith(self.suffix)]
        except OSError:
            return 0
        rung = 0
        with self._lock:
            for name in names:
                if name not in self._ports:
                    self._ports[name] = self._read(name)
                port = self._ports[name]
                if port is None:
                    continue
                with contextlib.suppress(OSError):  # a worker gone since: nobody reads it
                    self._sock.sendto(b"\x01", ("127.0.0.1", port))
                    rung += 1
            for gone in set(self._ports) - set(names):
                del self._ports[gone]
        return rung

    def _read(self, name: str) -> int | None:
        try:
            host, _pid, port = (self.folder / name).read_text().split()
        except (OSError, ValueError):
            return None
        return int(port) if host == self.host else None

    def close(self) -> None:
        self._sock.close()


class BellListener:
    """The worker's side: sets `wake` on every datagram. A file names its port (written once, by
    rename, so the API never reads half of one); files of dead workers of this host are removed."""

    def __init__(self, folder: Path, wake: threading.Event) -> None:
        self.folder = folder
        self.wake = wake
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self.host = socket.gethostname()
        self.file = folder / f"{self.host}-{os.getpid()}-{self.port}{_SUFFIX}"
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="tuft-localbell", daemon=True)

    def start(self) -> BellListener:
        announce(self.file, self.port)
        self._thread.start()
        return self

    def _listen(self) -> None:
        while not self._closed.is_set():
            try:
                self._sock.recv(64)
            except OSError:
                return  # closed
            self.wake.set()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self.file.unlink()
        # Unblocks recv(): shutdown on a UDP socket is refused on some systems, so send a last
        # datagram to ourselves before closing.
        with contextlib.suppress(OSError):
            self._sock.sendto(b"", ("127.0.0.1", self.port))
        self._thread.join(timeout=2)
        self._sock.close()


def announce(file: Path, port: int) -> None:
    """Name `port` in `file` (by rename: a reader never sees half of it), after removing the files
    of this host's dead processes with the same suffix."""
    file.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    for path in file.parent.glob(f"*{file.suffix}"):
        with contextlib.suppress(OSError, ValueError):
            other_host, pid, _port = path.read_text().split()
            if other_host == host and not _alive(int(pid)):
                path.unlink()
    tmp = file.with_suffix(".tmp")
    tmp.write_text(f"{host} {os.getpid()} {port}\n")
    tmp.replace(file)


def listen(data_dir: Path, wake: threading.Event) -> BellListener | None:
    """Start a worker's listener; None (the poll tick alone, with a warning) if it cannot."""
    try:
        return BellListener(bell_dir(data_dir), wake).start()
    except OSError as exc:
        log.warning("no local wake-up (%s); the worker polls every worker_poll_seconds", exc)
        return None
