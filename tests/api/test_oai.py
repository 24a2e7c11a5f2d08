"""The OpenAI-compatible endpoint in-process: auth, validation, tenant checks, the op it queues and
the OpenAI JSON it returns. No worker runs here: a test answers the op the way a worker commits
one (tests/e2e/test_oai.py runs the real worker)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from app.api.routes import oai as oai_routes
from app.db.engine import db_now
from app.db.models import Checkpoint, Op
from app.domain.oai import OaiChoice, OaiCompletionOp, OaiCompletionResult
from app.domain.ops import parse_op
from app.domain.results import result_bytes
from tests.api.helpers import BASE_MODEL, KEY_A, KEY_B, TENANT_B, Api, make_settings, record_checkpoint, running_app

OAI = "/oai/api/v1"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def oai_error(r: httpx.Response, status: int, code: str | None = None, contains: str | None = None) -> str:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}; returns the message."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"], body
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error"), body
    if code is not None:
        assert error["code"] == code, body
    if contains is not None:
        assert contains.lower() in error["message"].lower(), body
    return str(error["message"])


@pytest.fixture
def sampler_path(api: Api) -> str:
    return record_checkpoint(api, api.model(), f"oai-{uuid.uuid4().hex[:8]}", kind="sampler")


def queued_op(api: Api, marker: str, timeout: float = 30.0) -> tuple[str, OaiCompletionOp]:
    """The queued completion whose prompt contains `marker`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with api.db.read() as s:
            rows = s.execute(
                select(Op.request_id, Op.payload).where(
                    Op.kind == "sample", Op.status == "queued", Op.sampler_id.is_(None)
                )
            ).all()
        for request_id, payload in rows:
            if marker.encode() in payload:
                op = parse_op(payload)
                assert isinstance(op, OaiCompletionOp)
                return request_id, op
        time.sleep(0.02)
    raise AssertionError(f"no queued op for {marker}")


def commit(
    api: Api, request_id: str, result: OaiCompletionResult | None = None, error: str = "", category: str = ""
) -> None:
    """What commit_sample writes when a worker finishes the op."""
    with api.db.write() as s:
        s.execute(
            update(Op)
            .where(Op.request_id == request_id)
            .values(
                status="failed" if error else "succeeded",
                result=result_bytes(result) if result is not None else None,
                error_message=error or None,
                error_category=category or None,
                finished_at=db_now(s),
            )
        )


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(1) as executor:
        yield executor


def answered(
    api: Api, pool: ThreadPoolExecutor, path: str, body: dict[str, Any], marker: str, **outcome: Any
) -> tuple[httpx.Response, str, OaiCompletionOp]:
    """Send the request, answer its op as a worker would, return the reply."""
    reply = pool.submit(api.post, f"{OAI}{path}", body, key=None, headers=bearer(KEY_A))
    request_id, op = queued_op(api, marker)
    commit(api, request_id, **outcome)
    return reply.result(timeout=60), request_id, op


RESULT = OaiCompletionResult(
    choices=(
        OaiChoice(text=" world", finish_reason="stop", tokens=(" world",), token_logprobs=(-0.25,)),
        OaiChoice(
            text=" there, friend",
            finish_reason="length",
            tokens=(" there", ",", " friend"),
            token_logprobs=(-1.0, -0.5, -2.0),
        ),
    ),
    prompt_tokens=3,
    completion_tokens=6,
)


