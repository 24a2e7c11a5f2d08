"""Engines and units of work for SQLite and PostgreSQL.

SQLite: WAL (readers never block the writer), synchronous=FULL (a committed future survives power
loss, not only a process crash), busy_timeout, and BEGIN IMMEDIATE for every write transaction: a
deferred transaction that reads first can fail with SQLITE_BUSY when it upgrades to a writer,
whatever the timeout (reliability-design.md §1.7). Read-only units of work use a second engine that
begins DEFERRED, so long-polls and listings never queue behind writers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, Float, create_engine, event, text
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session, configure_mappers, sessionmaker
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement


def normalize_url(url: str) -> str:
    """Accept postgres:// and postgresql:// and use the psycopg 3 driver for both."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def _sqlite_engine(url: str, begin: str) -> Engine:
    # No pre-ping: a file cannot drop its connection, and a ping is a statement on every checkout.
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's own BEGIN is always DEFERRED).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql(f"BEGIN {begin}")

    return engine


def _relaxed_engine(url: str, sqlite: bool, pool_size: int, connect_args: dict[str, Any]) -> Engine:
    """The engine of Database.write_relaxed: commits that do not wait for the disk."""
    if sqlite:
        engine = _sqlite_engine(url, "IMMEDIATE")

        @event.listens_for(engine, "connect")
        def _normal(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.execute("PRAGMA synchronous=NORMAL")

        return engine
    args = dict(connect_args)
    args["options"] = (str(args.get("options", "")) + " -c synchronous_commit=off").strip()
    # Few connections: the worker's loop and the API's delivery marks use it.
    return create_engine(
        url, pool_size=max(1, pool_size // 4), max_overflow=pool_size, pool_pre_ping=False, connect_args=args
    )


@dataclass(frozen=True)
class DbTimeouts:
    """Server-side bounds on one PostgreSQL session (issue 7 item 3).

    A process paused (SIGSTOP, a GC pause) or partitioned inside an open transaction keeps its row
    locks until its transaction ends; without these bounds every other worker and the sweeper queue
    behind it until it resumes or TCP gives up. `idle_in_transaction` makes the server end such a
    transaction (and free its locks) by itself; `lock` turns a wait on someone else's lock into an
    error the caller retries (every caller treats DBAPIError as transient); `statement` bounds a
    statement whose client has gone. Our transactions never wait between statements (no slow work
    inside a unit of work), so none of these fire in normal operation. The TCP settings notice a
    dead peer in ~10 s instead of the kernel's ~15 minutes.
    """

    lock_seconds: float = 2.0
    idle_in_transaction_seconds: float = 5.0
    statement_seconds: float = 30.0
    tcp_user_timeout_seconds: float = 10.0

    @classmethod
    def for_lease(cls, lease_ttl_seconds: float) -> DbTimeouts:
        """A transaction open longer than the lease TTL belongs to a process that has lost its
        leases anyway: end it no later than the leases expire, so the locks are free by the time
        another worker may take the runs over (recovery within the TTL + the takeover)."""
        return cls(
            lock_seconds=min(cls.lock_seconds, lease_ttl_seconds),
            idle_in_transaction_seconds=min(cls.idle_in_transaction_seconds, lease_ttl_seconds),
        )

    def connect_args(self) -> dict[str, Any]:
        options = " ".join(
            f"-c {name}={int(seconds * 1000)}"
            for name, seconds in (
                ("lock_timeout", self.lock_seconds),
                ("idle_in_transaction_session_timeout", self.idle_in_transaction_seconds),
                ("statement_timeout", self.statement_seconds),
            )
            if seconds > 0
        )
        return {
            "options": options,
            "keepalives": 1,
            "keepalives_idle": 5,
            "keepalives_interval": 2,
            "keepalives_count": 3,
            "tcp_user_timeout": int(self.tcp_user_timeout_seconds * 1000),
        }


# The long-running server processes get the bounds by default; one-shot tools (the CLI, tests,
# migrations) run on plain sessions unless they ask.
SERVER_TIMEOUTS = DbTimeouts()


def default_timeouts(process_name: str) -> DbTimeouts | None:
    if process_name == "api" or process_name.startswith("worker"):
        return SERVER_TIMEOUTS
    return None


class Database:
    """Owns the engines of one process; `process_name` labels Postgres connections
    (pg_stat_activity shows api / worker-<id> / cli during an incident) and picks the session
    bounds (DbTimeouts) unless `timeouts` is given."""

    def __init__(
        self, url: str, process_name: str = "tuft", *, timeouts: DbTimeouts | None = None, pool_size: int = 10
    ) -> None:
        self.url = normalize_url(url)
        self.sqlite = is_sqlite(self.url)
        connect_args: dict[str, Any] = {}
        if self.sqlite:
            self.write_engine = _sqlite_engine(self.url, "IMMEDIATE")
            self.read_engine = _sqlite_engine(self.url, "DEFERRED")
        else:
            bounds = timeouts if timeouts is not None else default_timeouts(process_name)
            connect_args = {"application_name": process_name, "connect_timeout": 10}
            if bounds is not None:
                connect_args.update(bounds.connect_args())
            # No pre-ping (a `SELECT 1` round trip on every checkout): a connection the server
            # dropped (a restart, a killed backend) fails its first statement with a DBAPIError,
            # which every caller already treats as transient (API: 503, retried by the SDK;
            # workers: the commit or the op is retried), and SQLAlchemy then replaces the pool's
            # connections. `pool_size` connections are kept: an overflow connection is closed when
            # returned, so a pool smaller than the process's concurrency opens and closes
            # connections all the time (issue 11: 638 new connections in 20 s at 32 runs).
            self.write_engine = create_engine(
                self.url,
                pool_size=pool_size,
                max_overflow=pool_size,
                pool_pre_ping=False,
                connect_args=connect_args,
            )
            # Reads need no BEGIN/COMMIT on PostgreSQL: under READ COMMITTED each statement sees
            # its own snapshot anyway, so a read-only unit of work loses nothing in autocommit and
            # saves two round trips (same pool, the flag is client-side in psycopg).
            self.read_engine = self.write_engine.execution_options(isolation_level="AUTOCOMMIT")
        # Configure the ORM mappers now, not lazily inside the first unit of work: under load
        # that took seconds with a transaction open (and the idle-in-transaction timeout ended it).
        import app.db.models  # noqa: F401  (registers the tables)

        configure_mappers()
        self._write = sessionmaker(self.write_engine, expire_on_commit=False)
        self._read = sessionmaker(self.read_engine, expire_on_commit=False)
        # Its own pool: the session setting that skips the disk wait is fixed per connection.
        self.relaxed_engine = _relaxed_engine(self.url, self.sqlite, pool_size, connect_args)
        self._relaxed = sessionmaker(self.relaxed_engine, expire_on_commit=False)

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One unit of work: commit on success, roll back on any exception. Helpers never commit."""
        with self._write() as session, session.begin():
            yield session

    @contextmanager
    def write_relaxed(self) -> Iterator[Session]:
        """A unit of work whose commit does not wait for the disk: for writes that only record
        progress and that a database crash may lose without breaking a promise (a training op's
        claim: its fenced result commit, which does wait, flushes the WAL up to and past it; a
        result's delivery mark). Saves a WAL flush on an op's critical path (issue 11: ~4 ms a
        commit on the 2-core machine). PostgreSQL: `synchronous_commit=off` on this pool's
        sessions; SQLite: `synchronous=NORMAL` on its connections (WAL mode: lost only on a power
        failure or an OS crash, never on a process crash)."""
        with self._relaxed() as session, session.begin():
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._read() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.relaxed_engine.dispose()
        self.write_engine.dispose()
        if self.read_engine.pool is not self.write_engine.pool:
            self.read_engine.dispose()

    def engines(self) -> list[Engine]:
        """Each distinct engine once (statement counters, tests)."""
        engines = [self.write_engine]
        if self.read_engine.pool is not self.write_engine.pool:
            engines.append(self.read_engine)
        return [*engines, self.relaxed_engine]


class db_clock(FunctionElement[float]):
    """The database clock in epoch seconds as an expression, to put inside the statement that
    needs it (`values(started_at=db_clock())`) instead of a `SELECT` of its own before it."""

    type = Float()
    inherit_cache = True


@compiles(db_clock, "postgresql")
def _clock_pg(element: db_clock, compiler: SQLCompiler, **kw: Any) -> str:
    return "extract(epoch from clock_timestamp())"


@compiles(db_clock, "sqlite")
def _clock_sqlite(element: db_clock, compiler: SQLCompiler, **kw: Any) -> str:
    return "((julianday('now') - 2440587.5) * 86400.0)"


def db_now(session: Session) -> float:
    """The database clock in epoch seconds: leases are judged by one clock, not by each host's."""
    bind = session.get_bind()
    if bind.dialect.name == "sqlite":
        value = session.execute(text("SELECT (julianday('now') - 2440587.5) * 86400.0")).scalar_one()
    else:
        value = session.execute(text("SELECT extract(epoch from clock_timestamp())")).scalar_one()
    return float(value)
