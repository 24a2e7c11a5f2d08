"""Checkpoint records. Files live under the checkpoint directory; rows say who may read them."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session as DbSession

from app.db.engine import db_now
from app.db.models import Checkpoint, Sampler
from app.domain.errors import Conflict, NotFound
from app.domain.ids import TinkerPath


def storage_path_for(run_id: str, kind: str, name: str) -> str:
    """Relative directory of a checkpoint. Run ids are `<session>:train:<n>`; ':' is replaced so
    the tree stays portable to filesystems that refuse it (names are validated, ids.py)."""
    return f"{run_id.replace(':', '_')}/{kind}/{name}"


def find(s: DbSession, run_id: str, kind: str, name: str) -> Checkpoint | None:
    return s.execute(
        select(Checkpoint).where(Checkpoint.run_id == run_id, Checkpoint.kind == kind, Checkpoint.name == name)
    ).scalar_one_or_none()


def resolve(s: DbSession, tenant: str, path: TinkerPath) -> Checkpoint:
    """A checkpoint the tenant may read: its own, or a published one."""
    row = find(s, path.run_id, path.kind, path.name)
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
    existing = find(s, run_id, kind, name)
    if existing is not None:
        if existing.created_by_op != request_id and not overwrite:
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


def list_for_run(s: DbSession, tenant: str, run_id: str) -> list[Checkpoint]:
    return list(
        s.execute(
            select(Checkpoint)
            .where(Checkpoint.run_id == run_id, Checkpoint.tenant == tenant, Checkpoint.ephemeral.is_(False))
            .order_by(Checkpoint.created_at)
        ).scalars()
    )


def list_for_tenant(s: DbSession, tenant: str, limit: int, offset: int) -> tuple[list[Checkpoint], int]:
    where = (Checkpoint.tenant == tenant, Checkpoint.ephemeral.is_(False))
    total = s.execute(select(func.count()).select_from(Checkpoint).where(*where)).scalar_one()
    rows = s.execute(
        select(Checkpoint).where(*where).order_by(Checkpoint.created_at.desc()).limit(limit).offset(offset)
    ).scalars()
    return list(rows), int(total)


def latest_for_run(s: DbSession, run_id: str, kind: str) -> Checkpoint | None:
    return s.execute(
        select(Checkpoint)
        .where(Checkpoint.run_id == run_id, Checkpoint.kind == kind, Checkpoint.ephemeral.is_(False))
        .order_by(Checkpoint.created_at.desc())
        .limit(1)
    ).scalar_one_or_none()


def delete(s: DbSession, tenant: str, run_id: str, kind: str, name: str) -> Checkpoint:
    row = find(s, run_id, kind, name)
    if row is None or row.tenant != tenant:
        raise NotFound(f"checkpoint {kind}/{name} of {run_id} not found")
    s.delete(row)
    s.flush()
    return row


def record_sampler(
    s: DbSession, *, sampler_id: str, session_id: str, tenant: str, base_model: str, model_path: str
) -> None:
    """The sampler behind save_weights_and_get_sampling_client, created when its weights commit."""
    if s.get(Sampler, sampler_id) is None:
        s.add(
            Sampler(
                sampler_id=sampler_id,
                session_id=session_id,
                tenant=tenant,
                base_model=base_model,
                model_path=model_path,
                created_at=db_now(s),
            )
        )
        s.flush()
