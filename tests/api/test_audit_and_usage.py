"""The audit log and usage routes (docs/audit-and-usage.md): response shapes checked against the
SDK's own models, tenant scoping (B never sees A's sessions, runs, ops or checkpoints, and the
reverse), keyset pages that add up to the whole log, bounded limits, and clear 400s for bad
parameters. No worker runs here: ops are finished by writing their rows, as a worker's commit
would (the e2e test runs the real thing).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update
from tinker import types

from app.db.models import Op
from app.domain.oai import OaiChoice, OaiCompletionResult
from app.domain.results import SampledSequence, SampleResult, result_bytes
from app.domain.usage import sample_counts
from tests.api.helpers import KEY_A, KEY_B, TENANT_B, Api, assert_error, ce_datum, fb_body, record_checkpoint
from tests.api.isolation_world import (
    World,
    sample_body,
    w_fixture,  # noqa: F401  (the `w` fixture)
)

AUDIT = "/api/v1/audit"
USAGE = "/api/v1/billing/usage/events"
STORAGE = "/api/v1/billing/usage/checkpoints/current"
# A past hour no other test finishes ops in.
HOUR = datetime(2026, 3, 4, 5, tzinfo=UTC)


def _audit(api: Api, key: str = KEY_A, **params: Any) -> dict[str, Any]:
    r = api.get(AUDIT, key=key, params=params)
    assert r.status_code == 200, r.text
    types.AuditLogResponse.model_validate(r.json())
    body: dict[str, Any] = r.json()
    return body


def _usage(api: Api, start: datetime, end: datetime, key: str = KEY_A) -> dict[str, Any]:
    params = {"starting_on": start.isoformat().replace("+00:00", "Z"), "ending_before": end.isoformat()}
    r = api.get(USAGE, key=key, params=params)
    assert r.status_code == 200, r.text
    types.BillingUsageResponse.model_validate(r.json())
    body: dict[str, Any] = r.json()
    return body


def _finish(api: Api, request_id: str, at: datetime, **values: Any) -> None:
    """What a worker's commit writes, at a chosen time."""
    with api.db.write() as s:
        s.execute(
            update(Op)
            .where(Op.request_id == request_id)
            .values(status="succeeded", started_at=at.timestamp(), finished_at=at.timestamp(), **values)
        )


def test_audit_lists_the_callers_actions_in_order(api: Api) -> None:
    session = api.session()
    model = api.create_model(session).json()["model_id"]
    fb = api.accepted(api.post_proto(fb_body(model, 1, [ce_datum([1, 2, 3, 4, 5])])))
    path = record_checkpoint(api, model, "audited")
    entries = _audit(api)["entries"]
    mine = [e for e in entries if session in json.dumps(e)]
    events = [e["event"] for e in mine]
    assert events[:2] == ["session_create", "training_run_create"], events
    assert {"op_create_model", "op_forward_backward", "checkpoint_create"} <= set(events), events
    op = next(e for e in mine if e["event_details"].get("request_id") == fb and e["event"] == "op_forward_backward")
    details = op["event_details"]
    assert (details["tenant"], details["model_id"], details["seq_id"], details["status"]) == (
        "default",
        model,
        1,
        "queued",
    )
    assert details["input_tokens"] == 5  # counted when it was submitted
    ckpt = next(e for e in mine if e["event"] == "checkpoint_create")
    assert (ckpt["tinker_path"], ckpt["model_id"]) == (path, model)
    stamps = [e["timestamp"] for e in entries]
    assert stamps == sorted(stamps)

    only = _audit(api, event_type="checkpoints")["entries"]
    assert {e["event"] for e in only} <= {"checkpoint_create", "op_save_weights", "op_load_weights"}
    assert any(e["tinker_path"] == path for e in only)
    assert _audit(api, event_type="projects")["entries"] == []
    yesterday = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    assert session not in json.dumps(_audit(api, day=yesterday))


