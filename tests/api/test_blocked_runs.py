"""A blocked or cancelled run fails its waiting futures with a clear reason; none polls forever
(issue 7 item 8).

No worker runs here: the worker's side (taking the run, blocking it) is played with the queue
functions a worker calls, on the app's own database.
"""

from __future__ import annotations

import uuid

from sqlalchemy import select

from app.db.engine import db_now
from app.db.models import Op, Run
from app.queue import admin, commit, leases
from tests.api.helpers import Api, adam


def _optim(api: Api, model_id: str, seq: int) -> str:
    body = {"model_id": model_id, "seq_id": seq, "adam_params": adam(learning_rate=1e-4 * seq)}
    return api.accepted(api.post("/api/v1/optim_step", body))


def _take_and_block(api: Api, model_id: str, reason: str) -> None:
    """What a worker does when a run's state cannot be rebuilt: it holds the lease (given here to
    this run alone: the app is shared with other tests), then blocks the run."""
    worker = f"w-{uuid.uuid4().hex[:8]}"
    with api.db.write() as s:
        leases.register_worker(s, worker_id=worker, host="h", device="cpu", queue=f"q-{worker}", pid=1)
        run = s.get(Run, model_id)
        assert run is not None
        run.owner_worker, run.lease_epoch, run.lease_expires_at = worker, run.lease_epoch + 1, db_now(s) + 60
        epoch = run.lease_epoch
    with api.db.write() as s:
        commit.block_run(s, worker_id=worker, run_id=model_id, epoch=epoch, reason=reason)


def _failed(api: Api, request_id: str) -> dict[str, str]:
    r = api.retrieve(request_id)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"error", "category"}, body
    return dict(body)


def test_blocking_fails_waiting_futures_and_refuses_new_ops(api: Api) -> None:
    model_id = api.model()
    waiting = [_optim(api, model_id, seq) for seq in (1, 2)]
    _take_and_block(api, model_id, "RuntimeError: snapshot 7 does not verify")
    for request_id in waiting:
        body = _failed(api, request_id)
        assert body["category"] == "server", body
        assert "blocked" in body["error"] and "snapshot 7 does not verify" in body["error"], body
        assert "tuft runs resume" in body["error"], body
    # An op sent while it stays blocked fails at once too, rather than waiting for an operator.
    late = _optim(api, model_id, 3)
    body = _failed(api, late)
    assert body["category"] == "server" and "blocked" in body["error"], body
    # The REST view reports it, as before.
    assert api.get(f"/api/v1/training_runs/{model_id}").json()["corrupted"] is True

    # Resume: the run is active again at its last committed state; the ops that failed stay
    # failed (a worker moves past them), and new ops queue normally.
    with api.db.write() as s:
        admin.resume(s, model_id)
    with api.db.read() as s:
        run = s.get(Run, model_id)
        assert run is not None and run.status == "active" and run.applied_seq == 0
        statuses = dict(s.execute(select(Op.seq, Op.status).where(Op.run_id == model_id, Op.seq > 0)).all())
    assert statuses == {1: "failed", 2: "failed", 3: "failed"}
    api.queued(_optim(api, model_id, 4))


def test_resume_retry_requeues_the_op_that_failed_when_blocking(api: Api) -> None:
    model_id = api.model()
    first, second = (_optim(api, model_id, seq) for seq in (1, 2))
    _take_and_block(api, model_id, "poison")
    with api.db.write() as s:
        assert admin.resume(s, model_id, "retry") == first
    # Its future is pending again (a client that polls it, or re-sends it, gets the new outcome);
    # the other stays failed.
    api.pending_future(first)
    with api.db.read() as s:
        op = s.get(Op, first)
        assert op is not None and (op.status, op.error_message, op.error_category) == ("queued", None, None)
    assert _failed(api, second)["category"] == "server"


def test_cancel_fails_waiting_futures_and_refuses_new_ops(api: Api) -> None:
    model_id = api.model()
    waiting = _optim(api, model_id, 1)
    with api.db.write() as s:
        assert admin.cancel(s, model_id) == 1
    assert "cancelled" in api.failed_future(waiting)
    assert "cancelled" in api.failed_future(_optim(api, model_id, 2))


def test_a_paused_run_still_queues(api: Api) -> None:
    # Paused on purpose by an operator: its ops wait for the resume, as documented.
    model_id = api.model()
    with api.db.write() as s:
        admin.pause(s, model_id)
    api.queued(_optim(api, model_id, 1))
