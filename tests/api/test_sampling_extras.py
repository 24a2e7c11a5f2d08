"""asample with the 0.38 extras (what is recorded, what is refused) and its 429 backpressure
(docs/sampling.md, tinker-protocol.md §1.6, §6.4)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update

from app.db.models import Op
from app.domain.ops import SampleOp, parse_op
from tests.api.helpers import KEY_A, KEY_B, VOCAB, Api, assert_error, make_settings, running_app

PROMPT = [1, 2, 3, 4]


def _sample(sampler_id: str, seq: int = 0, **fields: Any) -> dict[str, Any]:
    return {
        "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": PROMPT}]},
        "sampling_params": {"max_tokens": 4, "temperature": 1.0, "top_k": -1, "top_p": 1.0},
        "sampling_session_id": sampler_id,
        "seq_id": seq,
        "record_stability_info": False,
        "type": "sample",
        **fields,
    }


def _stored_op(api: Api, request_id: str) -> SampleOp:
    with api.db.read() as s:
        payload = s.execute(select(Op.payload).where(Op.request_id == request_id)).scalar_one()
    op = parse_op(payload)
    assert isinstance(op, SampleOp)
    return op


def _ops_of(api: Api, sampler_id: str) -> int:
    with api.db.read() as s:
        return int(s.execute(select(func.count()).select_from(Op).where(Op.sampler_id == sampler_id)).scalar_one())


def test_extras_are_recorded_on_the_op(api: Api) -> None:
    target = {"data": [7, 42], "dtype": "int64", "shape": [3, 2]}
    target |= {"sparse_crow_indices": [0, 1, 1, 2], "sparse_col_indices": [0, 1]}
    body = _sample(
        api.sampler(),
        prompt_logprobs=True,
        topk_prompt_logprobs=3,
        topk_sample_logprobs=20,
        prompt_logprobs_last_n=2,
        prompt_alt_tokens_k=5,
        target_prompt_logprobs=target,
    )
    op = _stored_op(api, api.accepted(api.post("/api/v1/asample", body)))
    assert (op.prompt_logprobs, op.topk_prompt_logprobs, op.topk_sample_logprobs) == (True, 3, 20)
    assert (op.prompt_logprobs_last_n, op.prompt_alt_tokens_k) == (2, 5)
    grid = op.target_prompt_logprobs
    assert grid is not None and grid.shape == (3, 2) and grid.values.tolist() == [7, 42]
    assert grid.crow_indices == (0, 1, 1, 2) and grid.col_indices == (0, 1)


def test_a_0_25_body_records_no_extras(api: Api) -> None:
    body = _sample(api.sampler(), prompt_logprobs=True, topk_prompt_logprobs=2)
    del body["record_stability_info"]  # 0.25 sends none of the 0.38 fields
    op = _stored_op(api, api.accepted(api.post("/api/v1/asample", body)))
    assert op.prompt_logprobs and op.topk_prompt_logprobs == 2
    assert (op.topk_sample_logprobs, op.prompt_logprobs_last_n, op.prompt_alt_tokens_k) == (0, None, 0)
    assert op.target_prompt_logprobs is None


def _target(data: list[int], shape: list[int]) -> dict[str, Any]:
    return {"target_prompt_logprobs": {"data": data, "dtype": "int64", "shape": shape}}


BAD: dict[str, tuple[dict[str, Any], str]] = {
    "topk_sample_too_wide": ({"topk_sample_logprobs": 21}, "topk_sample_logprobs must be between 0 and 20"),
    "topk_sample_negative": ({"topk_sample_logprobs": -3}, "topk_sample_logprobs must be between 0 and 20"),
    "topk_prompt_too_wide": ({"topk_prompt_logprobs": 101}, "topk_prompt_logprobs must be between 0 and 100"),
    "alt_tokens_too_many": ({"prompt_alt_tokens_k": 101}, "prompt_alt_tokens_k must be between 0 and 100"),
    "alt_tokens_negative": ({"prompt_alt_tokens_k": -1}, "prompt_alt_tokens_k"),
    "last_n_without_prompt_logprobs": ({"prompt_logprobs_last_n": 2}, "requires prompt_logprobs"),
    "last_n_zero": ({"prompt_logprobs": True, "prompt_logprobs_last_n": 0}, "between 1 and len(prompt) - 1 = 3"),
    "last_n_negative": ({"prompt_logprobs": True, "prompt_logprobs_last_n": -2}, "between 1 and len(prompt) - 1"),
    "last_n_too_long": ({"prompt_logprobs": True, "prompt_logprobs_last_n": 4}, "got 4"),
    "target_wrong_rows": (_target([1, 2, 3, 4], [4, 1]), "len(prompt) - 1 = 3 rows"),
    "target_id_at_vocab": (_target([1, VOCAB, -1], [3, 1]), f"token id {VOCAB} is outside the vocabulary"),
    "target_all_pad": (_target([-1, -1, -1], [3, 1]), "names no token id"),
    "target_not_a_tensor": ({"target_prompt_logprobs": {"dtype": "int64"}}, "not a TensorData"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_extras_are_400_and_record_nothing(api: Api, case: str) -> None:
    fields, phrase = BAD[case]
    sampler_id = api.sampler()
    err = assert_error(api.post("/api/v1/asample", _sample(sampler_id, **fields)), 400, error="invalid_input")
    assert err["category"] == "user"
    assert phrase in err["message"], err
    assert _ops_of(api, sampler_id) == 0
    api.accepted(api.post("/api/v1/asample", _sample(sampler_id)))


# backpressure: apps of their own, with tiny limits


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def limited(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """A factory of apps with the given settings, on a fresh database of the fixture's backend."""
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")

    def start(**settings: Any) -> Any:
        return running_app(make_settings(tmp_path / "data", url, **settings))

    yield start