def test_audit_pages_add_up_to_the_whole_log(api: Api) -> None:
    for _ in range(3):
        api.model()
    whole = _audit(api)["entries"]
    paged: list[dict[str, Any]] = []
    cursor = None
    while len(paged) < len(whole):
        page = _audit(api, limit=7, **({"cursor": cursor} if cursor else {}))
        assert len(page["entries"]) <= 7
        paged.extend(page["entries"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    # Later tests of the same app add entries after `whole` was read; the pages start the same.
    assert paged[: len(whole)] == whole


@pytest.mark.parametrize(
    ("params", "contains"),
    [
        ({"event_type": "everything"}, "event_type"),
        ({"day": "2026-13-01"}, "day"),
        ({"day": "yesterday"}, "day"),
        ({"day": "2026-01-01T00:00:00"}, "day"),
        ({"limit": "0"}, "limit"),
        ({"limit": "-5"}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"limit": "1e400"}, "limit"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"cursor": "W10"}, "cursor"),  # base64 of "[]"
        ({"cursor": "x" * 5000}, "cursor"),
    ],
)
def test_audit_bad_parameters_are_400(api: Api, params: dict[str, str], contains: str) -> None:
    assert_error(api.get(AUDIT, params=params), 400, contains=contains)


def test_audit_huge_limit_is_served_at_the_bound(api: Api) -> None:
    body = _audit(api, limit=10**12)
    assert len(body["entries"]) <= 1000


def test_routes_need_a_key(api: Api) -> None:
    for path in (AUDIT, STORAGE):
        assert_error(api.get(path, key=None), 401)
    assert_error(api.get(USAGE, key="tml-wrong", params={"starting_on": "x", "ending_before": "y"}), 401)


def test_usage_counts_tokens_per_bucket_session_and_kind(api: Api) -> None:
    session = api.session()
    model = api.create_model(session).json()["model_id"]
    fb1 = api.accepted(api.post_proto(fb_body(model, 1, [ce_datum([1, 2, 3]), ce_datum([4, 5, 6, 7])])))
    fb2 = api.accepted(api.post_proto(fb_body(model, 2, [ce_datum([8, 9])])))
    created = api.post(
        "/api/v1/create_sampling_session",
        {"session_id": session, "sampling_session_seq_id": 0, "base_model": "tuft/tiny-qwen3"},
    )
    sampler = created.json()["sampling_session_id"]
    sample = api.accepted(api.post("/api/v1/asample", sample_body(sampler)))
    _finish(api, fb1, HOUR + timedelta(minutes=1))
    _finish(api, fb2, HOUR + timedelta(minutes=59))
    _finish(api, sample, HOUR + timedelta(minutes=30), output_tokens=11)
    with api.db.read() as s:
        assert s.execute(select(Op.input_tokens).where(Op.request_id == sample)).scalar_one() == 3  # the prompt

    body = _usage(api, HOUR, HOUR + timedelta(hours=1))
    mine = [e for e in body["data"] if e["session_id"] == session]
    got = {e["event_info"]["type"]: e["event_info"] for e in mine}
    assert got["training"]["token_count"] == 3 + 4 + 2
    assert got["sampling_prefill"] == {"type": "sampling_prefill", "cached": False, "token_count": 3}
    assert got["sampling_sample"]["token_count"] == 11
    assert len(mine) == 3
    for e in mine:
        assert (e["bucket_start"], e["bucket_end"]) == (HOUR.isoformat(), (HOUR + timedelta(hours=1)).isoformat())
        assert (e["base_model"], e["user_id"], e["project_id"]) == ("tuft/tiny-qwen3", "default", "default")
    assert session in body["sessions"]
    # Outside the window: nothing of this session.
    later = _usage(api, HOUR + timedelta(hours=1), HOUR + timedelta(hours=2))
    assert all(e["session_id"] != session for e in later["data"])


