"""No input, however hostile, is answered with a 5xx (issue 7 item 8): the SDK retries 5xx for
minutes, so a user error answered 5xx loops instead of telling the user what to fix.

Every route's JSON fields are fuzzed one at a time from a valid body, with integers beyond 64 bits,
negative and float numbers, NaN, huge strings, NUL, lone surrogates, wrong types and deep
nesting; query strings and path segments get the same treatment. Each answer must be below 500,
and a 4xx must carry the JSON error body. Runs on SQLite and PostgreSQL (the `api` fixture).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.db.models import Checkpoint
from tests.api.helpers import BASE_MODEL, KEY_A, Api, adam, assert_error, record_checkpoint


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"k": value}
    return value


HOSTILE: dict[str, Any] = {
    "int_2_64": 2**64,
    "int_below_int64": -(2**63) - 1,
    "int_10_80": 10**80,
    "int_2_63": 2**63,
    "int_2_31": 2**31,
    "int_minus_1": -1,
    "float": 1.5,
    "nan": float("nan"),
    "inf": float("inf"),
    "minus_inf": float("-inf"),
    "huge_string": "x" * 200_000,
    "nul": "a\x00b",
    "surrogate": "\ud800",
    "empty_string": "",
    "null": None,
    "true": True,
    "list": [1, "a", None],
    "object": {"k": "v"},
    "nested_60": _nested(60),
}
# A body nested 100k deep, built as text (json.dumps itself would overflow the stack).
DEEP_BODY = ('{"a":' * 100_000 + "1" + "}" * 100_000).encode()


@dataclass
class World:
    """Valid objects of tenant A that the base bodies name."""

    api: Api
    session: str
    model: str
    sampler: str
    checkpoint: str
    sampler_checkpoint: str
    request_id: str
    seqs: itertools.count[int]

    def seq(self) -> int:
        return next(self.seqs)


def _with_files(api: Api, path: str) -> str:
    """Files for a recorded checkpoint, as a worker's save leaves them (copy_weights copies them)."""
    run_id, _, name = path.removeprefix("tinker://").split("/")
    with api.db.read() as s:
        storage = s.execute(
            select(Checkpoint.storage_path).where(Checkpoint.run_id == run_id, Checkpoint.name == name)
        ).scalar_one()
    folder = api.settings.resolved_checkpoint_dir() / storage
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    (folder / "manifest.json").write_text(json.dumps({"tinker_path": path, "format": "peft-lora"}))
    return path


@pytest.fixture(scope="module")
def world(api: Api) -> World:
    session = api.session()
    r = api.create_model(session, 0)
    model = api.accepted(r) and str(r.json()["model_id"])
    return World(
        api=api,
        session=session,
        model=model,
        sampler=api.sampler(),
        checkpoint=record_checkpoint(api, model, "fuzz-state", with_optimizer=True),
        sampler_checkpoint=_with_files(api, record_checkpoint(api, model, "fuzz-weights", kind="sampler")),
        request_id=api.accepted(r),
        seqs=itertools.count(1),
    )


def _sample(w: World) -> dict[str, Any]:
    return {
        "sampling_session_id": w.sampler,
        "seq_id": w.seq(),
        "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
        "sampling_params": {"max_tokens": 4, "seed": 1, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "stop": [2]},
        "topk_prompt_logprobs": 0,
        "prompt_logprobs": False,
    }


