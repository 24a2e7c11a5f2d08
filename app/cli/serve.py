"""Serving: `tuft api` (API only) and `tuft launch` (API + one supervised worker process)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from sqlalchemy.exc import SQLAlchemyError

from app import logcontext
from app.config import ConfigError, Settings, check_exposure, settings_env
from app.db import migrate
from app.db.engine import Database, db_now
from app.queue import leases

log = logging.getLogger("tuft")


def _configure_logging(settings: Settings) -> None:
    logcontext.configure(settings.log_format)
    logging.getLogger().setLevel(settings.log_level.upper())


def _exposure_ok(settings: Settings, command: str) -> bool:
    try:
        check_exposure(settings, command)
    except ConfigError as exc:
        print(f"tuft: {exc}", file=sys.stderr)
        return False
    return True


def _uvicorn(settings: Settings, on_shutdown: Callable[[], None] | None = None) -> None:
    import uvicorn

    from app.api.main import create_app

    # The SDK keeps connections alive between polls; keep them longer than its poll gap.
    uvicorn.run(
        create_app(settings, on_shutdown=on_shutdown),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_keep_alive=75,
        access_log=False,
        # uvicorn's own loggers go to the root handler: the same format (and JSON) as ours.
        log_config=None,
        # X-Forwarded-* are read by our own middleware (app/api/proxy.py, `trusted_proxies`), which
        # must see the proxy's address, not one uvicorn already replaced.
        proxy_headers=False,
    )


def serve_api(settings: Settings, *, run_migrations: bool = False) -> int:
    """API replicas do not migrate by default: several racing migrations is how schemas break.
    Deployments run `tuft db upgrade` once (compose.yaml's migrate service)."""
    _configure_logging(settings)
    if not _exposure_ok(settings, "tuft api"):
        return 2
    url = settings.resolved_database_url()
    if run_migrations:
        settings.resolved_data_dir().mkdir(parents=True, exist_ok=True)
        migrate.safe_upgrade(url)
    # An older schema or a newer one (a newer release migrated it): refuse with a clear message
    # (migrate.SchemaError, exit 2 in app/cli/main.py) rather than serve what this code cannot read.
    migrate.require_current(url, "tuft api")
    _uvicorn(settings)
    return 0


class WorkerSupervisor(threading.Thread):
    """Keeps `launch`'s worker process alive: a crashed worker is restarted (its runs are rebuilt
    from the database by the new process), with a backoff so a broken setup does not spin.

    It is also a watchdog: a worker whose heartbeat is `worker_watchdog_seconds` old is hung or
    paused (SIGSTOP, a frozen VM) and is killed, then restarted like a crashed one. Embedded mode has
    no second worker to take its runs over, and with SQLite a worker paused inside a write
    transaction holds the database's only write lock: without the kill, no op, sweep or API write
    could commit until it resumed. The heartbeat is read on the read engine (WAL readers never wait
    for the writer)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="tuft-worker-supervisor", daemon=True)
        self.settings = settings
        self.stopping = threading.Event()
        self.proc: subprocess.Popen[bytes] | None = None
        watchdog = settings.worker_watchdog_seconds
        self.watchdog_seconds = 2 * settings.lease_ttl_seconds if watchdog is None else watchdog
        self._db: Database | None = None

    def _spawn(self) -> subprocess.Popen[bytes]:
        # The worker arranges to be signalled if this process dies, even by kill -9 (an orphaned
        # worker would keep a GPU's memory while a restarted launch starts another). It does so
        # itself: a preexec_fn is unsafe in this multi-threaded process (the child can deadlock).
        env = {**os.environ, **settings_env(self.settings), "TUFT_DIE_WITH_PARENT": str(os.getpid())}
        return subprocess.Popen([sys.executable, "-m", "workers"], env=env)

    def _database(self) -> Database:
        if self._db is None:
            self._db = Database(self.settings.resolved_database_url(), "launch-watchdog")
        return self._db

    def _db_clock(self) -> float:
        try:
            with self._database().read() as s:
                return db_now(s)
        except SQLAlchemyError:
            return time.time()

    def _heartbeat_age(self, pid: int, spawned_at: float) -> float | None:
        try:
            with self._database().read() as s:
                return leases.heartbeat_age(s, pid, spawned_at - 1.0)
        except SQLAlchemyError:
            return None  # the database is down: that is not the worker's fault

    def _wait(self, proc: subprocess.Popen[bytes], spawned_at: float) -> int:
        """Wait for the worker to exit; kill it once its heartbeat is older than the watchdog."""
        tick = min(1.0, max(0.1, self.watchdog_seconds / 4))
        while True:
            try:
                return proc.wait(timeout=tick)
            except subprocess.TimeoutExpired:
                pass
            if self.stopping.is_set() or self.watchdog_seconds <= 0:
                continue
            age = self._heartbeat_age(proc.pid, spawned_at)
            if age is not None and age > self.watchdog_seconds:
                log.error(
                    "WATCHDOG worker %d has not heartbeat for %.1fs (worker_watchdog_seconds %.1f): killing it",
                    proc.pid,
                    age,
                    self.watchdog_seconds,
                )
                proc.kill()  # SIGKILL also ends a stopped process; its locks go with it

    def run(self) -> None:
        backoff = 1.0
        while not self.stopping.is_set():
            started = time.monotonic()
            spawned_at = self._db_clock()
            self.proc = self._spawn()
            code = self._wait(self.proc, spawned_at)
            if self.stopping.is_set():
                return
            if time.monotonic() - started > 60:
                backoff = 1.0
            log.error("worker exited with code %s; restarting in %.0fs", code, backoff)
            self.stopping.wait(backoff)
            backoff = min(backoff * 2, 30.0)

    def shutdown(self, grace: float = 30.0) -> None:
        self.stopping.set()
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _announce_ready(settings: Settings, stopping: threading.Event) -> None:
    """Log "ready" once /readyz says so (the worker is up and the built-in tokenizer is built),
    not when the port opens: a client that starts on that line gets a tokenizer it can load."""
    import urllib.error
    import urllib.request

    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(settings.host, settings.host)
    netloc = f"[{host}]" if ":" in host else host
    while not stopping.wait(0.5):
        try:
            with urllib.request.urlopen(f"http://{netloc}:{settings.port}/readyz", timeout=5) as reply:
                if reply.status == 200:
                    log.info("TuFT ready on http://%s:%d", settings.host, settings.port)
                    return
        except (urllib.error.URLError, OSError):
            continue  # not listening yet, or 503 while starting


def launch(settings: Settings) -> int:
    _configure_logging(settings)
    if not _exposure_ok(settings, "tuft launch"):
        return 2
    data_dir = settings.resolved_data_dir()
    data_dir.mkdir(parents=True, exist_ok=True)
    url = settings.resolved_database_url()
    migrate.safe_upgrade(url)
    log.info(
        "starting TuFT on http://%s:%d (database %s, data %s)",
        settings.host,
        settings.port,
        migrate.redact(url),
        data_dir,
    )
    supervisor = WorkerSupervisor(settings)
    supervisor.start()
    threading.Thread(target=_announce_ready, args=(settings, supervisor.stopping), daemon=True).start()
    try:
        _uvicorn(settings, on_shutdown=supervisor.shutdown)
    finally:
        supervisor.shutdown()
    return 0
