"""StableReinforce through the API on SQLite and PostgreSQL: asample with record_stability_info,
the records a worker commits with the result (app/queue/stability.py, called here as the runner
calls it), forward_backward resolving provenance spans into the op, every way a sequence id can
be unusable (a failed future, category user, nothing recorded against the records), the one-day
lifetime and its restart, and the sweeper's deletion of expired records."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select, update
from tinker import types

from app.db.models import Op, StabilityRecord
from app.domain.ops import ForwardBackwardOp, parse_op
from app.domain.provenance import RECORDED_LOGPROBS, SAMPLED_MASK
from app.domain.results import SampledSequence, SampleResult, result_bytes
from app.queue import stability
from tests.api.helpers import BASE_MODEL, KEY_B, Api, fb_body

PROMPT = [5, 6, 7, 8]
SAMPLED = [[11, 12, 13], [21, 22, 23]]
LOGPROBS = [[-0.5, -1.25, -2.0], [-0.125, -3.5, -0.75]]


def _sampling_session(api: Api, session_id: str, key: str = "") -> str:
    body = {
        "session_id": session_id,
        "sampling_session_seq_id": 0,
        "base_model": BASE_MODEL,
        "type": "create_sampling_session",
    }
    r = api.post("/api/v1/create_sampling_session", body, **({"key": key} if key else {}))
    assert r.status_code == 200, r.text
    return str(r.json()["sampling_session_id"])


def _sample_body(sampler_id: str, record: bool, seq: int) -> dict[str, Any]:
    return {
        "num_samples": 2,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": PROMPT}]},
        "sampling_params": {"max_tokens": 3, "temperature": 1.0, "top_k": -1, "top_p": 1.0},
        "sampling_session_id": sampler_id,
        "seq_id": seq,
        "record_stability_info": record,
        "type": "sample",
    }


def _sample_as_worker(
    api: Api,
    sampler_id: str,
    record: bool = True,
    seq: int = 0,
    prompt: list[int] = PROMPT,
    sampled: list[list[int]] = SAMPLED,
    logprobs: list[list[float]] = LOGPROBS,
) -> list[str]:
    """asample, then what the runner does when the sample finishes: its records, written in the
    commit's transaction (workers/runner.py)."""
    body = _sample_body(sampler_id, record, seq)
    body["prompt"] = {"chunks": [{"type": "encoded_text", "tokens": prompt}]}
    body["num_samples"] = len(sampled)
    r = api.post("/api/v1/asample", body)
    request_id = api.accepted(r)
    ids = r.json()["sample_sequence_ids"]
    result = SampleResult(
        sequences=tuple(
            SampledSequence(tokens=tuple(t), logprobs=tuple(lp), stop_reason="length")
            for t, lp in zip(sampled, logprobs, strict=True)
        )
    )
    with api.db.write() as s:
        payload = s.execute(select(Op.payload).where(Op.request_id == request_id)).scalar_one()
        stability.record_sample(
            s, request_id=request_id, sampler_id=sampler_id, payload=payload, result=result_bytes(result)
        )
    return [str(i) for i in ids]


def _world(api: Api) -> tuple[str, list[str]]:
    """One session with a training run and a recording sampler: (model_id, sequence ids)."""
    session_id = api.session()
    r = api.create_model(session_id)
    assert r.status_code == 200, r.text
    sampler_id = _sampling_session(api, session_id)
    return str(r.json()["model_id"]), _sample_as_worker(api, sampler_id)


def _datum(sequence_id: str, index: int = 0, *, advantage: float = 1.0, **change: Any) -> types.Datum:
    """The cookbook's rl_loop datum: prompt + all but the last sampled token, shifted targets,
    advantages on the sampled targets only, and provenance naming the sequence."""
    sampled = change.get("sampled", SAMPLED[index])
    ob = len(PROMPT) - 1
    adv = change.get("advantages", [0.0] * ob + [advantage] * len(sampled))
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([*PROMPT, *sampled[:-1]]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=[*PROMPT[1:], *sampled], dtype="int64", shape=[ob + len(sampled)]),
            "logprobs": types.TensorData(data=[0.0] * (ob + len(sampled)), dtype="float32", shape=[ob + len(sampled)]),
            "advantages": types.TensorData(data=adv, dtype="float32", shape=[len(adv)]),
            **change.get("extra_inputs", {}),
        },
    )
    if change.get("no_provenance"):
        return datum
    offset = change.get("offset", 0)
    return datum.with_provenance(
        model_input=[
            types.PromptProvenanceSpan(sequence_id=sequence_id, length=len(PROMPT)),
            types.SampledProvenanceSpan(sequence_id=sequence_id, offset=offset, length=len(sampled) - 1),
        ],
        loss_fn_inputs=[
            types.PromptProvenanceSpan(sequence_id=sequence_id, offset=1, length=ob),
            types.SampledProvenanceSpan(sequence_id=sequence_id, offset=offset, length=len(sampled)),
        ],
    )


