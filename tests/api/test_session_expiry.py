"""Sessions whose client went quiet (docs/sessions.md): reported `expired` once nothing was heard
for session_timeout_seconds, never refused, revived by the next heartbeat or request, and their
runs, samplers and futures keep working. Time is moved by rewriting the activity timestamps in the
database, not by sleeping.

The last test runs the real SDK against a live server with a worker: a client that comes back
after its session expired trains and samples on as if nothing happened.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from tinker import types

from app.db.engine import db_now
from app.db.models import Op, Run, Sampler, Session
from tests.api.helpers import BASE_MODEL, Api, adam, assert_error, fb_body

HOUR = 3600.0


def _go_quiet(api: Api, session_id: str, seconds: float = HOUR) -> None:
    """Pretend the session's last heartbeat, training request and sample request were `seconds` ago."""
    with api.db.write() as s:
        past = db_now(s) - seconds
        s.execute(update(Session).where(Session.session_id == session_id).values(last_heartbeat_at=past))
        s.execute(update(Run).where(Run.session_id == session_id).values(last_request_at=past))
        samplers = select(Sampler.sampler_id).where(Sampler.session_id == session_id)
        s.execute(update(Op).where(Op.sampler_id.in_(samplers)).values(created_at=past))


def _state(api: Api, session_id: str) -> str:
    got = api.get(f"/api/v1/sessions/{session_id}")
    assert got.status_code == 200, got.text
    return str(got.json()["tuft_state"])


def _summary(api: Api, session_id: str, **filters: Any) -> dict[str, Any] | None:
    r = api.post("/api/v1/sessions/search", {"session_id": session_id, **filters})
    assert r.status_code == 200, r.text
    found = r.json()["sessions"]
    assert len(found) <= 1
    # What the 0.38 SDK makes of it.
    types.SessionSearchResponse.model_validate(r.json())
    return found[0] if found else None


def _heartbeat(api: Api, session_id: str) -> Any:
    return api.post("/api/v1/session_heartbeat", {"session_id": session_id, "type": "session_heartbeat"})


def test_quiet_session_is_expired_in_get_and_search(api: Api) -> None:
    session_id = api.session()
    assert _state(api, session_id) == "active"
    # Just inside the timeout: still active.
    _go_quiet(api, session_id, api.settings.session_timeout_seconds - 30)
    assert _state(api, session_id) == "active"

    _go_quiet(api, session_id, api.settings.session_timeout_seconds + 30)
    assert _state(api, session_id) == "expired"
    summary = _summary(api, session_id)
    assert summary is not None
    # The SDK's status model has no "expired": None is its "neither finished nor known to be running".
    assert summary["status"] is None and summary["tuft_state"] == "expired"
    assert _summary(api, session_id, statuses=[{"type": "expired"}]) is not None
    assert _summary(api, session_id, statuses=[{"type": "active"}]) is None
    # Still listed and readable.
    assert session_id in api.get("/api/v1/sessions?limit=1000").json()["sessions"]


def test_heartbeat_revives_an_expired_session(api: Api) -> None:
    session_id = api.session()
    _go_quiet(api, session_id)
    assert _state(api, session_id) == "expired"
    r = _heartbeat(api, session_id)
    assert r.status_code == 200, r.text
    assert r.json() == {"type": "session_heartbeat"}
    assert _state(api, session_id) == "active"
    summary = _summary(api, session_id)
    assert summary is not None and summary["status"] == {"type": "active"}


def test_a_heartbeat_writes_only_when_the_stored_one_is_old(api: Api) -> None:
    # 1,000 sessions beat 100 times a second (issue 11): a heartbeat within a tenth of
    # session_timeout_seconds of the stored one only checks the session; an older one is written.
    session_id = api.session()
    share = api.settings.session_timeout_seconds * 0.1

    def stored() -> float:
        with api.db.read() as s:
            return float(s.get_one(Session, session_id).last_heartbeat_at)

    def beat_after(seconds: float) -> tuple[float, float]:
        with api.db.write() as s:
            now = db_now(s)
            s.execute(update(Session).where(Session.session_id == session_id).values(last_heartbeat_at=now - seconds))
        assert _heartbeat(api, session_id).status_code == 200
        return now, stored()

    now, after = beat_after(share - 10)
    assert after == pytest.approx(now - (share - 10))  # recent enough: not rewritten
    now, after = beat_after(share + 10)
    assert after >= now  # old: rewritten to the database's clock


