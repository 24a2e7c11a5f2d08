"""The queue state of a try_again (issue 10 item 7): why a future is still pending, in the SDK's own
vocabulary, with the reason the SDK logs to the user, and the position and an estimate where known.

Each test has an app of its own: workers and pending samples are global, so a shared app's other
tests would change the answers. No worker process runs; a live worker is a workers row with a fresh
heartbeat, and a run it holds a lease on, exactly as leases.register_worker/acquire_runs write them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from tinker.types.try_again_response import TryAgainResponse

from app.db.engine import db_now
from app.db.models import Op, Run, Worker
from app.queue import admin, leases
from tests.api.helpers import KEY_A, KEY_B, Api, fb_body, make_settings, running_app


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fresh(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Api]:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    with running_app(make_settings(tmp_path / "data", url)) as api:
        yield api


def _try_again(api: Api, request_id: str, key: str = KEY_A) -> dict[str, Any]:
    r = api.retrieve(request_id, key=key)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    # Still what every SDK parses: its own model validates it, and the state is one of its literals.
    parsed = TryAgainResponse.model_validate(body)
    assert parsed.request_id == request_id
    return body


def _live_worker(api: Api, name: str = "w-test") -> None:
    with api.db.write() as s:
        leases.register_worker(s, worker_id=name, host="h", device="cpu", queue=f"q-{name}", pid=1)


def _hold(api: Api, model_id: str, worker: str = "w-test") -> None:
    """The worker holds the run's lease, as acquire_runs leaves it."""
    with api.db.write() as s:
        s.execute(
            update(Run)
            .where(Run.run_id == model_id)
            .values(owner_worker=worker, lease_epoch=Run.lease_epoch + 1, lease_expires_at=db_now(s) + 600)
        )


def _submit(api: Api, model_id: str, seq: int) -> str:
    return api.accepted(api.post_proto(fb_body(model_id, seq)))


def _sample(api: Api, sampler_id: str, seq: int, key: str) -> str:
    body = {
        "sampling_session_id": sampler_id,
        "seq_id": seq,
        "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
        "sampling_params": {"max_tokens": 4, "temperature": 1.0, "top_k": -1, "top_p": 1.0},
        "type": "sample",
    }
    return api.accepted(api.post("/api/v1/asample", body, key=key))


def test_no_worker_pauses_training_and_sampling_with_the_reason(fresh: Api) -> None:
    fb = _submit(fresh, fresh.model(), 1)
    body = _try_again(fresh, fb)
    assert body["queue_state"] == "paused_capacity"
    assert body["queue_state_reason"] == (
        "waiting for a worker: no TuFT worker is running (start one with `tuft worker`)"
    )
    sample = _sample(fresh, fresh.sampler(), 0, KEY_A)
    assert _try_again(fresh, sample)["queue_state_reason"] == body["queue_state_reason"]
    # A worker that stopped (release_all) is no worker either.
    _live_worker(fresh)
    with fresh.db.write() as s:
        leases.release_all(s, "w-test")
    assert _try_again(fresh, fb)["queue_state"] == "paused_capacity"


def test_paused_run_reports_the_pause_and_how_to_resume(fresh: Api) -> None:
    model_id = fresh.model()
    _live_worker(fresh)
    fb = _submit(fresh, model_id, 1)
    with fresh.db.write() as s:
        admin.pause(s, model_id)
    body = _try_again(fresh, fb)
    assert body["queue_state"] == "paused_capacity"
    assert body["queue_state_reason"] == (
        f"training run {model_id} is paused (paused by an operator); it runs again after `tuft runs resume {model_id}`"
    )
    with fresh.db.write() as s:
        admin.resume(s, model_id)
    # Active again, with a live worker but nobody holding it yet.
    body = _try_again(fresh, fb)
    assert body["queue_state"] == "paused_capacity"
    assert body["queue_state_reason"] == f"waiting for one of 1 live worker(s) to take training run {model_id}"
    _hold(fresh, model_id)
    body = _try_again(fresh, fb)
    assert (body["queue_state"], body["queue_state_reason"], body["queue_position"]) == ("active", "next in its run", 0)
    # No op of the run has finished yet: no estimate.
    assert "queue_estimate_seconds" not in body