def _submit(api: Api, model_id: str, data: list[types.Datum], seq: int = 1, key: str | None = None) -> str:
    body = fb_body(model_id, seq, data, loss_fn="stable_reinforce")
    return api.accepted(api.post_proto(body, **({"key": key} if key else {})))


def _expiry(api: Api, sequence_id: str) -> float:
    with api.db.read() as s:
        return float(
            s.execute(select(StabilityRecord.expires_at).where(StabilityRecord.sequence_id == sequence_id)).scalar_one()
        )


def test_sampling_records_one_row_per_sequence(api: Api) -> None:
    session_id = api.session()
    sampler_id = _sampling_session(api, session_id)
    ids = _sample_as_worker(api, sampler_id)
    with api.db.read() as s:
        rows = {
            r.sequence_id: r
            for r in s.execute(select(StabilityRecord).where(StabilityRecord.sequence_id.in_(ids))).scalars()
        }
    assert set(rows) == set(ids)
    for i, sequence_id in enumerate(ids):
        row = rows[sequence_id]
        assert (row.session_id, row.prompt_len) == (session_id, len(PROMPT))
        assert row.expires_at == pytest.approx(row.created_at + stability.RECORD_TTL_SECONDS)
        assert len(row.tokens) == 4 * len(SAMPLED[i]) and len(row.logprobs) == 4 * len(LOGPROBS[i])
    # Without the flag nothing is recorded, and the op's canonical bytes do not mention it.
    plain = _sample_as_worker(api, sampler_id, record=False, seq=1)
    with api.db.read() as s:
        assert not s.execute(select(StabilityRecord).where(StabilityRecord.sequence_id.in_(plain))).first()
        payload = s.execute(select(Op.payload).where(Op.request_id == plain[0].rsplit(":", 1)[0])).scalar_one()
    assert b"record_stability_info" not in payload


def test_forward_backward_reads_the_records_and_restarts_their_day(api: Api) -> None:
    model_id, ids = _world(api)
    with api.db.write() as s:  # an hour into the day
        s.execute(
            update(StabilityRecord)
            .where(StabilityRecord.sequence_id.in_(ids))
            .values(expires_at=StabilityRecord.expires_at - 3600)
        )
    before = _expiry(api, ids[0])
    request_id = _submit(api, model_id, [_datum(ids[0], 0), _datum(ids[1], 1, advantage=-0.5)])
    api.queued(request_id)
    assert _expiry(api, ids[0]) > before + 3000
    with api.db.read() as s:
        op = parse_op(s.execute(select(Op.payload).where(Op.request_id == request_id)).scalar_one())
    assert isinstance(op, ForwardBackwardOp) and op.loss_fn == "stable_reinforce"
    ob = len(PROMPT) - 1
    for d, logprobs in zip(op.data, LOGPROBS, strict=True):
        assert d.loss_fn_inputs[SAMPLED_MASK].tolist() == [0.0] * ob + [1.0] * 3
        assert d.loss_fn_inputs[RECORDED_LOGPROBS].tolist() == [0.0] * ob + logprobs
        assert list(d.loss_fn_inputs) == sorted(d.loss_fn_inputs)