def test_completion_is_queued_as_a_sample_op_and_answered_in_openai_shape(
    api: Api, pool: ThreadPoolExecutor, sampler_path: str
) -> None:
    marker = uuid.uuid4().hex
    body = {
        "model": sampler_path,
        "prompt": f"Hello {marker}",
        "max_tokens": 7,
        "temperature": 0,
        "n": 2,
        "stop": "\n",
        "seed": 3,
        "logprobs": 0,
        "user": "ignored",
    }
    r, request_id, op = answered(api, pool, "/completions", body, marker, result=RESULT)
    assert op == OaiCompletionOp(
        base_model=BASE_MODEL,
        model_path=sampler_path,
        prompt=f"Hello {marker}",
        max_tokens=7,
        temperature=0.0,
        n=2,
        stop=("\n",),
        seed=3,
        logprobs=True,
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"] == "cmpl-" + request_id.removeprefix("req-")
    assert out["object"] == "text_completion" and out["model"] == sampler_path
    assert isinstance(out["created"], int) and abs(out["created"] - time.time()) < 600
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
    assert [(c["index"], c["text"], c["finish_reason"]) for c in out["choices"]] == [
        (0, " world", "stop"),
        (1, " there, friend", "length"),
    ]
    assert out["choices"][1]["logprobs"] == {
        "tokens": [" there", ",", " friend"],
        "token_logprobs": [-1.0, -0.5, -2.0],
        "top_logprobs": None,
        "text_offset": [0, 6, 7],
    }
    with api.db.read() as s:
        row = s.get(Op, request_id)
        assert row is not None and row.tenant == "default" and row.delivered_at is not None
    # The op id is visible in the answer; polling it as a Tinker future gives the raw result, and
    # another tenant cannot see it.
    polled = api.post("/api/v1/retrieve_future", {"request_id": request_id, "allow_metadata_only": False})
    assert polled.status_code == 200, polled.text
    assert OaiCompletionResult.model_validate(polled.json()) == RESULT
    foreign = api.post("/api/v1/retrieve_future", {"request_id": request_id}, key=KEY_B)
    assert foreign.status_code == 404, foreign.text


def test_chat_completion_on_the_base_model(api: Api, pool: ThreadPoolExecutor) -> None:
    marker = uuid.uuid4().hex
    body = {
        "model": BASE_MODEL,
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": marker}]},
        ],
        "max_completion_tokens": 5,
        "logprobs": True,
    }
    r, request_id, op = answered(api, pool, "/chat/completions", body, marker, result=RESULT)
    assert op.model_path is None and op.base_model == BASE_MODEL and op.max_tokens == 5 and op.logprobs
    assert op.messages is not None
    assert [(m.role, m.content) for m in op.messages] == [("system", "Be brief."), ("user", f"Hi {marker}")]
    assert op.temperature == 1.0 and op.top_p == 1.0 and op.n == 1 and op.stop == ()
    out = r.json()
    assert r.status_code == 200 and out["object"] == "chat.completion", out
    assert out["id"] == "chatcmpl-" + request_id.removeprefix("req-")
    first = out["choices"][0]
    assert first["message"] == {"role": "assistant", "content": " world"} and first["finish_reason"] == "stop"
    assert first["logprobs"] == {
        "content": [{"token": " world", "logprob": -0.25, "bytes": list(b" world"), "top_logprobs": []}]
    }
    assert out["usage"]["total_tokens"] == 9


def test_failed_ops_map_to_400_and_500(api: Api, pool: ThreadPoolExecutor) -> None:
    marker = uuid.uuid4().hex
    body = {"model": BASE_MODEL, "prompt": marker}
    message = "prompt (2000 tokens) + max_tokens (16) exceeds the model's max length 2048"
    r, _, _ = answered(api, pool, "/completions", body, marker, error=message, category="user")
    assert oai_error(r, 400, "invalid_value") == message
    marker = uuid.uuid4().hex
    r, _, _ = answered(
        api, pool, "/completions", {**body, "prompt": marker}, marker, error="RuntimeError: boom", category="server"
    )
    assert oai_error(r, 500, "internal_error") == "RuntimeError: boom"


def test_no_result_in_time_is_a_504(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oai_routes, "WAIT_SECONDS", 0.2)
    r = api.post(f"{OAI}/completions", {"model": BASE_MODEL, "prompt": "nobody answers"})
    oai_error(r, 504, "timeout", contains="no result")


