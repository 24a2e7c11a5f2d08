"""One tenant flooding `asample` cannot starve another (issue 7 item 7): a tenant under its fair
share of a full queue is admitted, and workers take samples round-robin between tenants, not in
global arrival order. No worker runs here: the test claims samples itself, as a worker's
`_sample_once` does, and completes them the way a worker's commit changes the row."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from app.db.models import Op
from app.queue import claim
from tests.api.helpers import KEY_A, KEY_B, Api, make_settings, running_app

LIMIT = 48


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def app_with_limit(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Api]:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    with running_app(make_settings(tmp_path / "data", url, max_queued_samples=LIMIT)) as api:
        yield api


def _sample(sampler_id: str, seq: int) -> dict[str, Any]:
    return {
        "sampling_session_id": sampler_id,
        "seq_id": seq,
        "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
        "sampling_params": {"max_tokens": 8, "temperature": 1.0, "top_k": -1, "top_p": 1.0},
        "type": "sample",
    }


class Flooder:
    """Tenant A as the SDK behaves under load: every refused request is sent again (same seq)."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.sampler = api.sampler(KEY_A)
        self.seq = 0
        self.accepted: set[str] = set()

    def flood(self) -> None:
        """Submit until refused: the refused request is the next one retried."""
        while True:
            r = self.api.post("/api/v1/asample", _sample(self.sampler, self.seq), key=KEY_A)
            if r.status_code == 429:
                return
            assert r.status_code == 200, r.text
            self.accepted.add(r.json()["request_id"])
            self.seq += 1


def _serve_one(api: Api) -> str:
    """One worker step: claim the next sample and complete it."""
    with api.db.write() as s:
        claimed = claim.claim_sample(s, "fairness-worker", claim_ttl=300)
    assert claimed is not None
    with api.db.write() as s:
        s.execute(update(Op).where(Op.request_id == claimed.request_id).values(status="succeeded"))
    return claimed.request_id


def test_a_flooding_tenant_cannot_starve_another(app_with_limit: Api) -> None:
    api = app_with_limit
    a = Flooder(api)
    a.flood()
    assert len(a.accepted) == LIMIT  # A alone fills the whole queue

    # B sends 20 samples at once while A keeps the queue full: none is refused (B holds less than
    # its fair share, LIMIT / 2), and A gets nothing more while it is over its own share.
    sampler_b = api.sampler(KEY_B)
    b_ids: list[str] = []
    for seq in range(20):
        r: httpx.Response = api.post("/api/v1/asample", _sample(sampler_b, seq), key=KEY_B)
        assert r.status_code == 200, r.text
        b_ids.append(r.json()["request_id"])
        a.flood()
    assert len(a.accepted) == LIMIT

    # Workers serve while A goes on flooding after every sample served.
    order: list[str] = []
    while not set(b_ids) <= set(order):
        order.append(_serve_one(api))
        a.flood()
        assert len(order) < 200
    # Turn about: B's 20 samples go within the first 40 served, although all 48 of A's were
    # queued before them (global arrival order would serve A's whole backlog first).
    served_b = [i for i, request_id in enumerate(order) if request_id in b_ids]
    assert served_b[-1] < 41, served_b
    assert sum(1 for request_id in order if request_id in a.accepted) <= 21


def test_a_light_tenant_waits_about_one_sample(app_with_limit: Api) -> None:
    """B sends one sample at a time (each after the last was served): never refused, and each is
    served next or after at most one of A's, with A's queue always full."""
    api = app_with_limit
    a = Flooder(api)
    a.flood()
    sampler_b = api.sampler(KEY_B)
    for seq in range(20):
        r = api.post("/api/v1/asample", _sample(sampler_b, seq), key=KEY_B)
        assert r.status_code == 200, (seq, r.text)
        mine = r.json()["request_id"]
        waited = 0
        while _serve_one(api) != mine:
            waited += 1
            a.flood()
            assert waited <= 1, f"sample {seq} of B waited behind {waited} of A's"
        a.flood()