def test_unusable_sequences_fail_the_future_and_touch_nothing(api: Api) -> None:
    model_id, ids = _world(api)
    other_model, other_ids = _world(api)  # another session of the same tenant
    with api.db.write() as s:
        s.execute(update(StabilityRecord).where(StabilityRecord.sequence_id == ids[1]).values(expires_at=0.0))
    day = _expiry(api, ids[0])
    cases: list[tuple[list[types.Datum], str]] = [
        ([_datum("req-nope:0")], "has no stability record"),
        ([_datum(other_ids[0])], "not in this training run's session"),
        ([_datum(ids[0]), _datum(ids[1], 1)], "expired"),
        ([_datum(ids[0], sampled=[11, 12, 99])], "does not match the tokens sampled"),
        ([_datum(ids[0], offset=1, sampled=[12, 13, 99])], "past the end of that sequence"),
        (
            [_datum(ids[0], advantages=[0.5] + [0.0] * 2 + [1.0] * 3)],
            "advantages[0] is 0.5 but target 0 is not a sampled",
        ),
        ([_datum(ids[0], no_provenance=True)], "datum 0 has no provenance"),
        (
            [
                _datum(
                    ids[0],
                    extra_inputs={RECORDED_LOGPROBS: types.TensorData(data=[0.0] * 6, dtype="float32", shape=[6])},
                )
            ],
            "does not use loss_fn_inputs ['recorded_logprobs']",
        ),
    ]
    for seq, (data, phrase) in enumerate(cases, start=1):
        message = api.failed_future(_submit(api, model_id, data, seq=seq))
        assert phrase in message, (phrase, message)
    # None of those restarted a day; the session's own good sequence still trains.
    assert _expiry(api, ids[0]) == day
    api.queued(_submit(api, model_id, [_datum(ids[0])], seq=len(cases) + 1))
    # Another tenant cannot tell a foreign sequence from a missing one.
    foreign = api.model(key=KEY_B)
    assert "has no stability record" in api.failed_future(_submit(api, foreign, [_datum(ids[0])], key=KEY_B), key=KEY_B)
    assert other_model


def test_the_sweeper_deletes_expired_records(api: Api) -> None:
    _model_id, ids = _world(api)
    with api.db.write() as s:
        s.execute(update(StabilityRecord).where(StabilityRecord.sequence_id == ids[0]).values(expires_at=1.0))
    with api.db.write() as s:
        assert stability.expire_records(s) >= 1
    with api.db.read() as s:
        left = set(s.execute(select(StabilityRecord.sequence_id).where(StabilityRecord.sequence_id.in_(ids))).scalars())
    assert left == {ids[1]}


def test_a_multi_turn_datum_names_two_sequences(api: Api) -> None:
    """tinker-cookbook's rl/data_processing: turn 2's prompt is turn 1's prompt, its answer and a
    new observation; one datum covers both turns, each run naming the request it came from."""
    session_id = api.session()
    model_id = str(api.create_model(session_id).json()["model_id"])
    sampler_id = _sampling_session(api, session_id)
    (first,) = _sample_as_worker(api, sampler_id, sampled=[SAMPLED[0]], logprobs=[LOGPROBS[0]])
    turn2_prompt = [*PROMPT, *SAMPLED[0], 9]
    (second,) = _sample_as_worker(
        api, sampler_id, seq=1, prompt=turn2_prompt, sampled=[[31, 32]], logprobs=[[-0.25, -1.5]]
    )
    full = [*turn2_prompt, 31, 32]
    n = len(full) - 1
    sampled_targets = set(range(len(PROMPT) - 1, len(PROMPT) + 2)) | {n - 2, n - 1}
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(full[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=full[1:], dtype="int64", shape=[n]),
            "advantages": types.TensorData(
                data=[1.0 if t in sampled_targets else 0.0 for t in range(n)], dtype="float32", shape=[n]
            ),
        },
    ).with_provenance(
        model_input=[
            types.PromptProvenanceSpan(sequence_id=first, length=len(PROMPT)),
            types.SampledProvenanceSpan(sequence_id=first, length=3),
            types.PromptProvenanceSpan(sequence_id=second, offset=len(turn2_prompt) - 1, length=1),
            types.SampledProvenanceSpan(sequence_id=second, length=1),
        ],
        loss_fn_inputs=[
            types.PromptProvenanceSpan(sequence_id=first, offset=1, length=len(PROMPT) - 1),
            types.SampledProvenanceSpan(sequence_id=first, length=3),
            types.PromptProvenanceSpan(sequence_id=second, offset=len(turn2_prompt) - 1, length=1),
            types.SampledProvenanceSpan(sequence_id=second, length=2),
        ],
    )
    request_id = _submit(api, model_id, [datum])
    api.queued(request_id)
    with api.db.read() as s:
        op = parse_op(s.execute(select(Op.payload).where(Op.request_id == request_id)).scalar_one())
    assert isinstance(op, ForwardBackwardOp)
    (d,) = op.data
    assert d.loss_fn_inputs[SAMPLED_MASK].tolist() == [1.0 if t in sampled_targets else 0.0 for t in range(n)]
    assert d.loss_fn_inputs[RECORDED_LOGPROBS].tolist() == [0.0] * 3 + LOGPROBS[0] + [0.0, -0.25, -1.5]