def test_auth(api: Api) -> None:
    oai_error(api.get(f"{OAI}/models", key=None), 401, "invalid_api_key", contains="Authorization: Bearer")
    oai_error(api.get(f"{OAI}/models", key=None, headers=bearer("tml-nope")), 401, "invalid_api_key")
    oai_error(api.get(f"{OAI}/models", key="tml-nope"), 401, "invalid_api_key")
    oai_error(api.get(f"{OAI}/models", key=None, headers={"Authorization": f"Basic {KEY_A}"}), 401)
    body = {"model": BASE_MODEL, "prompt": "x"}
    oai_error(api.post(f"{OAI}/completions", body, key=None), 401, "invalid_api_key")
    oai_error(api.post(f"{OAI}/chat/completions", body, key=None), 401, "invalid_api_key")
    assert api.get(f"{OAI}/models", key=None, headers=bearer(KEY_A)).status_code == 200
    assert api.get(f"{OAI}/models", key=KEY_B).status_code == 200


def _ids(r: httpx.Response) -> dict[str, dict[str, Any]]:
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list"
    return {m["id"]: m for m in body["data"]}


def test_models_lists_base_models_and_visible_sampler_checkpoints(api: Api, sampler_path: str) -> None:
    run_id = sampler_path.removeprefix("tinker://").split("/")[0]
    training = record_checkpoint(api, run_id, "oai-training")
    mine = _ids(api.get(f"{OAI}/models", key=None, headers=bearer(KEY_A)))
    assert mine[BASE_MODEL] == {
        "id": BASE_MODEL,
        "object": "model",
        "created": mine[BASE_MODEL]["created"],
        "owned_by": "tuft",
        "root": BASE_MODEL,
        "parent": None,
    }
    entry = mine[sampler_path]
    assert entry["object"] == "model" and entry["owned_by"] == "default" and entry["parent"] == BASE_MODEL
    assert isinstance(entry["created"], int) and entry["created"] > 0
    assert training not in mine  # only sampler weights can be served
    theirs = _ids(api.get(f"{OAI}/models", key=KEY_B))
    assert sampler_path not in theirs and BASE_MODEL in theirs
    assert api.get(f"{OAI}/models/{sampler_path}").json() == entry
    oai_error(api.get(f"{OAI}/models/{sampler_path}", key=KEY_B), 404, "model_not_found")
    assert api.get(f"{OAI}/models/{BASE_MODEL}", key=KEY_B).json()["id"] == BASE_MODEL

    # Published: visible to everyone, without naming its owner.
    with api.db.write() as s:
        s.execute(
            update(Checkpoint).where(Checkpoint.run_id == run_id, Checkpoint.kind == "sampler").values(public=True)
        )
    theirs = _ids(api.get(f"{OAI}/models", key=KEY_B))
    assert theirs[sampler_path]["owned_by"] == "published"
    assert TENANT_B not in str(theirs[sampler_path]) and "default" not in str(theirs[sampler_path])


@pytest.mark.parametrize("path", ["/completions", "/chat/completions"])
def test_other_tenants_and_unknown_models_are_404(api: Api, path: str, sampler_path: str) -> None:
    extra = {"prompt": "x"} if path == "/completions" else {"messages": [{"role": "user", "content": "x"}]}
    missing = sampler_path.rsplit("/", 1)[0] + "/no-such-name"
    for model, key in ((sampler_path, KEY_B), (missing, KEY_A), ("no/such-model", KEY_A)):
        r = api.post(f"{OAI}{path}", {"model": model, **extra}, key=None, headers=bearer(key))
        message = oai_error(r, 404, "model_not_found")
        assert "tenant" not in message.lower()
    # A foreign checkpoint and a missing one are told apart by nothing but the name.
    foreign = oai_error(api.post(f"{OAI}{path}", {"model": sampler_path, **extra}, key=KEY_B), 404)
    assert foreign == f"checkpoint {sampler_path} not found"