def test_runs_samplers_and_futures_of_an_expired_session_keep_working(api: Api) -> None:
    session_id = api.session()
    created = api.create_model(session_id)
    model_id = created.json()["model_id"]
    create_future = created.json()["request_id"]
    queued = api.accepted(api.post_proto(fb_body(model_id, 1)))
    _go_quiet(api, session_id)
    assert _state(api, session_id) == "expired"

    # Futures: the finished one still answers with its result, the queued one is still queued.
    done = api.retrieve(create_future)
    assert done.status_code == 200 and done.json()["model_id"] == model_id, done.text
    api.pending_future(queued)
    # The run takes its next op, and that request alone makes the session active again.
    optim = {"model_id": model_id, "seq_id": 2, "adam_params": adam(), "type": "optim_step"}
    api.queued(api.accepted(api.post("/api/v1/optim_step", optim)))
    assert _state(api, session_id) == "active"

    # Expired again: a new model and a new sampler may still be made in it, and sampled from.
    _go_quiet(api, session_id)
    assert _state(api, session_id) == "expired"
    assert api.create_model(session_id, 1).status_code == 200
    _go_quiet(api, session_id)
    body = {"session_id": session_id, "sampling_session_seq_id": 0, "base_model": BASE_MODEL}
    r = api.post("/api/v1/create_sampling_session", body)
    assert r.status_code == 200, r.text
    sampler_id = r.json()["sampling_session_id"]
    assert _state(api, session_id) == "expired"  # making a sampler is not a sign of life; sampling is
    sample = {
        "sampling_session_id": sampler_id,
        "seq_id": 0,
        "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
        "sampling_params": {"max_tokens": 2},
    }
    api.queued(api.accepted(api.post("/api/v1/asample", sample)))
    assert _state(api, session_id) == "active"
    info = api.get(f"/api/v1/sessions/{session_id}").json()
    assert info["training_run_ids"] == [model_id, f"{session_id}:train:1"] and info["sampler_ids"] == [sampler_id]


def test_finishing_an_expired_session_ends_it_for_good(api: Api) -> None:
    session_id = api.session()
    _go_quiet(api, session_id)
    r = api.post(f"/api/v1/sessions/{session_id}/finish", {"reason": {"type": "errored"}})
    assert r.status_code == 200, r.text
    assert _state(api, session_id) == "finished"
    summary = _summary(api, session_id)
    assert summary is not None
    assert summary["status"] == {"type": "client_finished", "reason": {"type": "errored"}}
    # Finished, unlike expired, is final: the heartbeat gets the 410 that stops the SDK's loop.
    assert_error(_heartbeat(api, session_id), 410, error="session_finished")
    assert_error(api.create_model(session_id), 410, error="session_finished")
    assert _state(api, session_id) == "finished"


def test_a_finished_session_takes_no_new_ops_but_answers_retries(api: Api) -> None:
    """After finish (the SDK's close()), "further operations are rejected": new training ops and
    samples get 410; a retry of an op recorded before the finish still gets its future."""
    session_id = api.session()
    model_id = api.create_model(session_id).json()["model_id"]
    body = {"session_id": session_id, "sampling_session_seq_id": 0, "base_model": BASE_MODEL}
    sampler_id = api.post("/api/v1/create_sampling_session", body).json()["sampling_session_id"]
    optim = {"model_id": model_id, "seq_id": 1, "adam_params": adam(), "type": "optim_step"}
    recorded = api.accepted(api.post("/api/v1/optim_step", optim))
    sample = {
        "sampling_session_id": sampler_id,
        "seq_id": 0,
        "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
        "sampling_params": {"max_tokens": 2},
    }
    sampled = api.accepted(api.post("/api/v1/asample", sample))
    assert api.post(f"/api/v1/sessions/{session_id}/finish", {"reason": {"type": "success"}}).status_code == 200

    # Retries of what was recorded: the same futures.
    assert api.accepted(api.post("/api/v1/optim_step", optim)) == recorded
    assert api.accepted(api.post("/api/v1/asample", sample)) == sampled
    # Anything new: 410, and nothing is written.
    err = assert_error(api.post("/api/v1/optim_step", {**optim, "seq_id": 2}), 410, error="session_finished")
    assert "was finished" in err["message"]
    assert_error(api.post_proto(fb_body(model_id, 2)), 410, error="session_finished")
    assert_error(api.post("/api/v1/asample", {**sample, "seq_id": 1}), 410, error="session_finished")
    with api.db.read() as s:
        seqs = s.execute(select(Op.seq).where(Op.run_id == model_id)).scalars().all()
        assert sorted(seqs, key=lambda q: -1 if q is None else q) == [None, 1]  # create_model, optim_step
        assert len(s.execute(select(Op.request_id).where(Op.sampler_id == sampler_id)).all()) == 1
    # Its futures still answer.
    api.pending_future(recorded)


