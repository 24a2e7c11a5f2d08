"""Tables. Times are float seconds since the epoch taken from the database clock
(app/db/engine.py::db_now), so leases are judged by one clock whatever the hosts' clocks say."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # sha256 of the key: a leaked database does not leak usable keys.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    key_prefix: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(200))
    tenant: Mapped[str] = mapped_column(String(200), index=True)
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Session(Base):
    __tablename__ = "sessions"

    session_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(200), index=True)
    sdk_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    user_metadata: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    display_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    last_heartbeat_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finish_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)


class Worker(Base):
    __tablename__ = "workers"

    worker_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    host: Mapped[str] = mapped_column(String(200))
    device: Mapped[str] = mapped_column(String(64))
    # Celery queue that wakes this worker (gpu.<host>.<index>); the doorbell routes a run's
    # wake-up to its owner's queue.
    queue: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[float] = mapped_column(Float)
    heartbeat_at: Mapped[float] = mapped_column(Float)
    stopped_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # It hears `NOTIFY tuft_work` (workers/pglisten.py checked the round trip): the API then wakes
    # it with that NOTIFY alone and sends no Celery message for its runs' ops.
    listens: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class Run(Base):
    """A training run (= Tinker model id). Lease fields implement reliability-design.md §2.3."""

    __tablename__ = "runs"
    __table_args__ = (UniqueConstraint("session_id", "model_seq_id"),)

    run_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.session_id"), index=True)
    tenant: Mapped[str] = mapped_column(String(200), index=True)
    model_seq_id: Mapped[int] = mapped_column(Integer)
    base_model: Mapped[str] = mapped_column(String(200))
    lora_config: Mapped[dict[str, Any]] = mapped_column(JSON)
    user_metadata: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # active | blocked | paused | cancelled
    status: Mapped[str] = mapped_column(String(16), default="active")
    # Why the run is not active (a poison op, a failed rebuild, an operator's pause...).
    status_reason: Mapped[str | None] = mapped_column(String(500), nullable=True)
    owner_worker: Mapped[str | None] = mapped_column(String(100), nullable=True, index=True)
    # Fencing token: bumped on every (re)assignment; every worker write carries the epoch it holds.
    lease_epoch: Mapped[int] = mapped_column(Integer, default=0)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # The op with seq == next_seq is the only one that may run; applied_seq is the last one whose
    # effect (and result) committed.
    next_seq: Mapped[int] = mapped_column(Integer)
    applied_seq: Mapped[int] = mapped_column(Integer)
    optimizer_steps: Mapped[int] = mapped_column(Integer, default=0)
    last_snapshot_seq: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    last_request_at: Mapped[float] = mapped_column(Float)
    # Retention (app/queue/retention.py): op payloads at or below this seq are pruned; a retired
    # run (finished, past finished_run_retention_seconds) has no snapshots and no payloads left.
    payloads_pruned_seq: Mapped[int | None] = mapped_column(Integer, nullable=True)
    retired_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Op(Base):
    """One durable Tinker operation = one future. The row is committed before its request_id is
    returned; its result or error is served from here."""

    __tablename__ = "ops"
    __table_args__ = (
        UniqueConstraint("run_id", "seq"),
        UniqueConstraint("sampler_id", "sampler_seq"),
        Index("ix_ops_kind_status", "kind", "status"),
        # What the sweeper reads each pass (migration 0003): rows still holding a result, and
        # sample ops whose payload is still there. Partial, so they stay as small as the work.
        Index(
            "ix_ops_result_delivered",
            "delivered_at",
            postgresql_where=text("result IS NOT NULL"),
            sqlite_where=text("result IS NOT NULL"),
        ),
        # The audit log's and the usage report's per-tenant time windows (migration 0006).
        Index("ix_ops_tenant_created_at", "tenant", "created_at"),
        Index("ix_ops_tenant_finished_at", "tenant", "finished_at"),
        Index(
            "ix_ops_sample_unpruned",
            "delivered_at",
            postgresql_where=text("run_id IS NULL AND payload_pruned_at IS NULL"),
            sqlite_where=text("run_id IS NULL AND payload_pruned_at IS NULL"),
        ),
    )

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(200), index=True)
    # Training ops: (run_id, seq). Sampling ops: (sampler_id, sampler_seq). create_model: run_id only.
    run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.run_id"), nullable=True)
    seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    sampler_id: Mapped[str | None] = mapped_column(String(100), nullable=True)
    sampler_seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    kind: Mapped[str] = mapped_column(String(32))
    mutates: Mapped[bool] = mapped_column(Boolean, default=False)
    # sha256 of the canonical op: the same (run, seq) with another body is a 409.
    request_sha256: Mapped[str] = mapped_column(String(64))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    # queued | running | succeeded | failed
    status: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    claimed_epoch: Mapped[int | None] = mapped_column(Integer, nullable=True)
    claimed_by: Mapped[str | None] = mapped_column(String(100), nullable=True)
    # Sampling ops are not under a run lease; a claim expires so a dead worker's sample is retaken.
    claim_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    result: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    # forward_backward: the micro-batch budget it ran with; a replay after a crash uses the same
    # split, because the split decides the float rounding of the gradients (docs/reliability.md).
    micro_batch_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Usage (docs/audit-and-usage.md), kept here because payloads and results are pruned: input
    # tokens (forward_backward's data, a sample's prompt) set at submission, output tokens (every
    # sampled sequence) when a sample commits. None: not counted (ops of older releases, others).
    input_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    output_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_category: Mapped[str | None] = mapped_column(String(16), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # First time a client received the terminal result; retention counts from here.
    delivered_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # When retention emptied `payload` (b""): the op can no longer run or be replayed.
    payload_pruned_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Sampler(Base):
    __tablename__ = "samplers"

    sampler_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.session_id"), index=True)
    tenant: Mapped[str] = mapped_column(String(200), index=True)
    base_model: Mapped[str] = mapped_column(String(200))
    # tinker:// path of the sampler weights, None for the bare base model.
    model_path: Mapped[str | None] = mapped_column(String(400), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("run_id", "kind", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(200), index=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # training | sampler
    name: Mapped[str] = mapped_column(String(200))
    # Relative to the checkpoint directory, so the store can be moved or mounted elsewhere.
    storage_path: Mapped[str] = mapped_column(String(400))
    base_model: Mapped[str] = mapped_column(String(200))
    lora_config: Mapped[dict[str, Any]] = mapped_column(JSON)
    with_optimizer: Mapped[bool] = mapped_column(Boolean, default=False)
    # Ephemeral sampler weights (save_weights_and_get_sampling_client) are not listed.
    ephemeral: Mapped[bool] = mapped_column(Boolean, default=False)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    public: Mapped[bool] = mapped_column(Boolean, default=False)
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_by_op: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    # Indexed (migration 0003): the sweeper looks up expired checkpoints every pass.
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)


class Snapshot(Base):
    """Recovery snapshots (adapter + optimizer at a gradient-clean point), registered under the
    fence; GPU state = latest verified snapshot + replay of the mutating ops after it."""

    __tablename__ = "snapshots"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id"), primary_key=True)
    applied_seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer)
    storage_path: Mapped[str] = mapped_column(String(400))
    optimizer_steps: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)


class Singleton(Base):
    """A named lease held by one process at a time (the sweeper), judged by the database clock:
    the same mechanism on SQLite and PostgreSQL, unlike advisory locks."""

    __tablename__ = "singletons"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[float] = mapped_column(Float)


class StabilityRecord(Base):
    """What StableReinforce needs of one sampled sequence (app/queue/stability.py): written with
    the result of a sample asked with record_stability_info, read by forward_backward through
    the datum's provenance spans, deleted by the sweeper once `expires_at` passes (one day after
    sampling or after the last training request that used it, as Tinker's docs say)."""

    __tablename__ = "stability_records"

    # "<request_id>:<index>": the SampledSequence.sequence_id the client was given.
    sequence_id: Mapped[str] = mapped_column(String(120), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(200))
    # Sequences belong to the session that sampled them; only its training runs may use them.
    session_id: Mapped[str] = mapped_column(String(100))
    prompt_len: Mapped[int] = mapped_column(Integer)
    # Little-endian int32 token ids and float32 logprobs, one per sampled token.
    tokens: Mapped[bytes] = mapped_column(LargeBinary)
    logprobs: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[float] = mapped_column(Float)
    # Indexed: the sweeper deletes the expired ones every pass.
    expires_at: Mapped[float] = mapped_column(Float, index=True)
