"""Writing ops: the API's side of the durable queue.

Every function takes the caller's session and only flushes; the request's unit of work commits, and
only then is the request_id handed to the client (reliability-design.md §4.4 "Submit").
Idempotency comes from unique constraints: (run_id, seq) for training ops, (sampler_id,
sampler_seq) for samples, (session_id, model_seq_id) for runs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session as DbSession

from app.db.engine import db_clock, db_now
from app.db.models import Op, Run, Sampler, Session, Worker
from app.domain import ids, usage
from app.domain.errors import Conflict, NotFound, SessionFinished
from app.domain.ops import MUTATING_KINDS, LoraConfig, SampleOp, canonical_bytes, op_sha256
from app.domain.results import CreateModelResult, result_bytes
from app.queue import checkpoints
from app.queue.notify import signal_work

NEW_RUNS_QUEUE = "tuft.new"

# runs.last_request_at orders runs and ages sessions (minutes); moving it on every op of a run
# that sends tens of ops a second would cost an UPDATE per op for no reader's benefit.
LAST_REQUEST_RESOLUTION_SECONDS = 1.0


@dataclass(frozen=True)
class Wakeup:
    """Ring `queue` after the commit: the owner's queue, or the shared one for unowned work."""

    queue: str
    run_id: str | None


@dataclass(frozen=True)
class Submitted:
    request_id: str
    wakeup: Wakeup | None


@dataclass(frozen=True)
class RunContext:
    """What a submission needs to know besides the run, read with it in one statement (issue 11:
    the database clock, the owner's queue for the wake-up, and whether its session has finished)."""

    run: Run
    now: float
    wakeup: Wakeup
    session_finished: str | None  # the finish reason; None while the session is live
    owner_listens: bool = False  # the owner hears NOTIFY tuft_work (workers.listens)


def run_for_submit(s: DbSession, tenant: str, run_id: str) -> RunContext:
    """get_run() for a submission, plus its RunContext, in one round trip."""
    row = None
    if "\x00" not in run_id:
        row = s.execute(
            select(
                Run,
                db_clock(),
                Worker.queue,
                Worker.stopped_at,
                Session.finished_at,
                Session.finish_reason,
                Worker.listens,
            )
            .outerjoin(Worker, Worker.worker_id == Run.owner_worker)
            .outerjoin(Session, Session.session_id == Run.session_id)
            .where(Run.run_id == run_id)
        ).first()
    if row is None or row[0].tenant != tenant:
        raise NotFound(f"training run {run_id!r} not found")
    run, now, queue, stopped_at, finished_at, finish_reason, listens = row
    owned = queue is not None and stopped_at is None
    wakeup = Wakeup(queue, run.run_id) if owned else Wakeup(NEW_RUNS_QUEUE, run.run_id)
    finished = (finish_reason or "finished") if finished_at is not None else None
    return RunContext(run, float(now), wakeup, finished, owner_listens=owned and bool(listens))


def get_session(s: DbSession, tenant: str, session_id: str, *, live: bool = False) -> Session:
    row = None if "\x00" in session_id else s.get(Session, session_id)
    if row is None or row.tenant != tenant:
        raise NotFound(f"session {session_id!r} not found")
    if live and row.finished_at is not None:
        raise SessionFinished(f"session {session_id!r} was finished ({row.finish_reason})")
    return row


def get_run(s: DbSession, tenant: str, run_id: str) -> Run:
    row = None if "\x00" in run_id else s.get(Run, run_id)
    if row is None or row.tenant != tenant:
        raise NotFound(f"training run {run_id!r} not found")
    return row


def get_sampler(s: DbSession, tenant: str, sampler_id: str) -> Sampler:
    row = None if "\x00" in sampler_id else s.get(Sampler, sampler_id)
    if row is None or row.tenant != tenant:
        raise NotFound(f"sampler {sampler_id!r} not found")
    return row


def create_session(
    s: DbSession,
    tenant: str,
    *,
    sdk_version: str | None,
    tags: list[str],
    user_metadata: dict[str, object],
    display_name: str | None,
) -> str:
    now = db_now(s)
    session_id = ids.new_session_id()
    s.add(
        Session(
            session_id=session_id,
            tenant=tenant,
            sdk_version=sdk_version,
            tags=tags,
            user_metadata=user_metadata,
            display_name=display_name,
            created_at=now,
            last_heartbeat_at=now,
        )
    )
    s.flush()
    return session_id


