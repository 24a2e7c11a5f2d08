"""The bad inputs that outside testing answered with a 5xx or accepted into a stuck run (issue 7
item 8), and the cheap bounds on forward_backward bodies (item 6), on SQLite and PostgreSQL.

The SDK retries every 5xx, so each of these used to loop instead of telling the user what to fix.
"""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from tinker import types

from app.api.decoding import DecodeBusy, DecodeGate
from app.api.main import install_error_handlers
from tests.api.helpers import BASE_MODEL, Api, adam, assert_error, ce_datum, fb_body, record_checkpoint

DEEP_BODY = ('{"a":' * 100_000 + "1" + "}" * 100_000).encode()


def _post_raw(api: Api, path: str, content: bytes) -> Any:
    return api.post(path, content=content, headers={"Content-Type": "application/json"})


def test_load_weights_without_model_or_session_is_400(api: Api) -> None:
    # Was a 500 AssertionError: neither addressing form was given.
    path = record_checkpoint(api, api.model(), "lw-src")
    for body in ({"path": path, "seq_id": 1}, {"path": "tinker://someone-else:train:0/weights/x", "optimizer": True}):
        assert_error(api.post("/api/v1/load_weights", body), 400, contains="model_id")


@pytest.mark.parametrize("value", [10**80, 2**63, -1])
def test_sampling_session_seq_id_out_of_range_is_400(api: Api, value: int) -> None:
    # 10**80 was a 503 (the sampler id overflowed its column); the SDK retried it forever.
    body = {"session_id": api.session(), "sampling_session_seq_id": value, "base_model": BASE_MODEL}
    assert_error(api.post("/api/v1/create_sampling_session", body), 400, contains="sampling_session_seq_id")


def test_save_for_sampler_with_huge_sampling_session_seq_id_is_refused(api: Api) -> None:
    model_id = api.model()
    body = {"model_id": model_id, "seq_id": 1, "sampling_session_seq_id": 10**80, "kind": "snapshot"}
    assert "sampling_session_seq_id" in api.refused(api.post("/api/v1/save_weights_for_sampler", body))


def test_nul_in_copy_weights_session_id_is_400(api: Api) -> None:
    # Was a 503 on PostgreSQL (text cannot hold NUL).
    source = record_checkpoint(api, api.model(), "copy-src", kind="sampler")
    body = {"source_path": source, "session_id": "s-\x00x", "model_seq_id": 1}
    assert_error(api.post("/api/v1/copy_weights", body), 400, contains="NUL")


@pytest.mark.parametrize("path", ["/api/v1/create_session", "/api/v1/asample", "/api/v1/optim_step"])
def test_json_nested_100k_deep_is_400(api: Api, path: str) -> None:
    # Was a 500 RecursionError.
    assert_error(_post_raw(api, path, DEEP_BODY), 400, contains="nests deeper")


def test_lora_seed_beyond_64_bits_is_400(api: Api) -> None:
    # Was accepted; then every attempt to build the adapter failed, the run blocked and its
    # futures answered try_again forever.
    for seed in (2**70, -(2**63) - 1):
        assert_error(api.create_model(api.session(), seed=seed), 400, contains="seed")
    # The whole 64-bit range torch takes still works, signed or not.
    for seed in (2**64 - 1, -(2**63), 0):
        api.accepted(api.create_model(api.session(), seed=seed))


@pytest.mark.parametrize(
    ("field", "value", "phrase"),
    [
        ("display_name", "\ud800", "surrogate"),
        ("user_metadata", {"k": "a\x00b"}, "NUL"),
        ("tags", [2**64], "64 bits"),
    ],
)
def test_unstorable_values_are_400_naming_the_field(api: Api, field: str, value: Any, phrase: str) -> None:
    body = {"tags": [], "sdk_version": "0.38.0", field: value}
    err = assert_error(api.post("/api/v1/create_session", body), 400, contains=phrase)
    assert field in err["message"], err