BAD_COMPLETIONS = [
    ({"stream": True}, "stream"),
    ({"n": 65}, "n must be between 1 and 64"),
    ({"n": 0}, "n must be"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens must be at least 1"),
    ({"max_tokens": 4096}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": None}, "prompt is required"),
    ({"prompt": ["one", "two"]}, "several prompts"),
    ({"prompt": [1, 2, 999_999_999]}, "outside the vocabulary"),
    ({"prompt": [1] * 2040}, "maximum length"),
    ({"logprobs": 5}, "logprobs=5"),
    ({"echo": True}, "echo"),
    ({"best_of": 3}, "best_of"),
    ({"suffix": "tail"}, "suffix"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"temperature": "hot"}, "temperature"),
    ({"model": "tinker://run-x/weights/ckpt"}, "training checkpoint"),
    ({"model": "tinker://nonsense"}, "tinker://"),
]


@pytest.mark.parametrize(("fields", "contains"), BAD_COMPLETIONS)
def test_completion_validation(api: Api, fields: dict[str, Any], contains: str) -> None:
    r = api.post(f"{OAI}/completions", {"model": BASE_MODEL, "prompt": "Hello", **fields})
    oai_error(r, 400, contains=contains)


BAD_CHATS = [
    ({"messages": []}, "at least one message"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "role 'tool'"),
    ({"messages": [{"role": "user", "content": None}]}, "content is required"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "image_url"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "json_object"),
    ({"top_logprobs": 2, "logprobs": True}, "top_logprobs"),
    ({"stream": True}, "stream"),
    ({"max_completion_tokens": 0}, "max_tokens"),
]


@pytest.mark.parametrize(("fields", "contains"), BAD_CHATS)
def test_chat_validation(api: Api, fields: dict[str, Any], contains: str) -> None:
    body = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}
    oai_error(api.post(f"{OAI}/chat/completions", body), 400, contains=contains)


def test_unparseable_bodies(api: Api) -> None:
    r = api.post(f"{OAI}/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    oai_error(r, 400, contains="not valid JSON")
    oai_error(api.post(f"{OAI}/completions", [1, 2]), 400, contains="JSON object")
    oai_error(api.post(f"{OAI}/chat/completions", {"messages": []}), 400, contains="model")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def limited(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """A factory of apps with the given settings, on a fresh database of the fixture's backend."""
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")

    def start(**settings: Any) -> Any:
        return running_app(make_settings(tmp_path / "data", url, **settings))

    yield start


def test_completions_share_the_sample_queue_backpressure(limited: Any) -> None:
    """A completion is a sample-kind op: with the queue full it is refused with a 429 (OpenAI's
    shape, Retry-After) and nothing is written; once the queue drains it is accepted."""
    with limited(max_queued_samples=1) as api:
        sampler_id = api.sampler()
        queued = api.accepted(
            api.post(
                "/api/v1/asample",
                {
                    "sampling_session_id": sampler_id,
                    "seq_id": 0,
                    "num_samples": 1,
                    "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
                    "sampling_params": {"max_tokens": 2},
                },
            )
        )
        body = {"model": BASE_MODEL, "prompt": f"full {uuid.uuid4().hex}", "max_tokens": 2}
        refused = api.post(f"{OAI}/completions", body, key=None, headers=bearer(KEY_A))
        oai_error(refused, 429, "rate_limit_exceeded", "queue is full")
        assert refused.headers["retry-after"] == "1"
        with api.db.read() as s:
            assert s.execute(select(Op.request_id).where(Op.sampler_id.is_(None))).first() is None

        with api.db.write() as s:
            s.execute(update(Op).where(Op.request_id == queued).values(status="succeeded"))
        with ThreadPoolExecutor(1) as pool:
            marker = uuid.uuid4().hex
            r, _, _ = answered(api, pool, "/completions", {**body, "prompt": marker}, marker, result=RESULT)
        assert r.status_code == 200, r.text
