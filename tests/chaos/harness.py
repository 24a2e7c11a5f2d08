"""Live TuFT clusters for fault injection: real processes, started the way users start them, that a
test can kill -9, stop, restart and read back.

Two modes (reliability-design.md §5.1):

* ``embedded``: ``tuft launch`` (API + sweeper + one supervised worker, SQLite, no broker). The
  worker is the launch process's child; the supervisor restarts it when it dies.
* ``distributed``: ``tuft db upgrade`` once, then ``tuft api`` and one or more separate
  ``tuft worker --device cpu`` processes on PostgreSQL + Redis (Celery doorbell).

Faults: ``TUFT_FAULT`` / ``TUFT_FAULT_STATE`` in the environment of the process to fault
(workers/faults.py), SIGKILL / SIGSTOP / SIGCONT of any process, Redis restart and flush, PostgreSQL
restart. Every helper that takes a shared service down brings it back in ``finally`` and waits
until it answers, because other tests share those services.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

REPO = Path(__file__).resolve().parents[2]
TUFT = [sys.executable, "-m", "app.cli.main"]
API_KEY = "tml-local-dev-key"
PG_ADMIN_URL = os.environ.get("TUFT_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TUFT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

# Short timeouts so that recovery takes seconds (reliability-design.md §5.1).
CHAOS_SETTINGS: dict[str, Any] = {
    "lease_ttl_seconds": 2.0,
    "heartbeat_seconds": 0.3,
    "sweep_interval_seconds": 0.5,
    "worker_poll_seconds": 0.05,
    "snapshot_every_ops": 4,
    "snapshot_every_seconds": 3600.0,
    "max_op_attempts": 3,
    "poison_policy": "continue",
    # Keep results forever: the checker compares them with the reference run's.
    "result_retention_seconds": 0,
}

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T], timeout: float, what: str, interval: float = 0.05, on_timeout: Callable[[], str] = str
) -> T:
    """Poll `condition` until it returns something truthy; return that value."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
        except Exception as exc:  # a service restarting: try again
            last_exc = exc
        else:
            if value:
                return value
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_exc!r})\n{on_timeout()}"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUFT_")}
    env.update({"PYTHONUNBUFFERED": "1", "TINKER_TELEMETRY": "0"})
    env.update(extra or {})
    return env


def proc_state(pid: int) -> str | None:
    """The one-letter state of a process (R, S, T = stopped, Z...), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int) -> bool:
    state = proc_state(pid)
    return state is not None and state not in ("Z", "X")


def children(pid: int) -> list[int]:
    """Direct children of a process, from /proc (psutil is not installed)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def sql_engine(url: str) -> Engine:
    # NullPool: no connection outlives a query, so a PostgreSQL restart leaves nothing stale.
    return create_engine(url, poolclass=NullPool)


# ---- shared services ---------------------------------------------------------------------------