def test_timeout_must_exceed_the_sdk_heartbeat_period(tmp_path: Path) -> None:
    from app.config import ConfigError, load_settings

    assert load_settings(data_dir=tmp_path, session_timeout_seconds=30).session_timeout_seconds == 30
    with pytest.raises(ConfigError, match="session_timeout_seconds"):
        load_settings(data_dir=tmp_path, session_timeout_seconds=5)


# The real SDK against a live server


def _expire_in_file(db_file: Path, session_id: str) -> None:
    with sqlite3.connect(db_file, timeout=30) as conn:
        past = time.time() - HOUR
        conn.execute("UPDATE sessions SET last_heartbeat_at = ? WHERE session_id = ?", (past, session_id))
        conn.execute("UPDATE runs SET last_request_at = ? WHERE session_id = ?", (past, session_id))
        conn.execute(
            "UPDATE ops SET created_at = ? WHERE sampler_id IN (SELECT sampler_id FROM samplers WHERE session_id = ?)",
            (past, session_id),
        )


@pytest.mark.e2e
def test_sdk_client_returning_after_expiry_trains_on(tmp_path: Path) -> None:
    import httpx
    import tinker

    from tests.e2e.server import embedded

    server = embedded(tmp_path).start()
    try:
        client = tinker.ServiceClient(base_url=server.url, api_key="tml-local-dev-key")
        made: Any = client.create_lora_training_client(base_model=BASE_MODEL, rank=8, seed=0)
        training = made.result() if hasattr(made, "result") else made  # 0.38: a future; 0.25: the client
        datum = types.Datum(
            model_input=types.ModelInput.from_ints([1, 2, 3]),
            loss_fn_inputs={
                "target_tokens": types.TensorData(data=[2, 3, 4], dtype="int64", shape=[3]),
                "weights": types.TensorData(data=[1.0, 1.0, 1.0], dtype="float32", shape=[3]),
            },
        )
        first = training.forward_backward([datum], "cross_entropy").result(timeout=120).metrics["loss:sum"]
        training.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=120)
        session_id = training.model_id.split(":")[0]
        headers = {"X-API-Key": "tml-local-dev-key"}

        # The SDK heartbeats every 10 s from its own thread, so one may land between the rewrite
        # and the read; then the session really was heard from, and we try again.
        for _ in range(5):
            _expire_in_file(server.data_dir / "tuft.db", session_id)
            state = httpx.get(f"{server.url}/api/v1/sessions/{session_id}", headers=headers).json()["tuft_state"]
            if state == "expired":
                break
        assert state == "expired"

        # The client carries on: same training client, same run, same session.
        again = training.forward_backward([datum], "cross_entropy").result(timeout=120).metrics["loss:sum"]
        assert again < first
        training.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=120)
        made = training.save_weights_and_get_sampling_client()
        sampler = made.result() if hasattr(made, "result") else made
        out = sampler.sample(types.ModelInput.from_ints([1, 2, 3]), 1, types.SamplingParams(max_tokens=2)).result(
            timeout=120
        )
        assert len(out.sequences[0].tokens) == 2
        state = httpx.get(f"{server.url}/api/v1/sessions/{session_id}", headers=headers).json()["tuft_state"]
        assert state == "active"
    finally:
        server.stop()
