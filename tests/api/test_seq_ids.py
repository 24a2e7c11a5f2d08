"""Training seq_id idempotency: a replay is the same future, another body at a used seq is a 409."""

from __future__ import annotations

import zstandard

from tests.api.helpers import VOCAB, Api, adam, assert_error, ce_datum, fb_body


def test_same_body_same_seq_is_the_same_request(api: Api) -> None:
    model_id = api.model()
    body = fb_body(model_id, 1, [ce_datum([1, 2, 3])])
    first = api.accepted(api.post_proto(body))
    assert api.accepted(api.post_proto(body)) == first
    # The same op compressed is still the same op (the dedupe hash is over the decoded request).
    assert api.accepted(api.post_proto(zstandard.ZstdCompressor().compress(body), encoding="zstd")) == first


def test_another_body_at_a_used_seq_is_409(api: Api) -> None:
    model_id = api.model()
    first = api.accepted(api.post_proto(fb_body(model_id, 1, [ce_datum([1, 2, 3])])))
    err = assert_error(api.post_proto(fb_body(model_id, 1, [ce_datum([1, 2, 4])])), 409, error="conflict")
    assert "seq_id 1" in err["message"]
    # Another kind of op at the same seq is also a conflict.
    optim = {"model_id": model_id, "seq_id": 1, "adam_params": adam(), "type": "optim_step"}
    assert_error(api.post("/api/v1/optim_step", optim), 409, error="conflict")
    # The original request is unchanged.
    api.queued(first)
    assert api.accepted(api.post_proto(fb_body(model_id, 1, [ce_datum([1, 2, 3])]))) == first


def test_json_op_replay_is_the_same_request(api: Api) -> None:
    model_id = api.model()
    optim = {"model_id": model_id, "seq_id": 1, "adam_params": adam(), "type": "optim_step"}
    first = api.accepted(api.post("/api/v1/optim_step", optim))
    assert api.accepted(api.post("/api/v1/optim_step", optim)) == first
    assert_error(api.post("/api/v1/optim_step", {**optim, "adam_params": adam(learning_rate=0.5)}), 409)


def test_rejected_request_replay_is_the_same_failed_future(api: Api) -> None:
    model_id = api.model()
    bad = fb_body(model_id, 1, [ce_datum([VOCAB])])
    first = api.accepted(api.post_proto(bad))
    assert api.accepted(api.post_proto(bad)) == first
    api.failed_future(first)
    # Fixing the content afterwards does not rewrite history: seq 1 is taken.
    assert_error(api.post_proto(fb_body(model_id, 1)), 409, error="conflict")