def _run(cmd: list[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=timeout)


def redis_ping() -> bool:
    return _run(["redis-cli", "ping"], check=False, timeout=5).stdout.strip() == "PONG"


def redis_start() -> None:
    if redis_ping():
        return
    Path("/var/lib/redis").mkdir(parents=True, exist_ok=True)
    Path("/var/log/redis").mkdir(parents=True, exist_ok=True)
    _run(
        [
            "redis-server",
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1",
            "-::1",
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            "/var/lib/redis",
            "--logfile",
            "/var/log/redis/ci.log",
        ]
    )
    wait_for(redis_ping, 30, "redis to answer")


def redis_stop() -> None:
    _run(["redis-cli", "shutdown", "nosave"], check=False, timeout=10)
    wait_for(lambda: not redis_ping(), 30, "redis to stop")


@contextlib.contextmanager
def redis_down() -> Iterator[None]:
    """Redis stopped (all its data gone: no persistence) for the duration of the block."""
    try:
        redis_stop()
        yield
    finally:
        redis_start()


def redis_flush() -> None:
    _run(["redis-cli", "flushall"])


def pg_ping() -> bool:
    try:
        with sql_engine(PG_ADMIN_URL).connect() as conn:
            return conn.execute(text("select 1")).scalar() == 1
    except Exception:
        return False


def _pg_ctl(action: str) -> None:
    cmd = ["pg_ctlcluster", "--skip-systemctl-redirect", "15", "main", action]
    if action in ("restart", "stop"):
        cmd += ["-m", "immediate"]
    _run(cmd, check=False, timeout=120)


def pg_start() -> None:
    if not pg_ping():
        _pg_ctl("start")
    wait_for(pg_ping, 60, "postgres to answer")


@contextlib.contextmanager
def pg_down() -> Iterator[None]:
    """PostgreSQL stopped (`-m immediate`: a crash as far as clients can tell) for the block."""
    try:
        _pg_ctl("stop")
        wait_for(lambda: not pg_ping(), 30, "postgres to stop")
        yield
    finally:
        pg_start()


def pg_restart() -> None:
    """Immediate restart (a crash as far as clients can tell); returns once it answers again."""
    try:
        _pg_ctl("restart")
    finally:
        if not pg_ping():
            _pg_ctl("start")
        wait_for(pg_ping, 60, "postgres to answer")


@contextlib.contextmanager
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database, dropped afterwards (like tests/conftest.py::pg_url)."""
    name = f"tuft_chaos_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN_URL.rpartition("/")[0] + f"/{name}"
    finally:
        wait_for(pg_ping, 60, "postgres to answer before dropping the test database")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# ---- the cluster -------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None and alive(self.pid)


@dataclass
class Cluster:
    """One TuFT deployment under test. `mode` is "embedded" or "distributed"."""

    root: Path
    mode: str
    database_url: str | None = None
    redis_url: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    api: Proc | None = None
    workers: dict[str, Proc] = field(default_factory=dict)
    # Derived files (the built tokenizer) copied into data_dir/cache: saves seconds per start.
    seed_cache: Path | None = None
    _db: Engine | None = None
    _worker_faults: dict[str, str | None] = field(default_factory=dict)
    _supervisor: threading.Thread | None = None
    _supervising: threading.Event = field(default_factory=threading.Event)
    restarts: list[tuple[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        assert self.mode in ("embedded", "distributed"), self.mode
        self.root.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.fault_state.mkdir(parents=True, exist_ok=True)
        if self.seed_cache is not None and self.seed_cache.is_dir() and not (self.data_dir / "cache").exists():
            shutil.copytree(self.seed_cache, self.data_dir / "cache")
        config: dict[str, Any] = {**CHAOS_SETTINGS, "data_dir": str(self.data_dir), **self.overrides}
        if self.mode == "distributed":
            assert self.database_url and self.redis_url
            config["database_url"] = self.database_url
            config["redis_url"] = self.redis_url
            # The dev key is on only in the embedded default; deployments configure their keys.
            config["api_keys"] = [{"key": API_KEY, "tenant": "default"}]
        self.config.write_text(yaml.safe_dump(config))

    # ---- paths and urls ----
    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def fault_state(self) -> Path:
        return self.root / "fault-state"

    @property
    def config(self) -> Path:
        return self.root / "tuft.yaml"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'tuft.db'}"

    @property
    def db(self) -> Engine:
        if self._db is None:
            self._db = sql_engine(self.db_url)
        return self._db

    def sql(self, query: str, **params: Any) -> list[Any]:
        with self.db.connect() as conn:
            return list(conn.execute(text(query), params).all())

    # ---- processes ----
    def _env(self, fault: str | None) -> dict[str, str]:
        extra = {"TUFT_FAULT_STATE": str(self.fault_state)}
        if fault:
            extra["TUFT_FAULT"] = fault
        return clean_env(extra)

    def _spawn(self, name: str, args: list[str], fault: str | None) -> Proc:
        log = self.root / f"{name}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                [*TUFT, *args], cwd=REPO, env=self._env(fault), stdout=out, stderr=subprocess.STDOUT
            )
        return Proc(name, popen, log)

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/api/v1/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def start(
        self, *, fault: str | None = None, workers: int = 1, worker_faults: list[str | None] | None = None
    ) -> Cluster:
        """Start the API and the worker(s); return once the API answers and the worker(s) registered.

        Embedded: `fault` goes to `tuft launch`, whose worker inherits it. Distributed: the API gets
        no fault; `worker_faults[i]` (or `fault`) goes to worker i."""
        if self.mode == "distributed":
            _run([*TUFT, "db", "upgrade", "--config", str(self.config)], timeout=120)
            faults = worker_faults if worker_faults is not None else [fault] * workers
            for i, worker_fault in enumerate(faults):
                self.start_worker(f"worker{i}", fault=worker_fault, wait=False)
        self.start_api(fault=fault if self.mode == "embedded" else None)
        self.wait_workers_registered()
        return self

    def start_api(self, *, fault: str | None = None, wait: bool = True) -> Proc:
        if self.mode == "embedded":
            args = ["launch", "--data-dir", str(self.data_dir), "--port", str(self.port), "--device", "cpu"]
            self.api = self._spawn("launch", [*args, "--config", str(self.config)], fault)
        else:
            self.api = self._spawn("api", ["api", "--port", str(self.port), "--config", str(self.config)], None)
        if wait:
            self.wait_healthy()
        return self.api

    def wait_healthy(self, timeout: float = 120) -> None:
        def up() -> bool:
            assert self.api is not None
            if not self.api.alive():
                raise RuntimeError(f"API exited with {self.api.popen.returncode}")
            return self.healthy()

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if up():
                    return
            except RuntimeError as exc:
                raise AssertionError(f"{exc}\n{self.logs()}") from exc
            time.sleep(0.1)
        raise AssertionError(f"API did not come up\n{self.logs()}")

    def start_worker(self, name: str, *, fault: str | None = None, wait: bool = True) -> Proc:
        assert self.mode == "distributed", "embedded mode has exactly one worker, launch's child"
        proc = self._spawn(name, ["worker", "--device", "cpu", "--config", str(self.config)], fault)
        self.workers[name] = proc
        self._worker_faults[name] = fault
        if wait:
            self.wait_registered(proc.pid)
        return proc

    def registered_pids(self) -> set[int]:
        return {int(r[0]) for r in self.sql("select pid from workers where stopped_at is null")}

    def wait_registered(self, pid: int, timeout: float = 120) -> None:
        wait_for(lambda: pid in self.registered_pids(), timeout, f"worker {pid} to register", 0.1, self.logs)

    def wait_workers_registered(self, timeout: float = 120) -> None:
        if self.mode == "embedded":
            self.wait_registered(self.worker_pid(timeout=timeout), timeout)
        else:
            for proc in self.workers.values():
                if proc.alive():
                    self.wait_registered(proc.pid, timeout)

    def worker_pid(self, name: str | None = None, timeout: float = 60) -> int:
        """Pid of a live worker: launch's worker child (embedded) or the named worker process."""
        if self.mode == "distributed":
            proc = self.workers[name or next(iter(self.workers))]
            return proc.pid

        def child() -> int | None:
            assert self.api is not None
            for pid in children(self.api.pid):
                if "-m workers" in cmdline(pid) and alive(pid):
                    return pid
            return None

        return wait_for(child, timeout, "launch's worker process", 0.05, self.logs)

    def supervise(self) -> None:
        """Distributed mode: restart any worker that dies (with its original TUFT_FAULT; the hit
        counters keep a crash point from firing again), as a process manager would."""
        assert self.mode == "distributed"

        def loop() -> None:
            while not self._supervising.wait(0.05):
                for name, proc in list(self.workers.items()):
                    if proc.popen.poll() is not None and not self._supervising.is_set():
                        self.restarts.append((name, time.time()))
                        self.start_worker(name, fault=self._worker_faults.get(name), wait=False)

        self._supervisor = threading.Thread(target=loop, name="chaos-supervisor", daemon=True)
        self._supervisor.start()

    def stop_supervising(self) -> None:
        self._supervising.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=10)

    def kill(self, pid: int, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def kill_worker(self, name: str | None = None) -> int:
        """kill -9 a worker; returns its pid once it is gone."""
        pid = self.worker_pid(name)
        proc = self.workers[name or next(iter(self.workers))] if self.mode == "distributed" else None
        self.kill(pid)
        if proc is not None:
            proc.popen.wait(timeout=30)
        wait_for(lambda: not alive(pid), 30, f"worker {pid} to die")
        return pid

    def owner_pid(self, run_id: str) -> int | None:
        """Pid of the worker holding the run's lease (from the workers table), if any."""
        rows = self.sql(
            "select w.pid from runs r join workers w on w.worker_id = r.owner_worker where r.run_id = :r", r=run_id
        )
        return int(rows[0][0]) if rows else None

    def worker_name(self, pid: int) -> str | None:
        return next((name for name, proc in self.workers.items() if proc.pid == pid), None)

    def kill_api(self) -> None:
        """kill -9 the API process. Embedded: that is `tuft launch` (API + sweeper + supervisor);
        its worker child gets SIGTERM from the kernel (parent-death signal) and stops; close()
        still finds any process of the cluster by its environment and ends it."""
        assert self.api is not None
        self.kill(self.api.pid)
        self.api.popen.wait(timeout=30)

    def processes(self) -> list[int]:
        """Every live process this cluster started, its children included: they all carry this
        cluster's TUFT_FAULT_STATE in their environment (inherited by launch's worker)."""
        marker = f"TUFT_FAULT_STATE={self.fault_state}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if marker in (entry / "environ").read_bytes().split(b"\0") and alive(int(entry.name)):
                    found.append(int(entry.name))
        return found

    def close(self) -> None:
        self.stop_supervising()
        pids = self.processes()
        for pid in pids:
            # A stopped process cannot handle SIGTERM: continue it first.
            self.kill(pid, signal.SIGCONT)
            self.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            for proc in [*self.workers.values(), *([self.api] if self.api else [])]:
                proc.popen.poll()  # reap our direct children
            time.sleep(0.1)
        # Whatever is left (a worker orphaned by its launch process) is killed.
        for pid in self.processes():
            self.kill(pid)
        for proc in [*self.workers.values(), *([self.api] if self.api else [])]:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=10)
        wait_for(lambda: not self.processes(), 30, "the cluster's processes to exit")
        if self._db is not None:
            self._db.dispose()

    # ---- logs ----
    def dump_stacks(self) -> None:
        """Ask every live worker to print its threads' stacks into its log (faulthandler on
        SIGUSR1, workers/__main__.py), for the diagnosis of a run that stopped making progress."""
        for proc in self.workers.values():
            if proc is not None and proc.alive():
                self.kill(proc.pid, signal.SIGUSR1)
        time.sleep(1.0)

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-5000:]}" for p in sorted(self.root.glob("*.log"))
        )

    def log_count(self, pattern: str) -> int:
        regex = re.compile(pattern)
        return sum(len(regex.findall(p.read_text(errors="replace"))) for p in self.root.glob("*.log"))

    def log_times(self, pattern: str) -> list[float]:
        """Epoch times of the log lines matching `pattern` (logging's asctime, local time), sorted."""
        regex = re.compile(pattern)
        stamp = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")
        times = []
        for path in self.root.glob("*.log"):
            for line in path.read_text(errors="replace").splitlines():
                m = stamp.match(line)
                if m and regex.search(line):
                    times.append(time.mktime(time.strptime(m[1], "%Y-%m-%d %H:%M:%S")) + int(m[2]) / 1000)
        return sorted(times)

    # ---- admin CLI ----
    def cli(self, *args: str) -> Any:
        """Run `tuft <args> --json` against this cluster's database and return the parsed JSON."""
        import json

        out = _run([*TUFT, *args, "--config", str(self.config), "--json"], check=False, timeout=120)
        if out.returncode not in (0, 1):
            raise AssertionError(f"tuft {' '.join(args)} failed ({out.returncode}): {out.stderr}")
        return json.loads(out.stdout)

    # ---- reading the queue ----
    def run_row(self, run_id: str) -> Any:
        rows = self.sql(
            "select status, owner_worker, lease_epoch, next_seq, applied_seq, optimizer_steps, last_snapshot_seq "
            "from runs where run_id = :r",
            r=run_id,
        )
        return rows[0] if rows else None

    def applied_seq(self, run_id: str) -> int:
        row = self.run_row(run_id)
        return -1 if row is None else int(row.applied_seq)

    def op_count(self, run_id: str) -> int:
        return int(self.sql("select count(*) from ops where run_id = :r and seq is not null", r=run_id)[0][0])

    def only_run(self) -> str | None:
        rows = self.sql("select run_id from runs")
        return str(rows[0][0]) if len(rows) == 1 else None

    def wait_applied(self, run_id: str, seq: int, timeout: float = 120) -> None:
        wait_for(lambda: self.applied_seq(run_id) >= seq, timeout, f"{run_id} to apply seq {seq}", 0.02, self.logs)


@contextlib.contextmanager
def cluster(root: Path, mode: str, seed_cache: Path | None = None, **overrides: Any) -> Iterator[Cluster]:
    """A cluster (not started) with its own database; everything is torn down afterwards."""
    if mode == "embedded":
        c = Cluster(root, mode, overrides=overrides, seed_cache=seed_cache)
        try:
            yield c
        finally:
            c.close()
        return
    with pg_database() as url:
        c = Cluster(root, mode, database_url=url, redis_url=REDIS_URL, overrides=overrides, seed_cache=seed_cache)
        try:
            yield c
        finally:
            c.close()