def create_run(
    s: DbSession,
    tenant: str,
    *,
    session_id: str,
    model_seq_id: int,
    base_model: str,
    lora: LoraConfig,
    user_metadata: dict[str, object],
    first_seq: int = 1,
) -> Run:
    """Insert a run; the same (session, model_seq_id) again returns the existing run if its
    configuration matches (a client retry) and is a Conflict otherwise."""
    get_session(s, tenant, session_id, live=True)
    run_id = ids.run_id_for(session_id, model_seq_id)
    existing = s.get(Run, run_id)
    lora_json = lora.model_dump()
    if existing is not None:
        if existing.base_model != base_model or existing.lora_config != lora_json:
            raise Conflict(f"model_seq_id {model_seq_id} of session {session_id} already names another model")
        return existing
    now = db_now(s)
    run = Run(
        run_id=run_id,
        session_id=session_id,
        tenant=tenant,
        model_seq_id=model_seq_id,
        base_model=base_model,
        lora_config=lora_json,
        user_metadata=user_metadata,
        status="active",
        lease_epoch=0,
        # A run made by create_model starts at seq 1 (the SDK's first training seq_id); one made by
        # load_weights with session addressing starts at 0 with the load as its first op.
        next_seq=first_seq,
        applied_seq=first_seq - 1,
        optimizer_steps=0,
        created_at=now,
        last_request_at=now,
    )
    s.add(run)
    s.flush()
    return run


def record_create_model(s: DbSession, run: Run) -> str:
    """The create_model future: complete at birth (the adapter is initialised lazily and
    deterministically by whichever worker takes the run), but still a durable row."""
    request_id = f"create-{run.run_id}"
    if s.get(Op, request_id) is None:
        now = db_now(s)
        result = CreateModelResult(model_id=run.run_id)
        s.add(
            Op(
                request_id=request_id,
                tenant=run.tenant,
                run_id=run.run_id,
                seq=None,
                kind="create_model",
                mutates=False,
                request_sha256=run.run_id,
                payload=b"{}",
                status="succeeded",
                result=result_bytes(result),
                created_at=now,
                finished_at=now,
            )
        )
        s.flush()
    return request_id


def _wakeup_for_run(s: DbSession, run: Run) -> Wakeup:
    if run.owner_worker is not None:
        worker = s.get(Worker, run.owner_worker)
        if worker is not None and worker.stopped_at is None:
            return Wakeup(worker.queue, run.run_id)
    return Wakeup(NEW_RUNS_QUEUE, run.run_id)


def _insert_or_dedupe(
    s: DbSession,
    op_row: Op,
    key_filter: list[object],
    what: str,
    session_id: str,
    session_finished: str | bool | None = False,
    wake_queue: str | None = None,
) -> str:
    """Insert op_row; if its unique key is taken, return the existing request_id when the stored
    body is identical (a client retry), raise Conflict otherwise. A finished session takes no new
    ops (the SDK's close(): "further operations against it will be rejected"); a retry of one it
    recorded before finishing is still answered. `session_finished`: the finish reason or None
    when the caller already read it (RunContext), False to read it here.

    One `INSERT ... ON CONFLICT DO NOTHING RETURNING` in the usual case (issue 11): a retry or a
    race with one finds its row by the key afterwards, in the same transaction. `wake_queue`: the
    owner's queue, woken by a NOTIFY from the same statement when it commits (app/queue/notify.py)."""
    if session_finished is False:
        session = s.get(Session, session_id)
        session_finished = (session.finish_reason or "finished") if session and session.finished_at else None
    existing: Op | None = None
    if session_finished is None:
        values: dict[str, Any] = {
            c.key: getattr(op_row, c.key) for c in Op.__table__.columns if c.key in op_row.__dict__
        }
        dialect_insert = pg_insert if s.get_bind().dialect.name == "postgresql" else sqlite_insert
        inserted = s.execute(
            dialect_insert(Op)
            .values(**values)
            .on_conflict_do_nothing()
            .returning(Op.request_id, *signal_work(s, wake_queue))
        ).scalar()
        if inserted is not None:
            return str(inserted)
    existing = s.execute(select(Op).where(*key_filter)).scalar_one_or_none()  # type: ignore[arg-type]
    if existing is None:
        raise SessionFinished(
            f"session {session_id!r} was finished ({session_finished}) and takes no new requests; "
            "start a new session (e.g. create_training_client_from_state from a saved checkpoint)"
        )
    if existing.request_sha256 != op_row.request_sha256 or existing.tenant != op_row.tenant:
        raise Conflict(f"{what} was already used for a different request")
    return existing.request_id


