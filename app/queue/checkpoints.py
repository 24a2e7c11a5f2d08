"""Checkpoint records: rows say who may read what. Their files (layout, writing, copying, deleting)
belong to app/checkpoint_store.py."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.orm import Session as DbSession

from app.db.engine import db_now
from app.db.models import Checkpoint, Run, Sampler, Session
from app.domain.errors import Conflict, InvalidInput, NotFound
from app.domain.ids import TinkerPath
from app.domain.ops import MAX_TTL_SECONDS

# The SDK documents TTLs of "1 hour to 10 years"; we accept any positive number of seconds (tests
# and scripts use short ones) up to the same ceiling.


def _live(now: float) -> ColumnElement[bool]:
    """Not yet expired. Expired rows wait for the sweeper but are already gone for every reader."""
    return or_(Checkpoint.expires_at.is_(None), Checkpoint.expires_at >= now)


def find(s: DbSession, run_id: str, kind: str, name: str, *, expired: bool = False) -> Checkpoint | None:
    """The row of (run, kind, name). An expired one is gone for every reader (workers loading or
    sampling from it included) unless `expired` asks for it: it still holds its name until the
    sweeper deletes it, and the owner is told it expired rather than that it never existed."""
    query = select(Checkpoint).where(Checkpoint.run_id == run_id, Checkpoint.kind == kind, Checkpoint.name == name)
    if not expired:
        query = query.where(_live(db_now(s)))
    return s.execute(query).scalar_one_or_none()


def check_ttl(ttl_seconds: int | None) -> int | None:
    if ttl_seconds is not None and not 1 <= ttl_seconds <= MAX_TTL_SECONDS:
        raise InvalidInput(
            f"ttl_seconds must be between 1 and {MAX_TTL_SECONDS} (10 years), or null for no expiry; got {ttl_seconds}"
        )
    return ttl_seconds


def owned(s: DbSession, tenant: str, run_id: str, kind: str, name: str, *, label: str) -> Checkpoint:
    """A live checkpoint of the caller's own, for changes (delete, TTL, publish). Another tenant's
    checkpoint, published or not, is the same 404 as one that does not exist: changes are the
    owner's alone, and the answer must not confirm that a foreign run exists."""
    row = None if "\x00" in run_id else find(s, run_id, kind, name, expired=True)
    if row is None or row.tenant != tenant:
        raise NotFound(f"checkpoint {label} of training run {run_id!r} not found")
    if row.expires_at is not None and row.expires_at < db_now(s):
        raise NotFound(f"checkpoint {label} of training run {run_id!r} has expired")
    return row


def resolve(s: DbSession, tenant: str, path: TinkerPath) -> Checkpoint:
    """A checkpoint the tenant may read: its own, or a published one."""
    row = find(s, path.run_id, path.kind, path.name, expired=True)
    if row is None or (row.tenant != tenant and not row.public):
        raise NotFound(f"checkpoint {path} not found")
    if row.expires_at is not None and row.expires_at < db_now(s):
        raise NotFound(f"checkpoint {path} has expired")
    return row


def record(
    s: DbSession,
    *,
    tenant: str,
    run_id: str,
    kind: str,
    name: str,
    storage_path: str,
    base_model: str,
    lora_config: dict[str, object],
    with_optimizer: bool,
    ephemeral: bool,
    size_bytes: int,
    user_metadata: dict[str, str] | None,
    ttl_seconds: int | None,
    request_id: str,
    overwrite: bool,
) -> Checkpoint:
    """Insert or replace the row for (run, kind, name). Re-recording by the same op (a replay
    after a crash) is a no-op; replacing another op's checkpoint needs `overwrite`."""
    now = db_now(s)
    existing = find(s, run_id, kind, name, expired=True)
    if existing is not None:
        expired = existing.expires_at is not None and existing.expires_at < now
        if existing.created_by_op != request_id and not overwrite and not expired:
            raise Conflict(f"checkpoint {kind}/{name} already exists for {run_id} (pass overwrite=True)")
        s.delete(existing)
        s.flush()
    row = Checkpoint(
        tenant=tenant,
        run_id=run_id,
        kind=kind,
        name=name,
        storage_path=storage_path,
        base_model=base_model,
        lora_config=lora_config,
        with_optimizer=with_optimizer,
        ephemeral=ephemeral,
        size_bytes=size_bytes,
        public=False,
        user_metadata=user_metadata,
        created_by_op=request_id,
        created_at=now,
        expires_at=now + ttl_seconds if ttl_seconds else None,
    )
    s.add(row)
    s.flush()
    return row


def _page(s: DbSession, where: list[Any], limit: int | None, offset: int) -> tuple[list[Checkpoint], int]:
    """Newest first; `id` breaks ties between checkpoints saved in the same instant, so pages
    never overlap or skip."""
    total = s.execute(select(func.count()).select_from(Checkpoint).where(*where)).scalar_one()
    query = select(Checkpoint).where(*where).order_by(Checkpoint.created_at.desc(), Checkpoint.id.desc())
    rows = s.execute(query.limit(limit).offset(offset)).scalars()
    return list(rows), int(total)


def _listed(s: DbSession, kinds: set[str] | None) -> list[Any]:
    where = [Checkpoint.ephemeral.is_(False), _live(db_now(s))]
    if kinds is not None:
        where.append(Checkpoint.kind.in_(sorted(kinds)))
    return where