# route -> (method, path, valid body builder, fields to fuzz; dotted paths reach into the body)
JsonRoute = tuple[str, str, Callable[[World], dict[str, Any]], list[str]]
ROUTES: dict[str, JsonRoute] = {
    "create_session": (
        "POST",
        "/api/v1/create_session",
        lambda w: {"tags": ["t"], "user_metadata": {"k": "v"}, "sdk_version": "0.38.0", "display_name": "d"},
        ["tags", "tags.0", "user_metadata", "user_metadata.k", "sdk_version", "project_id", "display_name"],
    ),
    "session_heartbeat": ("POST", "/api/v1/session_heartbeat", lambda w: {"session_id": w.session}, ["session_id"]),
    "create_model": (
        "POST",
        "/api/v1/create_model",
        lambda w: {
            "session_id": w.session,
            "model_seq_id": w.seq() + 1000,
            "base_model": BASE_MODEL,
            "lora_config": {"rank": 4, "seed": 1, "train_mlp": True},
            "optimizer_config": {"type": "adamw"},
            "user_metadata": {"k": "v"},
        },
        [
            "session_id",
            "model_seq_id",
            "base_model",
            "lora_config",
            "lora_config.rank",
            "lora_config.seed",
            "lora_config.train_mlp",
            "optimizer_config",
            "optimizer_config.type",
            "user_metadata",
        ],
    ),
    "get_info": ("POST", "/api/v1/get_info", lambda w: {"model_id": w.model}, ["model_id"]),
    "optim_step": (
        "POST",
        "/api/v1/optim_step",
        lambda w: {"model_id": w.model, "seq_id": w.seq(), "adam_params": adam()},
        ["model_id", "seq_id", "adam_params", "adam_params.learning_rate", "adam_params.beta1", "optimizer_params"],
    ),
    "save_weights": (
        "POST",
        "/api/v1/save_weights",
        lambda w: {"model_id": w.model, "seq_id": w.seq(), "path": f"c{w.seq()}", "ttl_seconds": 60},
        ["model_id", "seq_id", "path", "ttl_seconds", "overwrite", "user_metadata"],
    ),
    "save_weights_for_sampler": (
        "POST",
        "/api/v1/save_weights_for_sampler",
        lambda w: {"model_id": w.model, "seq_id": w.seq(), "sampling_session_seq_id": w.seq(), "kind": "snapshot"},
        ["model_id", "seq_id", "path", "sampling_session_seq_id", "kind", "ttl_seconds", "user_metadata"],
    ),
    "save_weights_external": (
        "POST",
        "/api/v1/save_weights_external",
        lambda w: {"model_id": w.model, "seq_id": w.seq(), "path": f"e{w.seq()}"},
        ["model_id", "seq_id", "path", "ttl_seconds", "age_encryption_recipients"],
    ),
    "load_weights": (
        "POST",
        "/api/v1/load_weights",
        lambda w: {"model_id": w.model, "seq_id": w.seq(), "path": w.checkpoint, "optimizer": True},
        ["model_id", "seq_id", "path", "optimizer", "session_id", "model_seq_id"],
    ),
    "load_weights_creating": (
        "POST",
        "/api/v1/load_weights",
        lambda w: {"session_id": w.session, "model_seq_id": w.seq() + 5000, "path": w.checkpoint},
        ["session_id", "model_seq_id", "path", "base_model", "optimizer_config", "user_metadata"],
    ),
    "weights_info": ("POST", "/api/v1/weights_info", lambda w: {"tinker_path": w.checkpoint}, ["tinker_path"]),
    "create_sampling_session": (
        "POST",
        "/api/v1/create_sampling_session",
        lambda w: {"session_id": w.session, "sampling_session_seq_id": w.seq(), "model_path": w.sampler_checkpoint},
        ["session_id", "sampling_session_seq_id", "base_model", "model_path"],
    ),
    "asample": (
        "POST",
        "/api/v1/asample",
        _sample,
        [
            "sampling_session_id",
            "seq_id",
            "num_samples",
            "prompt",
            "prompt.chunks",
            "prompt.chunks.0.tokens",
            "prompt.chunks.0.tokens.0",
            "sampling_params.max_tokens",
            "sampling_params.seed",
            "sampling_params.temperature",
            "sampling_params.top_p",
            "sampling_params.top_k",
            "sampling_params.stop",
            "topk_prompt_logprobs",
            "prompt_logprobs",
            "topk_sample_logprobs",
            "target_prompt_logprobs",
            "prompt_alt_tokens_k",
            "prompt_logprobs_last_n",
        ],
    ),
    "retrieve_future": ("POST", "/api/v1/retrieve_future", lambda w: {"request_id": w.request_id}, ["request_id"]),
    "sessions_search": (
        "POST",
        "/api/v1/sessions/search",
        lambda w: {"session_id": w.session, "limit": 5, "user_metadata": {"k": "v"}},
        ["session_id", "limit", "display_name", "user_metadata", "statuses", "cursor", "owner", "project_ids"],
    ),
    "finish_session": (
        "POST",
        "/api/v1/sessions/{session}/finish",
        lambda w: {"reason": {"type": "success"}, "detail": "d"},
        ["reason", "reason.type", "detail"],
    ),
    "copy_weights": (
        "POST",
        "/api/v1/copy_weights",
        lambda w: {"source_path": w.sampler_checkpoint, "ttl_seconds": 60},
        ["source_path", "session_id", "model_seq_id", "ttl_seconds", "destination_project_id"],
    ),
    "set_ttl": (
        "PUT",
        "/api/v1/training_runs/{model}/checkpoints/weights/fuzz-state/ttl",
        lambda w: {"ttl_seconds": 3600},
        ["ttl_seconds"],
    ),
    "client_config": ("POST", "/api/v1/client/config", lambda w: {"sdk_version": "0.38.0"}, ["sdk_version"]),
    "telemetry": ("POST", "/api/v1/telemetry", lambda w: {"events": []}, ["events", "session_id"]),
    # An accepted completion is held until a worker answers (none runs here), so every OpenAI body
    # carries one refusal checked last: max_tokens beyond the context, or a training checkpoint.
    "oai_completions": (
        "POST",
        "/oai/api/v1/completions",
        lambda w: {"model": BASE_MODEL, "prompt": [1, 2, 3], "max_tokens": 10**6, "temperature": 0.5, "seed": 1},
        ["model", "prompt", "temperature", "top_p", "n", "stop", "seed", "logprobs", "logit_bias", "echo"],
    ),
    "oai_chat": (
        "POST",
        "/oai/api/v1/chat/completions",
        lambda w: {"model": BASE_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6},
        ["model", "messages", "messages.0.role", "messages.0.content", "temperature", "n", "stop", "top_logprobs"],
    ),
    "oai_max_tokens": (
        "POST",
        "/oai/api/v1/chat/completions",
        lambda w: {"model": w.checkpoint, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        ["max_tokens", "max_completion_tokens"],
    ),
}


def _set(body: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    body = json.loads(json.dumps(body))  # a deep copy
    *parents, last = dotted.split(".")
    node: Any = body
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return body


def _check(r: httpx.Response, what: str, problems: list[str]) -> None:
    if r.status_code >= 500:
        problems.append(f"{what}: {r.status_code} {r.text[:300]}")
    elif r.status_code >= 400:
        try:
            if r.request.url.path.startswith("/oai/") and isinstance(r.json().get("error"), dict):
                # The OpenAI-compatible routes answer in OpenAI's error shape (docs/openai.md).
                error = r.json()["error"]
                assert isinstance(error["message"], str) and error["message"] and error["type"], error
            else:
                assert_error(r, r.status_code)
        except (AssertionError, KeyError, ValueError) as exc:
            problems.append(f"{what}: {r.status_code} without a proper JSON error body: {exc!r}"[:400])


def _send(api: Api, method: str, path: str, content: bytes) -> httpx.Response:
    headers = {"X-API-Key": KEY_A, "Content-Type": "application/json"}
    return api.client.request(method, path, content=content, headers=headers)


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_no_hostile_json_field_is_a_5xx(world: World, route: str) -> None:
    method, template, build, fields = ROUTES[route]
    path = template.format(session=world.session, model=world.model)
    problems: list[str] = []
    # The valid body itself must not fail on the server's side either.
    _check(_send(world.api, method, path, json.dumps(build(world)).encode()), f"{route} valid body", problems)
    for field in fields:
        for name, value in HOSTILE.items():
            body = _set(build(world), field, value)
            _check(_send(world.api, method, path, json.dumps(body).encode()), f"{route}.{field}={name}", problems)
    for name, content in (
        ("nested_100k", DEEP_BODY),
        ("array_body", b"[1, 2]"),
        ("not_json", b"{'a': 1"),
        ("bad_utf8", b'{"a": "\xff\xfe"}'),
        ("int_5000_digits", b'{"a": ' + b"9" * 5000 + b"}"),
    ):
        _check(_send(world.api, method, path, content), f"{route} {name}", problems)
    assert not problems, "\n".join(problems[:40])


# GET and DELETE routes: hostile path segments and query strings.
SEGMENTS = {
    "nul": "a%00b",
    "bad_utf8": "%ED%A0%80",
    "long": "x" * 5000,
    "dotdot": "..",
    "encoded_slash": "a%2Fb",
    "unicode": "%C3%A9t%C3%A9",
    "spaces": "a%20b",
}
QUERIES = {
    "negative": "-1",
    "huge": "9" * 40,
    "float": "1.5",
    "nan": "nan",
    "word": "abc",
    "nul": "%00",
    "empty": "",
}
PATHS = [
    "/api/v1/training_runs/{x}",
    "/api/v1/training_runs/{x}/checkpoints",
    "/api/v1/sessions/{x}",
    "/api/v1/samplers/{x}",
    "/api/v1/training_runs/{model}/checkpoints/weights/{x}/archive",
    "/api/v1/training_runs/{model}/checkpoints/external_weights/{x}/external_weights_urls",
    "/api/v1/downloads/{x}/adapter_model.safetensors",
    "/oai/api/v1/models/{x}",
]
LISTINGS = [
    "/api/v1/training_runs",
    "/api/v1/checkpoints",
    "/api/v1/sessions",
    "/api/v1/training_runs/{model}/checkpoints",
]


def test_no_hostile_path_or_query_is_a_5xx(world: World) -> None:
    problems: list[str] = []
    api = world.api
    for template, (name, segment) in itertools.product(PATHS, SEGMENTS.items()):
        path = template.format(x=segment, model=world.model)
        _check(api.get(path), f"GET {template} {name}", problems)
    for name, segment in SEGMENTS.items():
        path = f"/api/v1/training_runs/{world.model}/checkpoints/weights/{segment}"
        _check(api.client.delete(path, headers={"X-API-Key": KEY_A}), f"DELETE {name}", problems)
        path = f"/api/v1/training_runs/{segment}/checkpoints/weights/x/publish"
        _check(api.post(path), f"publish {name}", problems)
    for template, param, (_name, value) in itertools.product(
        LISTINGS, ("limit", "offset", "access_scope"), QUERIES.items()
    ):
        path = template.format(model=world.model) + f"?{param}={value}"
        _check(api.get(path), f"GET {path[:80]}", problems)
    assert not problems, "\n".join(problems[:40])