def submit_run_op(
    s: DbSession,
    run: Run,
    seq: int,
    op: BaseModel | None,
    *,
    rejected: str | None = None,
    kind: str | None = None,
    raw: bytes = b"",
    rejected_category: str = "user",
    ctx: RunContext | None = None,
) -> Submitted:
    """Queue op `seq` of `run`. With `rejected`, the op is recorded as already failed (category
    `rejected_category`: user, or server for a blocked run): the client still gets a future, and
    the run does not stall on a missing seq. A request too broken to become an op is stored as
    its raw bytes (op None, `kind` given). With `ctx` (run_for_submit) nothing else is read first."""
    if (
        seq < run.next_seq
        and s.execute(select(Op.request_id).where(Op.run_id == run.run_id, Op.seq == seq)).first() is None
    ):
        raise Conflict(f"seq_id {seq} of {run.run_id} is in the past (next is {run.next_seq})")
    now = ctx.now if ctx is not None else db_now(s)
    if op is not None:
        kind = str(getattr(op, "kind", "unknown"))
        payload, digest = canonical_bytes(op), op_sha256(op)
    else:
        assert rejected is not None and kind is not None, "only rejected requests may lack an op"
        payload, digest = raw, hashlib.sha256(raw).hexdigest()
    row = Op(
        request_id=ids.new_request_id(),
        tenant=run.tenant,
        run_id=run.run_id,
        seq=seq,
        kind=kind,
        # forward() shares the forward_backward kind but changes nothing: never replayed.
        mutates=kind in MUTATING_KINDS and not getattr(op, "forward_only", False) and not rejected,
        request_sha256=digest,
        payload=payload,
        input_tokens=usage.input_tokens(op),
        status="failed" if rejected else "queued",
        attempt=0,
        error_message=rejected,
        error_category=rejected_category if rejected else None,
        created_at=now,
        finished_at=now if rejected else None,
    )
    wakeup = ctx.wakeup if ctx is not None else _wakeup_for_run(s, run)
    notify = wakeup.queue != NEW_RUNS_QUEUE and not rejected
    request_id = _insert_or_dedupe(
        s,
        row,
        [Op.run_id == run.run_id, Op.seq == seq],
        f"seq_id {seq} of {run.run_id}",
        run.session_id,
        ctx.session_finished if ctx is not None else False,
        wake_queue=wakeup.queue if notify else None,
    )
    if ctx is None or now - run.last_request_at >= LAST_REQUEST_RESOLUTION_SECONDS:
        run.last_request_at = now
    # An owner that hears the INSERT's NOTIFY needs no Celery message as well (workers.listens,
    # only ever set on PostgreSQL: on SQLite the local doorbell is always rung).
    heard = notify and ctx is not None and ctx.owner_listens
    return Submitted(request_id, None if heard else wakeup)


def create_sampler(
    s: DbSession,
    tenant: str,
    *,
    session_id: str,
    sampling_session_seq_id: int,
    base_model: str,
    model_path: str | None,
) -> Sampler:
    get_session(s, tenant, session_id, live=True)
    sampler_id = ids.sampler_id_for(session_id, sampling_session_seq_id)
    existing = s.get(Sampler, sampler_id)
    if existing is not None:
        if existing.base_model != base_model or existing.model_path != model_path:
            raise Conflict(f"sampling_session_seq_id {sampling_session_seq_id} already names another sampler")
        return existing
    return checkpoints.record_sampler(
        s, sampler_id=sampler_id, session_id=session_id, tenant=tenant, base_model=base_model, model_path=model_path
    )


def sample_row(s: DbSession, tenant: str, op: BaseModel, sampler_id: str | None = None, seq: int | None = None) -> Op:
    """A queued sample-kind op: any worker claims it (claim.claim_sample), in no particular order.
    Also the OpenAI endpoint's completions (app/queue/oai.py), which have no sampler."""
    return Op(
        request_id=ids.new_request_id(),
        tenant=tenant,
        sampler_id=sampler_id,
        sampler_seq=seq,
        kind="sample",
        mutates=False,
        request_sha256=op_sha256(op),
        payload=canonical_bytes(op),
        input_tokens=usage.input_tokens(op),
        status="queued",
        attempt=0,
        created_at=db_now(s),
    )


def submit_sample(s: DbSession, sampler: Sampler, seq: int, op: SampleOp) -> Submitted:
    row = sample_row(s, sampler.tenant, op, sampler.sampler_id, seq)
    request_id = _insert_or_dedupe(
        s,
        row,
        [Op.sampler_id == sampler.sampler_id, Op.sampler_seq == seq],
        f"seq_id {seq} of sampler {sampler.sampler_id}",
        sampler.session_id,
    )
    return Submitted(request_id, Wakeup(NEW_RUNS_QUEUE, None))
