"""try_again bodies with a queue state (issue 10 item 7): what the SDK parses, and nothing unknown."""

from __future__ import annotations

from tinker.types.try_again_response import TryAgainResponse

from app.wire.responses import try_again_body


def test_detail_keys_only_when_known() -> None:
    assert try_again_body("req-1") == {"type": "try_again", "request_id": "req-1", "queue_state": "active"}
    body = try_again_body("req-2", "paused_capacity", "no worker", position=3, estimate_seconds=7.5)
    assert body == {
        "type": "try_again",
        "request_id": "req-2",
        "queue_state": "paused_capacity",
        "queue_state_reason": "no worker",
        "queue_position": 3,
        "queue_estimate_seconds": 7.5,
    }
    # The SDK's own model takes it (its extra keys are ignored), with one of its three states.
    assert TryAgainResponse.model_validate(body).queue_state == "paused_capacity"