def _assert_429(r: httpx.Response, phrase: str) -> None:
    body = assert_error(r, 429, error="too_many_requests")
    assert body["category"] == "server"
    assert phrase in body["message"], body
    assert r.headers["retry-after"] == "1"


def _finish(api: Api, request_id: str, status: str = "succeeded") -> None:
    """What a worker's commit does to the row, as far as the queue count is concerned."""
    with api.db.write() as s:
        s.execute(update(Op).where(Op.request_id == request_id).values(status=status))


def test_full_queue_is_429_and_writes_nothing(limited: Any) -> None:
    with limited(max_queued_samples=2) as api:
        sampler_id = api.sampler()
        first = api.accepted(api.post("/api/v1/asample", _sample(sampler_id, 0)))
        second = api.accepted(api.post("/api/v1/asample", _sample(sampler_id, 1)))
        _finish(api, second, "running")  # running samples count too

        refused = api.post("/api/v1/asample", _sample(sampler_id, 2))
        _assert_429(refused, "sampling queue is full (2 samples queued or running)")
        assert _ops_of(api, sampler_id) == 2
        # Another sampler of the same tenant: the limit is deployment-wide. (Another tenant would
        # get in, under its fair share: test_sample_fairness.py.)
        _assert_429(api.post("/api/v1/asample", _sample(api.sampler(), 0)), "queue is full")

        # A retry of a recorded sample (its reply was lost) is answered, not refused.
        again = api.post("/api/v1/asample", _sample(sampler_id, 0))
        assert api.accepted(again) == first
        assert again.json()["sample_sequence_ids"] == [f"{first}:0"]

        # Once one finishes, the refused request goes through unchanged, with the seq it had.
        _finish(api, first)
        third = api.accepted(api.post("/api/v1/asample", _sample(sampler_id, 2)))
        assert third not in (first, second)
        _assert_429(api.post("/api/v1/asample", _sample(sampler_id, 3)), "queue is full")
        _finish(api, second, "failed")
        api.accepted(api.post("/api/v1/asample", _sample(sampler_id, 3)))
        assert _ops_of(api, sampler_id) == 4


def test_per_tenant_limit(limited: Any) -> None:
    with limited(max_queued_samples=0, max_queued_samples_per_tenant=1) as api:
        mine, theirs = api.sampler(KEY_A), api.sampler(KEY_B)
        api.accepted(api.post("/api/v1/asample", _sample(mine, 0)))
        _assert_429(api.post("/api/v1/asample", _sample(mine, 1)), "this tenant already has 1 samples")
        # Another tenant is not held back by this one's queue.
        api.accepted(api.post("/api/v1/asample", _sample(theirs, 0), key=KEY_B))
        assert _ops_of(api, mine) == 1


def test_zero_switches_backpressure_off(limited: Any) -> None:
    with limited(max_queued_samples=0) as api:
        sampler_id = api.sampler()
        for seq in range(5):
            api.accepted(api.post("/api/v1/asample", _sample(sampler_id, seq)))
        assert _ops_of(api, sampler_id) == 5