def test_op_behind_earlier_ops_of_its_run_has_position_and_estimate(fresh: Api) -> None:
    model_id = fresh.model()
    _live_worker(fresh)
    _hold(fresh, model_id)
    ids = [_submit(fresh, model_id, seq) for seq in (1, 2, 3, 4)]
    # seq 1 finished in 2 s and seq 2 is running: the worker's commit and claim, as rows.
    with fresh.db.write() as s:
        now = db_now(s)
        s.execute(
            update(Op)
            .where(Op.request_id == ids[0])
            .values(status="succeeded", started_at=now - 3, finished_at=now - 1, result=b"{}")
        )
        s.execute(update(Run).where(Run.run_id == model_id).values(next_seq=2, applied_seq=1))
        s.execute(update(Op).where(Op.request_id == ids[1]).values(status="running", started_at=now))
    body = _try_again(fresh, ids[3])
    assert body["queue_state"] == "active"
    assert body["queue_state_reason"] == f"2 earlier operation(s) of training run {model_id} run first"
    assert body["queue_position"] == 2
    # Three ops (seq 2, 3 and itself) at the run's mean of 2 s each.
    assert body["queue_estimate_seconds"] == pytest.approx(6.0, abs=0.01)
    running = _try_again(fresh, ids[1])
    assert (running["queue_state_reason"], running["queue_position"]) == ("running", 0)
    assert running["queue_estimate_seconds"] == pytest.approx(2.0, abs=0.01)


def test_op_waiting_for_an_earlier_seq_id_names_it(fresh: Api) -> None:
    model_id = fresh.model()
    _live_worker(fresh)
    _hold(fresh, model_id)
    # A chunked forward_backward sends its first chunk last: seq 3 and 2 wait for 1.
    _submit(fresh, model_id, 2)
    third = _submit(fresh, model_id, 3)
    body = _try_again(fresh, third)
    assert body["queue_state"] == "active"
    assert body["queue_state_reason"] == f"waiting for seq_id 1 of training run {model_id}, which has not been sent yet"
    assert body["queue_position"] == 2


def test_sample_reports_its_place_in_the_fair_queue(fresh: Api) -> None:
    _live_worker(fresh)
    sampler_b = fresh.sampler(KEY_B)
    sampler_a = fresh.sampler(KEY_A)
    b1, _b2, b3 = (_sample(fresh, sampler_b, seq, KEY_B) for seq in range(3))
    a1 = _sample(fresh, sampler_a, 0, KEY_A)
    a2 = _sample(fresh, sampler_a, 1, KEY_A)
    first = _try_again(fresh, b1, KEY_B)
    assert (first["queue_state"], first["queue_state_reason"], first["queue_position"]) == (
        "active",
        "next in the sampling queue",
        0,
    )
    # Tenant A's first sample goes right after B's first (turns are per tenant), not after all three.
    body = _try_again(fresh, a1)
    assert body["queue_state"] == "paused_capacity"
    assert body["queue_state_reason"] == "1 sample ahead of this one in the fair sampling queue, served by 1 worker(s)"
    assert body["queue_position"] == 1
    # b1, a1 (turn 1) and b2 (turn 2, older) go before a2; b3 (turn 3) after it.
    assert _try_again(fresh, a2)["queue_position"] == 3
    assert _try_again(fresh, b3, KEY_B)["queue_position"] == 4
    # A running sample is in service, not ahead of anyone.
    with fresh.db.write() as s:
        s.execute(update(Op).where(Op.request_id == b1).values(status="running", claimed_by="w-test"))
    assert _try_again(fresh, a1)["queue_position"] == 0
    assert _try_again(fresh, b1, KEY_B)["queue_state_reason"] == "running"


def test_dead_worker_counts_as_none(fresh: Api) -> None:
    """A worker whose heartbeat stopped three lease periods ago is gone, as the sweeper judges."""
    _live_worker(fresh)
    with fresh.db.write() as s:
        ttl = fresh.settings.lease_ttl_seconds
        s.execute(update(Worker).where(Worker.worker_id == "w-test").values(heartbeat_at=db_now(s) - 3 * ttl - 5))
    sample = _sample(fresh, fresh.sampler(), 0, KEY_A)
    assert _try_again(fresh, sample)["queue_state_reason"].startswith("waiting for a worker: no TuFT worker")