def list_for_run(
    s: DbSession, tenant: str, run_id: str, limit: int | None, offset: int, kinds: set[str] | None = None
) -> tuple[list[Checkpoint], int]:
    where = [Checkpoint.run_id == run_id, Checkpoint.tenant == tenant, *_listed(s, kinds)]
    return _page(s, where, limit, offset)


def list_for_tenant(
    s: DbSession, tenant: str, limit: int, offset: int, kinds: set[str] | None = None
) -> tuple[list[Checkpoint], int]:
    return _page(s, [Checkpoint.tenant == tenant, *_listed(s, kinds)], limit, offset)


def latest_for_run(s: DbSession, run_id: str, kind: str) -> Checkpoint | None:
    return s.execute(
        select(Checkpoint)
        .where(Checkpoint.run_id == run_id, Checkpoint.kind == kind, *_listed(s, None))
        .order_by(Checkpoint.created_at.desc(), Checkpoint.id.desc())
        .limit(1)
    ).scalar_one_or_none()


def delete(s: DbSession, tenant: str, run_id: str, kind: str, name: str, *, label: str) -> Checkpoint:
    row = owned(s, tenant, run_id, kind, name, label=label)
    s.delete(row)
    s.flush()
    return row


def set_ttl(s: DbSession, row: Checkpoint, ttl_seconds: int | None) -> None:
    """The expiry counts from now; None keeps the checkpoint until it is deleted."""
    check_ttl(ttl_seconds)
    row.expires_at = None if ttl_seconds is None else db_now(s) + ttl_seconds
    s.flush()


def copy_marker(token: str) -> str:
    """`created_by_op` of a copy: ties it to the caller's idempotency key (hashed, see the route)."""
    return f"copy:{token}"


def find_copy(s: DbSession, tenant: str, run_id: str, token: str) -> Checkpoint | None:
    row = s.execute(
        select(Checkpoint).where(Checkpoint.run_id == run_id, Checkpoint.created_by_op == copy_marker(token))
    ).scalar_one_or_none()
    return row if row is not None and row.tenant == tenant else None


def record_copy(
    s: DbSession,
    *,
    tenant: str,
    source: Checkpoint,
    source_path: str,
    run_id: str,
    session_id: str,
    model_seq_id: int,
    new_session: bool,
    project_id: str | None,
    token: str,
    storage_path: str,
    ttl_seconds: int | None,
) -> Checkpoint:
    """The rows of a copy: a run that holds it (cancelled: a copy is weights, not a trainable run,
    as in Tinker), its session when the copy gets one of its own, and the checkpoint. Its files
    are already in place; a unique-key clash means a concurrent copy with the same key won."""
    now = db_now(s)
    if new_session:
        s.add(
            Session(
                session_id=session_id,
                tenant=tenant,
                tags=["copy"],
                # TuFT has no projects; the destination is kept for whoever reads the session.
                user_metadata={"copied_from": source_path, **({"project_id": project_id} if project_id else {})},
                display_name=f"copy of {source_path}"[:200],
                created_at=now,
                last_heartbeat_at=now,
                finished_at=now,
                finish_reason="copy",
            )
        )
        s.flush()
    if s.get(Run, run_id) is not None:
        raise InvalidInput(f"model_seq_id {model_seq_id} of session {session_id} already names a training run")
    s.add(
        Run(
            run_id=run_id,
            session_id=session_id,
            tenant=tenant,
            model_seq_id=model_seq_id,
            base_model=source.base_model,
            lora_config=dict(source.lora_config),
            user_metadata={"copied_from": source_path},
            status="cancelled",
            status_reason=f"holds a copy of {source_path}; copies cannot be trained"[:500],
            lease_epoch=0,
            next_seq=1,
            applied_seq=0,
            optimizer_steps=0,
            created_at=now,
            last_request_at=now,
        )
    )
    s.flush()
    row = Checkpoint(
        tenant=tenant,
        run_id=run_id,
        kind=source.kind,
        name=source.name,
        storage_path=storage_path,
        base_model=source.base_model,
        lora_config=dict(source.lora_config),
        with_optimizer=source.with_optimizer,
        ephemeral=False,
        size_bytes=source.size_bytes,
        public=False,
        user_metadata=dict(source.user_metadata) if source.user_metadata else None,
        created_by_op=copy_marker(token),
        created_at=now,
        expires_at=None if ttl_seconds is None else now + ttl_seconds,
    )
    s.add(row)
    s.flush()
    return row


def record_sampler(
    s: DbSession, *, sampler_id: str, session_id: str, tenant: str, base_model: str, model_path: str | None
) -> Sampler:
    """The sampler row, inserted unless it exists: for create_sampling_session (submit.py) and for
    save_weights_and_get_sampling_client, whose sampler is created when its weights commit."""
    existing = s.get(Sampler, sampler_id)
    if existing is not None:
        return existing
    sampler = Sampler(
        sampler_id=sampler_id,
        session_id=session_id,
        tenant=tenant,
        base_model=base_model,
        model_path=model_path,
        created_at=db_now(s),
    )
    s.add(sampler)
    s.flush()
    return sampler
