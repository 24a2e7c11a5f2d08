"""Which errors are an outage of a service the worker depends on, not a property of the op.

A database restart, a connection killed by `pg_terminate_backend`, a lock or idle-in-transaction
timeout, an exhausted pool, a Redis that went away: any of these can surface in the middle of an
op (a checkpoint lookup, the sampler row). None of them says anything about the op, so none may
fail it; the runner retries or hands the op back (runner.py, docs/reliability.md).
"""

from __future__ import annotations

from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

# OperationalError covers connection loss, server shutdown, lock_timeout, deadlocks and
# serialization failures (psycopg maps all of them there) and SQLite's "database is locked";
# InterfaceError a connection already closed; PoolTimeoutError no free connection in the pool.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OperationalError,
    InterfaceError,
    PoolTimeoutError,
    RedisConnectionError,
    RedisTimeoutError,
    KombuOperationalError,
)


def is_transient(exc: BaseException) -> bool:
    """True for an outage; also for any driver error on a connection SQLAlchemy saw die."""
    if isinstance(exc, TRANSIENT_ERRORS):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)
