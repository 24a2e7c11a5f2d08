"""API keys: configured plain-text keys (the dev key, YAML `api_keys`) and database keys created
with `tuft keys create`, stored as sha256 hashes. Each key belongs to one tenant."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session as DbSession

from app.db.engine import Database, db_now
from app.db.models import ApiKey
from app.domain.errors import Unauthorized


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(s: DbSession, *, tenant: str, name: str) -> tuple[int, str]:
    key = "tml-" + secrets.token_urlsafe(32)
    row = ApiKey(key_hash=hash_key(key), key_prefix=key[:12], name=name, tenant=tenant, created_at=db_now(s))
    s.add(row)
    s.flush()
    return row.id, key


def list_keys(s: DbSession) -> list[dict[str, Any]]:
    rows = s.execute(select(ApiKey).order_by(ApiKey.id)).scalars()
    return [
        {
            "id": r.id,
            "prefix": r.key_prefix,
            "tenant": r.tenant,
            "name": r.name,
            "revoked": r.revoked_at is not None,
        }
        for r in rows
    ]


def revoke_key(s: DbSession, key_id_or_prefix: str) -> int:
    cond = [ApiKey.key_prefix == key_id_or_prefix]
    if key_id_or_prefix.isdigit():
        cond.append(ApiKey.id == int(key_id_or_prefix))
    result = s.execute(update(ApiKey).where(or_(*cond), ApiKey.revoked_at.is_(None)).values(revoked_at=db_now(s)))
    return int(result.rowcount)  # type: ignore[attr-defined]


class KeyResolver:
    """Key -> tenant, with a short cache: every poll carries the key, and a database round trip per
    poll would be wasted. A revoked key stops working within `ttl` seconds."""

    def __init__(self, db: Database, configured: dict[str, str], ttl: float = 10.0) -> None:
        self.db = db
        self.configured = configured
        self.ttl = ttl
        self._cache: dict[str, tuple[float, str | None]] = {}
        self._lock = threading.Lock()

    def known(self, key: str | None) -> str | None:
        """The tenant if the answer needs no database (a configured key, or a fresh cache entry
        for a valid one), else None: the caller answers on the event loop instead of taking a
        threadpool hop per request (issue 11: every poll and heartbeat carries the key)."""
        if not key:
            return None
        if key in self.configured:
            return self.configured[key]
        hit = self._cache.get(hash_key(key))  # a dict read is atomic; writers take the lock
        if hit is None or hit[1] is None or time.monotonic() - hit[0] > self.ttl:
            return None
        return hit[1]

    def tenant_for(self, key: str | None) -> str:
        if not key:
            raise Unauthorized("missing X-API-Key header")
        if key in self.configured:
            return self.configured[key]
        digest = hash_key(key)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(digest)
        if hit is None or now - hit[0] > self.ttl:
            with self.db.read() as s:
                tenant = s.execute(
                    select(ApiKey.tenant).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))
                ).scalar_one_or_none()
            with self._lock:
                if len(self._cache) > 10_000:
                    self._cache.clear()
                self._cache[digest] = (now, tenant)
        else:
            tenant = hit[1]
        if tenant is None:
            raise Unauthorized("invalid API key")
        return tenant