def test_nul_in_a_url_is_400(api: Api) -> None:
    assert_error(api.get("/api/v1/training_runs/s-x%00y"), 404, contains="NUL")
    assert_error(api.get("/api/v1/checkpoints?limit=1%00"), 400, contains="NUL")


def test_bad_json_training_op_is_a_failed_future_at_its_seq(api: Api) -> None:
    # A training request whose model and seq are readable is recorded as failed at that seq
    # (category user) rather than refused, so the run's later ops do not wait for it forever.
    model_id = api.model()
    bad = {"model_id": model_id, "seq_id": 1, "adam_params": adam(), "optimizer_params": "\x00"}
    assert "NUL" in api.failed_future(api.accepted(api.post("/api/v1/optim_step", bad)))
    load = {"model_id": model_id, "seq_id": 2, "path": "tinker://x/weights/\ud800"}
    assert "surrogate" in api.failed_future(api.accepted(api.post("/api/v1/load_weights", load)))
    api.queued(api.accepted(api.post("/api/v1/optim_step", {"model_id": model_id, "seq_id": 3, "adam_params": adam()})))


def _raw_datum(n_tokens: int) -> types.Datum:
    return ce_datum([1] * n_tokens)


def test_forward_backward_token_bounds_fail_before_building(api: Api) -> None:
    model_id = api.model()
    max_len = api.client.app.state.tuft.catalog.max_model_len()  # type: ignore[attr-defined]
    message = api.refused(api.post_proto(fb_body(model_id, 1, [_raw_datum(max_len + 1)])))
    assert f"{max_len + 1} tokens exceed" in message
    # The next seq goes on.
    api.queued(api.accepted(api.post_proto(fb_body(model_id, 2, [_raw_datum(4)]))))


# The decode gate itself (app/api/decoding.py): per-tenant shares, 429 beyond them.


class _FakeRequest:
    def __init__(self, body: bytes) -> None:
        self._body = body

    async def body(self) -> bytes:
        return self._body


def test_decode_gate_keeps_slots_for_other_tenants() -> None:
    release = threading.Event()

    def slow(body: bytes) -> bytes:
        release.wait(30)
        return body

    async def scenario() -> list[str]:
        gate = DecodeGate(threads=2, queue_per_tenant=3)
        outcomes: list[str] = []

        async def flood(i: int) -> None:
            try:
                await gate.decode(_FakeRequest(b"x"), "flooder", slow)  # type: ignore[arg-type]
                outcomes.append("decoded")
            except DecodeBusy as exc:
                outcomes.append(f"busy: {exc.message}")

        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(flood, i)
            await anyio.sleep(0.2)
            # The flooder has one decode running (half of 2 threads) and two waiting; its 4th and
            # 5th requests were refused at once.
            assert gate.inside("flooder") == 3
            assert sum(o.startswith("busy") for o in outcomes) == 2
            # Another tenant is decoded while the flooder's slot is still held.
            with anyio.fail_after(10):
                assert await gate.decode(_FakeRequest(b"mine"), "other", lambda b: b.upper()) == b"MINE"  # type: ignore[arg-type]
            release.set()
        return outcomes

    outcomes = anyio.run(scenario)
    assert outcomes.count("decoded") == 3
    assert all("flooder" in o and "retry after" in o for o in outcomes if o.startswith("busy"))


def test_a_busy_tenant_gets_429_with_retry_after() -> None:
    # The mapping of DecodeBusy (the gate above) onto the wire: a JSON 429 the SDK backs off on.
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/busy")
    async def busy() -> None:
        raise DecodeBusy("flooder", 8)

    with TestClient(app) as client:
        r = client.post("/busy")
    body = assert_error(r, 429, error="too_many_requests", contains="retry after")
    assert body["category"] == "server"
    assert r.headers["retry-after"] == "1"
