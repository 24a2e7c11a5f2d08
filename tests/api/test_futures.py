"""retrieve_future: unknown and foreign ids, the long poll of a pending op, and finished futures."""

from __future__ import annotations

import time

from tinker import types
from tinker.types.try_again_response import TryAgainResponse

from tests.api.helpers import KEY_B, LONG_POLL_SECONDS, VOCAB, Api, assert_error, ce_datum, fb_body


def test_unknown_request_id_is_404(api: Api) -> None:
    err = assert_error(api.retrieve("req-does-not-exist"), 404, error="not_found")
    assert "req-does-not-exist" in err["message"]


def test_another_tenants_future_looks_unknown(api: Api) -> None:
    model_id = api.model()
    request_id = api.accepted(api.post_proto(fb_body(model_id, 1)))
    foreign = api.retrieve(request_id, key=KEY_B)
    unknown = api.retrieve(request_id[:-4] + "0000", key=KEY_B)
    foreign_body = assert_error(foreign, 404, error="not_found")
    unknown_body = assert_error(unknown, 404, error="not_found")
    # Same status, same shape, same wording: only the echoed id differs.
    assert foreign_body["message"].replace(request_id, "ID") == unknown_body["message"].replace(
        request_id[:-4] + "0000", "ID"
    )
    # Failed futures are no more visible across tenants than queued ones.
    failed = api.accepted(api.post_proto(fb_body(model_id, 2, [ce_datum([VOCAB])])))
    assert_error(api.retrieve(failed, key=KEY_B), 404, error="not_found")
    api.failed_future(failed)


def test_pending_op_answers_try_again_after_the_long_poll(api: Api) -> None:
    request_id = api.accepted(api.post_proto(fb_body(api.model(), 1)))
    start = time.monotonic()
    r = api.retrieve(request_id)
    elapsed = time.monotonic() - start
    assert r.status_code == 200, r.text
    body = TryAgainResponse.model_validate(r.json())
    assert body.request_id == request_id
    # No worker runs in these tests (or only test rows of one that holds no run): a pause, with why.
    assert body.queue_state == "paused_capacity"
    assert "worker" in r.json()["queue_state_reason"]
    # Held for the long poll (not a busy loop for the SDK), but not much longer.
    assert LONG_POLL_SECONDS * 0.8 <= elapsed < LONG_POLL_SECONDS + 1.0, elapsed


def test_failed_future_parses_as_the_sdk_reads_it(api: Api) -> None:
    request_id = api.accepted(api.post_proto(fb_body(api.model(), 1, [ce_datum([VOCAB])])))
    start = time.monotonic()
    r = api.retrieve(request_id)
    # A finished future is answered at once, not after the long poll.
    assert time.monotonic() - start < LONG_POLL_SECONDS
    parsed = types.RequestFailedResponse.model_validate(r.json())
    assert parsed.category == "user"


def test_bad_retrieve_bodies_are_400(api: Api) -> None:
    assert_error(api.post("/api/v1/retrieve_future", {"allow_metadata_only": False}), 400, contains="request_id")
    assert_error(
        api.post("/api/v1/retrieve_future", content=b"\x00\x01", headers={"Content-Type": "application/json"}), 400
    )
    assert_error(api.post("/api/v1/retrieve_future", {"request_id": ["a"]}), 400)


def test_many_concurrent_polls_are_held_together(api: Api) -> None:
    """Polls wait on the shared poller, not in a thread each: 30 of them take one long poll."""
    from concurrent.futures import ThreadPoolExecutor

    model_id = api.model()
    ids = [api.accepted(api.post_proto(fb_body(model_id, seq))) for seq in range(1, 31)]
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=30) as pool:
        replies = list(pool.map(lambda rid: api.retrieve(rid).json(), ids))
    elapsed = time.monotonic() - start
    assert [r["type"] for r in replies] == ["try_again"] * 30
    assert [r["request_id"] for r in replies] == ids
    assert elapsed < LONG_POLL_SECONDS * 3 + 1.0, elapsed
