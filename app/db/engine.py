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
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker


def normalize_url(url: str) -> str:
    """Accept postgres:// and postgresql:// and use the psycopg 3 driver for both."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def _sqlite_engine(url: str, begin: str) -> Engine:
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, pool_pre_ping=True)

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


class Database:
    """Owns the engines of one process; `process_name` labels Postgres connections
    (pg_stat_activity shows api / worker-<id> / cli during an incident)."""

    def __init__(self, url: str, process_name: str = "tuft") -> None:
        self.url = normalize_url(url)
        self.sqlite = is_sqlite(self.url)
        if self.sqlite:
            self.write_engine = _sqlite_engine(self.url, "IMMEDIATE")
            self.read_engine = _sqlite_engine(self.url, "DEFERRED")
        else:
            self.write_engine = create_engine(
                self.url,
                pool_pre_ping=True,
                pool_size=10,
                max_overflow=20,
                connect_args={"application_name": process_name, "connect_timeout": 10},
            )
            self.read_engine = self.write_engine
        self._write = sessionmaker(self.write_engine, expire_on_commit=False)
        self._read = sessionmaker(self.read_engine, expire_on_commit=False)

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One unit of work: commit on success, roll back on any exception. Helpers never commit."""
        with self._write() as session, session.begin():
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._read() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.write_engine.dispose()
        if self.read_engine is not self.write_engine:
            self.read_engine.dispose()


def db_now(session: Session) -> float:
    """The database clock in epoch seconds: leases are judged by one clock, not by each host's."""
    bind = session.get_bind()
    if bind.dialect.name == "sqlite":
        value = session.execute(text("SELECT (julianday('now') - 2440587.5) * 86400.0")).scalar_one()
    else:
        value = session.execute(text("SELECT extract(epoch from clock_timestamp())")).scalar_one()
    return float(value)