def test_usage_and_audit_are_tenant_scoped(api: Api, w: World) -> None:
    fb_b = api.accepted(api.post_proto(fb_body(w.model_b, 1), key=KEY_B))
    _finish(api, w.future_a, HOUR + timedelta(minutes=5))
    _finish(api, fb_b, HOUR + timedelta(minutes=5))
    a_ids = (w.session_a, w.model_a, w.sampler_a, w.future_a, w.ckpt_a)
    b_ids = (w.session_b, w.model_b, fb_b, w.ckpt_b)

    seen_by_b = json.dumps(_audit(api, key=KEY_B)) + json.dumps(_usage(api, HOUR, HOUR + timedelta(hours=1), KEY_B))
    seen_by_a = json.dumps(_audit(api)) + json.dumps(_usage(api, HOUR, HOUR + timedelta(hours=1)))
    assert not [i for i in a_ids if i in seen_by_b]
    assert not [i for i in b_ids if i in seen_by_a]
    assert all(i in seen_by_b for i in b_ids[:3]) and all(i in seen_by_a for i in a_ids[:2])
    assert '"tenant": "default"' not in seen_by_b and f'"tenant": "{TENANT_B}"' not in seen_by_a

    # Checkpoint storage: each tenant its own count and bytes.
    for key in (KEY_A, KEY_B):
        r = api.get(STORAGE, key=key)
        assert r.status_code == 200, r.text
        storage = types.CurrentCheckpointStorageUsageResponse.model_validate(r.json())
        (item,) = storage.data
        assert item.org_user_urn == ("default" if key == KEY_A else TENANT_B)
    b_before = api.get(STORAGE, key=KEY_B).json()["data"][0]["checkpoint_count"]
    record_checkpoint(api, w.model_a, "a-more")
    assert api.get(STORAGE, key=KEY_B).json()["data"][0]["checkpoint_count"] == b_before
    assert api.get(STORAGE, params={"project_id": "default"}).status_code == 200
    assert_error(api.get(STORAGE, params={"project_id": "elsewhere"}), 400, contains="project")


def _iso(when: datetime) -> str:
    return when.isoformat()


@pytest.mark.parametrize(
    ("start", "end", "contains"),
    [
        (_iso(HOUR + timedelta(minutes=1)), _iso(HOUR + timedelta(hours=1)), "hour boundary"),
        (_iso(HOUR), _iso(HOUR + timedelta(hours=1, seconds=1)), "hour boundary"),
        (_iso(HOUR), _iso(HOUR), "after starting_on"),
        (_iso(HOUR), _iso(HOUR - timedelta(hours=1)), "after starting_on"),
        (_iso(HOUR), _iso(HOUR + timedelta(days=14, hours=1)), "14 days"),
        (_iso(datetime(2100, 1, 1, tzinfo=UTC)), _iso(datetime(2100, 1, 2, tzinfo=UTC)), "future"),
        ("last tuesday", _iso(HOUR), "RFC 3339"),
        (_iso(HOUR), "", "RFC 3339"),
    ],
)
def test_usage_bad_windows_are_400(api: Api, start: str, end: str, contains: str) -> None:
    r = api.get(USAGE, params={"starting_on": start, "ending_before": end})
    assert_error(r, 400, contains=contains)


def test_usage_missing_parameters_and_limits(api: Api) -> None:
    assert_error(api.get(USAGE), 400, contains="starting_on")
    assert_error(api.get(USAGE, params={"starting_on": _iso(HOUR)}), 400, contains="ending_before")
    window = {"starting_on": _iso(HOUR), "ending_before": _iso(HOUR + timedelta(days=14))}
    assert_error(api.get(USAGE, params={**window, "limit": "0"}), 400, contains="limit")
    assert api.get(USAGE, params={**window, "limit": str(10**15)}).status_code == 200
    body = api.get(USAGE, params={**window, "limit": "1"}).json()
    assert len(body["data"]) <= 1


def test_sample_counts_read_what_a_worker_commits() -> None:
    """The counts the worker's commit stores (app/domain/usage.py), from real result bytes."""
    sample = SampleResult(
        sequences=(
            SampledSequence(tokens=(1, 2, 3), logprobs=(-0.1, -0.2, -0.3), stop_reason="length"),
            SampledSequence(tokens=(4,), logprobs=None, stop_reason="stop"),
        )
    )
    assert sample_counts(result_bytes(sample)) == {"output_tokens": 4}
    completion = OaiCompletionResult(
        choices=(OaiChoice(text="hi", finish_reason="stop"),), prompt_tokens=7, completion_tokens=2
    )
    assert sample_counts(result_bytes(completion)) == {"input_tokens": 7, "output_tokens": 2}
    for broken in (None, b"", b"not json", b"[1, 2]", b'{"kind": "optim_step"}'):
        assert sample_counts(broken) == {}
