"""Runs last within each backend's app: after every malformed, oversized, foreign and hostile
request above, the same server still answers normally."""

from __future__ import annotations

from tests.api.helpers import KEY_B, Api, ce_datum, fb_body


def test_server_still_serves_after_everything(api: Api) -> None:
    r = api.get("/api/v1/healthz", key=None)
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    for key in (None, KEY_B):
        session_id = api.session() if key is None else api.session(key=key)
        assert session_id
    model_id = api.model()
    request_id = api.accepted(api.post_proto(fb_body(model_id, 1, [ce_datum([1, 2, 3])])))
    api.queued(request_id)
    api.pending_future(request_id)
    assert api.get("/api/v1/get_server_capabilities").status_code == 200
