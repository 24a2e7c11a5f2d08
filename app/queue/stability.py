"""StableReinforce's sampling records (docs/losses.md, `stable_reinforce`).

A sample asked with `record_stability_info` leaves one row per sequence, written in the same
transaction as its result (so a client that saw the result can always train on it). A
forward_backward names those rows by sequence id; each use restarts the row's day, and the sweeper
deletes rows whose day has passed. Tinker's docs: "Recorded sequences belong to the session that
sampled them, and can be trained on for one day after sampling. Each training request that uses a
sequence restarts that day."
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from sys import byteorder

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session as DbSession

from app.db.engine import db_now
from app.db.models import Sampler, StabilityRecord
from app.domain.errors import InvalidInput
from app.domain.ops import ForwardBackwardOp, SampleOp, parse_op
from app.domain.provenance import RECORDED_LOGPROBS, SAMPLED_MASK, DatumProvenance, SequenceRecord, resolve_datum
from app.domain.results import SampleResult, parse_result
from app.domain.tensors import Array

RECORD_TTL_SECONDS = 86400.0
# Rows deleted per sweeper statement.
BATCH = 1000
# canonical_bytes writes the flag only when true (app/domain/ops.py): a cheap test before parsing.
_FLAG = b'"record_stability_info":true'


def _pack(typecode: str, values: Iterable[float | int]) -> bytes:
    data = array(typecode, values)
    if byteorder != "little":
        data.byteswap()
    return data.tobytes()


def _unpack(typecode: str, raw: bytes) -> tuple[float | int, ...]:
    data = array(typecode)
    data.frombytes(raw)
    if byteorder != "little":
        data.byteswap()
    return tuple(data)


def record_sample(s: DbSession, *, request_id: str, sampler_id: str, payload: bytes, result: bytes | None) -> int:
    """Rows for the sequences of a succeeded sample that asked for them; how many were written."""
    if result is None or _FLAG not in payload:
        return 0
    op = parse_op(payload)
    sample = parse_result(result)
    if not isinstance(op, SampleOp) or not op.record_stability_info or not isinstance(sample, SampleResult):
        return 0
    sampler = s.get(Sampler, sampler_id)
    if sampler is None:
        return 0
    now = db_now(s)
    written = 0
    for i, seq in enumerate(sample.sequences):
        if seq.logprobs is None:
            continue
        s.add(
            StabilityRecord(
                sequence_id=f"{request_id}:{i}",
                tenant=sampler.tenant,
                session_id=sampler.session_id,
                prompt_len=len(op.prompt),
                tokens=_pack("i", seq.tokens),
                logprobs=_pack("f", seq.logprobs),
                created_at=now,
                expires_at=now + RECORD_TTL_SECONDS,
            )
        )
        written += 1
    return written


def load_records(s: DbSession, *, tenant: str, session_id: str, sequence_ids: set[str]) -> dict[str, SequenceRecord]:
    """The named records; InvalidInput if any is unusable. Reads only: see `restart_day`."""
    if not sequence_ids:
        return {}
    rows = {
        row.sequence_id: row
        for row in s.execute(
            select(StabilityRecord).where(StabilityRecord.sequence_id.in_(sorted(sequence_ids)))
        ).scalars()
    }
    now = db_now(s)
    for sequence_id in sorted(sequence_ids):
        row = rows.get(sequence_id)
        # Another tenant's row reads as unknown: its existence is not this caller's business.
        if row is None or row.tenant != tenant:
            raise InvalidInput(
                f"sequence_id {sequence_id!r} has no stability record: it was not sampled by a sampling client "
                "created with record_stability_info=True, or its record expired (one day after sampling or "
                "after the last training request that used it)"
            )
        if row.session_id != session_id:
            raise InvalidInput(
                f"sequence_id {sequence_id!r} was sampled in session {row.session_id}, not in this training "
                f"run's session {session_id}; sample and train in the same session"
            )
        if row.expires_at < now:
            raise InvalidInput(
                f"the stability record of sequence_id {sequence_id!r} expired (one day after sampling or after "
                "the last training request that used it)"
            )
    return {
        sequence_id: SequenceRecord(
            prompt_len=row.prompt_len,
            tokens=tuple(int(t) for t in _unpack("i", row.tokens)),
            logprobs=tuple(float(v) for v in _unpack("f", row.logprobs)),
        )
        for sequence_id, row in rows.items()
    }


def restart_day(s: DbSession, sequence_ids: set[str]) -> None:
    """A training request used these records: each lives one more day from now."""
    s.execute(
        update(StabilityRecord)
        .where(StabilityRecord.sequence_id.in_(sorted(sequence_ids)))
        .values(expires_at=db_now(s) + RECORD_TTL_SECONDS)
    )


def with_recorded_inputs(
    s: DbSession,
    *,
    tenant: str,
    session_id: str,
    op: ForwardBackwardOp,
    provenance: tuple[DatumProvenance | None, ...],
) -> ForwardBackwardOp:
    """`op` with each datum's recorded inputs added (app/domain/provenance.py); InvalidInput,
    with nothing written, when a datum has no provenance or names an unusable record."""
    missing = next((i for i, p in enumerate(provenance) if p is None), None)
    if missing is not None:
        raise InvalidInput(
            f"datum {missing} has no provenance: {op.loss_fn} needs every datum to name its sampled sequences "
            "(Datum.with_provenance, with the sequence_id of each sampled sequence)"
        )
    wanted = set().union(*(p.sequence_ids() for p in provenance if p is not None))
    records = load_records(s, tenant=tenant, session_id=session_id, sequence_ids=wanted)
    data = []
    for i, (datum, prov) in enumerate(zip(op.data, provenance, strict=True)):
        assert prov is not None
        inputs = datum.loss_fn_inputs
        resolved = resolve_datum(
            i,
            datum.tokens,
            [int(t) for t in inputs["target_tokens"].tolist()],
            [float(a) for a in inputs["advantages"].tolist()],
            prov,
            records,
        )
        added = {
            RECORDED_LOGPROBS: Array.from_list(resolved.recorded_logprobs, "float32"),
            SAMPLED_MASK: Array.from_list(resolved.sampled_mask, "float32"),
        }
        # Sorted names, as the codec builds them: the op's canonical bytes stay canonical.
        merged = {**inputs, **added}
        data.append(datum.model_copy(update={"loss_fn_inputs": {k: merged[k] for k in sorted(merged)}}))
    # Last, once every datum resolved: a rejected op is recorded in this same transaction, and
    # must not have restarted anything.
    restart_day(s, wanted)
    return op.model_copy(update={"data": tuple(data)})


def expire_records(s: DbSession, batch: int = BATCH) -> int:
    """Delete up to `batch` records whose day has passed (through ix_stability_records_expires_at)."""
    due = select(StabilityRecord.sequence_id).where(StabilityRecord.expires_at < db_now(s)).limit(batch)
    done = s.execute(delete(StabilityRecord).where(StabilityRecord.sequence_id.in_(due.scalar_subquery())))
    return int(done.rowcount)  # type: ignore[attr-defined]
