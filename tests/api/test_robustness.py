"""User input must never turn into a 500: the SDK retries 5xx for minutes (tinker-protocol.md §1.6),
so a user error answered 500 hangs the caller instead of telling them what to fix.

Several of these only fail on PostgreSQL (32-bit INTEGER columns, bounded VARCHARs, no NUL bytes in
text); SQLite stores 64-bit integers and unbounded text. Each case says where it is a known bug.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.api.helpers import BASE_MODEL, Api, adam, assert_error, fb_body

BUG_INT32 = (
    "BUG: integer columns are 32-bit on PostgreSQL (ops.sampler_seq, ops.seq, runs.model_seq_id), "
    "so a larger id is a DataError -> 500; the SDK itself sends sample seq_ids up to ~10**18"
)
BUG_INT64 = "BUG: integers beyond 64 bits reach the database unchecked (OverflowError/DataError -> 500)"
BUG_NUL = "BUG: PostgreSQL text cannot hold NUL; an id or name with \\x00 is a DataError -> 500, not 404/400"
BUG_VARCHAR = (
    "BUG: display_name/sdk_version/finish reason longer than their VARCHAR columns are a DataError -> 500 on PostgreSQL"
)
BUG_QUERY = "BUG: a bad ?limit/?offset is a pydantic ValidationError/OverflowError -> 500, not 400"


@dataclass
class Case:
    send: Callable[[Api], httpx.Response]
    bug: str | None = None
    fails_on: set[str] = field(default_factory=set)


def _sample(api: Api, seq: int) -> httpx.Response:
    body = {
        "sampling_session_id": api.sampler(),
        "seq_id": seq,
        "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
        "sampling_params": {"max_tokens": 4},
    }
    return api.post("/api/v1/asample", body)


def _optim(api: Api, seq: int) -> httpx.Response:
    return api.post("/api/v1/optim_step", {"model_id": api.model(), "seq_id": seq, "adam_params": adam()})


def _sampling_session(api: Api, seq: int) -> httpx.Response:
    body = {"session_id": api.session(), "sampling_session_seq_id": seq, "base_model": BASE_MODEL}
    return api.post("/api/v1/create_sampling_session", body)


BOTH = {"sqlite", "postgres"}
PG = {"postgres"}

CASES: dict[str, Case] = {
    # An unpickled SamplingClient numbers its samples from clone_id * 10**9 with a random clone_id
    # in [1, 10**9] (tinker-protocol.md §2.7, §4.4): the SDK itself sends these seq ids.
    "sample_seq_of_a_cloned_sampling_client": Case(lambda a: _sample(a, 736_912_345 * 10**9), BUG_INT32, PG),
    "sample_seq_of_clone_3": Case(lambda a: _sample(a, 3 * 10**9 + 7), BUG_INT32, PG),
    "model_seq_id_2_31": Case(lambda a: a.create_model(a.session(), 2**31), BUG_INT32, PG),
    "training_seq_id_2_31": Case(lambda a: _optim(a, 2**31), BUG_INT32, PG),
    "model_seq_id_2_64": Case(lambda a: a.create_model(a.session(), 2**64), BUG_INT64, BOTH),
    "training_seq_id_2_63": Case(lambda a: _optim(a, 2**63), BUG_INT64, BOTH),
    "sample_seq_id_2_63": Case(lambda a: _sample(a, 2**63), BUG_INT64, BOTH),
    "nul_in_run_id_path": Case(lambda a: a.get("/api/v1/training_runs/s-x%00y"), BUG_NUL, PG),
    "nul_in_session_id": Case(lambda a: a.post("/api/v1/session_heartbeat", {"session_id": "s-\x00"}), BUG_NUL, PG),
    "nul_in_request_id": Case(lambda a: a.retrieve("req-\x00"), BUG_NUL, PG),
    "nul_in_model_id_json": Case(lambda a: a.post("/api/v1/get_info", {"model_id": "s\x00:train:0"}), BUG_NUL, PG),
    "nul_in_model_id_proto": Case(lambda a: a.post_proto(fb_body("s\x00:train:0", 1)), BUG_NUL, PG),
    "nul_in_tinker_path": Case(
        lambda a: a.post("/api/v1/weights_info", {"tinker_path": "tinker://r\x00/weights/x"}), BUG_NUL, PG
    ),
    "nul_in_display_name": Case(lambda a: a.post("/api/v1/create_session", {"display_name": "a\x00b"}), BUG_NUL, PG),
    "display_name_300_chars": Case(
        lambda a: a.post("/api/v1/create_session", {"display_name": "x" * 300}), BUG_VARCHAR, PG
    ),
    "sdk_version_100_chars": Case(
        lambda a: a.post("/api/v1/create_session", {"sdk_version": "9" * 100}), BUG_VARCHAR, PG
    ),
    "finish_reason_40_chars": Case(
        lambda a: a.post(f"/api/v1/sessions/{a.session()}/finish", {"reason": {"type": "x" * 40}}), BUG_VARCHAR, PG
    ),
    "limit_not_a_number": Case(lambda a: a.get("/api/v1/training_runs?limit=abc"), BUG_QUERY, BOTH),
    "sessions_offset_not_a_number": Case(lambda a: a.get("/api/v1/sessions?offset=x"), BUG_QUERY, BOTH),
    "offset_beyond_int64": Case(lambda a: a.get("/api/v1/checkpoints?offset=99999999999999999999"), BUG_QUERY, BOTH),
    # These are fine today and must stay fine.
    "sampling_session_seq_id_2_31": Case(lambda a: _sampling_session(a, 2**31)),
    # The proto's seq_id is an int32, so this is the largest training seq the SDK can send.
    "fb_seq_id_max_int32": Case(lambda a: a.post_proto(fb_body(a.model(), 2**31 - 1))),
    "run_id_500_chars": Case(lambda a: a.get("/api/v1/training_runs/" + "x" * 500)),
    "nul_in_metadata_values": Case(lambda a: a.post("/api/v1/create_session", {"user_metadata": {"k": "v\x00"}})),
    "metadata_100kb": Case(lambda a: a.post("/api/v1/create_session", {"user_metadata": {"k": "v" * 100_000}})),
    "deeply_nested_json": Case(lambda a: a.post("/api/v1/create_session", {"user_metadata": _nested(200)})),
}


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"k": value}
    return value


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_input_is_never_a_500(api: Api, case: str) -> None:
    # Each case's `bug` names the failure it once had (on the backends in `fails_on`).
    r = CASES[case].send(api)
    assert r.status_code < 500, (r.status_code, r.text)
    if r.status_code >= 400:
        assert_error(r, r.status_code)


BUG_NEGATIVE_SEQ = (
    "BUG: create_model and create_sampling_session accept a negative model_seq_id / "
    "sampling_session_seq_id (ids like '<session>:train:-1'); load_weights already refuses them"
)


def test_negative_model_seq_id_is_400(api: Api) -> None:
    assert_error(api.create_model(api.session(), -1), 400, contains="model_seq_id")


def test_negative_sampling_session_seq_id_is_400(api: Api) -> None:
    assert_error(_sampling_session(api, -1), 400, contains="sampling_session_seq_id")
