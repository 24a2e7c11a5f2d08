"""In-process API harness: a TestClient over create_app(settings), plus request builders that
produce exactly what the tinker SDK puts on the wire."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from tinker import types
from tinker.proto import tinker_public_pb2 as sdk_pb
from tinker.proto.request_conv import forward_backward_request_to_proto

from app.api.main import create_app
from app.checkpoint_store import new_storage_path
from app.config import DEV_API_KEY, Settings, load_settings
from app.db import migrate
from app.db.engine import Database, db_now
from app.db.models import Op, Run, Singleton
from app.queue import checkpoints
from app.queue.sweeper import hold_singleton

BASE_MODEL = "tuft/tiny-qwen3"
VOCAB = 151_936
KEY_A = DEV_API_KEY  # tenant "default"
KEY_B = "tml-tenant-b-key"  # tenant "tenant-b"
TENANT_B = "tenant-b"
ERROR_KEYS = {"error", "message", "category", "detail"}
MAX_REQUEST_BYTES = 1 << 20
MAX_DECOMPRESSED_BYTES = 4 << 20
LONG_POLL_SECONDS = 0.5


def make_settings(data_dir: Path, database_url: str | None, **overrides: Any) -> Settings:
    """Settings for a test app. database_url None is the embedded default (SQLite in data_dir,
    dev key active); with a URL the dev key must be configured explicitly."""
    keys = [{"key": KEY_B, "tenant": TENANT_B}]
    if database_url is not None:
        keys.insert(0, {"key": KEY_A, "tenant": "default"})
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "database_url": database_url,
        "api_keys": keys,
        "max_request_bytes": MAX_REQUEST_BYTES,
        "max_decompressed_bytes": MAX_DECOMPRESSED_BYTES,
        "long_poll_seconds": LONG_POLL_SECONDS,
    }
    values.update(overrides)
    return load_settings(**values)


@dataclass
class Api:
    """One running app and the helpers tests share."""

    client: TestClient
    db: Database
    settings: Settings

    @property
    def data_dir(self) -> Path:
        return self.settings.resolved_data_dir()

    # raw requests

    def post(self, path: str, body: Any = None, *, key: str | None = KEY_A, **kw: Any) -> httpx.Response:
        headers = dict(kw.pop("headers", {}) or {})
        if key is not None:
            headers["X-API-Key"] = key
        if body is not None:
            # json.dumps, not httpx's json=: that one refuses NaN, which tests send on purpose.
            kw["content"] = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        return self.client.post(path, headers=headers, **kw)

    def get(self, path: str, *, key: str | None = KEY_A, **kw: Any) -> httpx.Response:
        headers = dict(kw.pop("headers", {}) or {})
        if key is not None:
            headers["X-API-Key"] = key
        return self.client.get(path, headers=headers, **kw)

    def post_proto(
        self, body: bytes, *, key: str | None = KEY_A, encoding: str | None = None, **kw: Any
    ) -> httpx.Response:
        headers = {"Content-Type": "application/x-protobuf"}
        if encoding is not None:
            headers["Content-Encoding"] = encoding
        return self.post("/api/v1/forward_backward", key=key, content=body, headers=headers, **kw)

    # building blocks

    def session(self, key: str = KEY_A) -> str:
        r = self.post(
            "/api/v1/create_session", {"tags": [], "sdk_version": "0.38.0", "type": "create_session"}, key=key
        )
        assert r.status_code == 200, r.text
        return str(r.json()["session_id"])

    def create_model(self, session_id: str, model_seq_id: int = 0, *, key: str = KEY_A, **lora: Any) -> httpx.Response:
        lora_config = {"rank": 8, "train_unembed": True, "train_mlp": True, "train_attn": True, **lora}
        body = {
            "session_id": session_id,
            "model_seq_id": model_seq_id,
            "base_model": BASE_MODEL,
            "lora_config": lora_config,
            "optimizer_config": {"type": "adamw"},
            "type": "create_model",
        }
        return self.post("/api/v1/create_model", body, key=key)

    def model(self, key: str = KEY_A) -> str:
        """A fresh session and training run; returns the model id."""
        r = self.create_model(self.session(key), key=key)
        assert r.status_code == 200, r.text
        return str(r.json()["model_id"])

    def sampler(self, key: str = KEY_A) -> str:
        body = {
            "session_id": self.session(key),
            "sampling_session_seq_id": 0,
            "base_model": BASE_MODEL,
            "type": "create_sampling_session",
        }
        r = self.post("/api/v1/create_sampling_session", body, key=key)
        assert r.status_code == 200, r.text
        return str(r.json()["sampling_session_id"])

    def retrieve(self, request_id: str, *, key: str = KEY_A) -> httpx.Response:
        return self.post("/api/v1/retrieve_future", {"request_id": request_id, "allow_metadata_only": False}, key=key)

    def failed_future(self, request_id: str, *, key: str = KEY_A) -> str:
        """Assert the future failed with category user; return its message."""
        r = self.retrieve(request_id, key=key)
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"error", "category"}, body
        assert body["category"] == "user", body
        assert isinstance(body["error"], str) and body["error"], body
        return str(body["error"])

    def pending_future(self, request_id: str, *, key: str = KEY_A) -> None:
        """Assert the future is queued (no worker runs here): the poll answers try_again."""
        r = self.retrieve(request_id, key=key)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body.get("type") == "try_again", body
        assert body.get("request_id") == request_id, body

    def refused(self, r: httpx.Response, *, key: str = KEY_A) -> str:
        """A user error reported either way the brief allows: a 400 JSON body, or a submission
        whose future has already failed with category user. Returns the message."""
        if r.status_code == 400:
            return str(assert_error(r, 400)["message"])
        return self.failed_future(self.accepted(r), key=key)

    def op_status(self, request_id: str) -> str | None:
        """The op row's status, read from the database: a cheap "queued" check that does not hold
        a long poll for long_poll_seconds."""
        with self.db.read() as s:
            return s.execute(select(Op.status).where(Op.request_id == request_id)).scalar_one_or_none()

    def queued(self, request_id: str) -> None:
        assert self.op_status(request_id) == "queued"

    def accepted(self, r: httpx.Response) -> str:
        """A submission reply: 200 with a request_id."""
        assert r.status_code == 200, r.text
        body = r.json()
        assert isinstance(body.get("request_id"), str) and body["request_id"], body
        return str(body["request_id"])

    def files(self) -> set[str]:
        """Every file and folder under the data dir, apart from the SQLite database's own files."""
        root = self.data_dir
        return {str(p.relative_to(root)) for p in root.rglob("*") if not p.name.startswith("tuft.db")}


def assert_error(
    r: httpx.Response, status: int, *, error: str | None = None, contains: str | None = None
) -> dict[str, Any]:
    """A rejected request: the status, a non-empty JSON body {error, message, category, detail}."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    # An empty 400 is read by the SDK as an injected Cloudflare error (tinker-protocol.md §0.13).
    assert int(r.headers["content-length"]) > 0
    body: dict[str, Any] = r.json()
    assert set(body) == ERROR_KEYS, body
    assert body["category"] in ("user", "server", "unknown"), body
    assert isinstance(body["message"], str) and body["message"], body
    if error is not None:
        assert body["error"] == error, body
    if contains is not None:
        assert contains.lower() in body["message"].lower(), body
    return body


@contextmanager
def running_app(settings: Settings) -> Iterator[Api]:
    """Migrate (never create_all), then run the app with its lifespan."""
    url = settings.resolved_database_url()
    settings.resolved_data_dir().mkdir(parents=True, exist_ok=True)
    migrate.upgrade(url)
    db = Database(url, process_name="api-test")
    try:
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            yield Api(client=client, db=db, settings=settings)
    finally:
        db.dispose()


# Request bodies, built the way the SDK builds them


def ce_datum(tokens: list[int], targets: list[int] | None = None, weights: list[float] | None = None) -> types.Datum:
    targets = targets if targets is not None else [*tokens[1:], 0]
    weights = weights if weights is not None else [1.0] * len(tokens)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=targets, dtype="int64", shape=[len(targets)]),
            "weights": types.TensorData(data=weights, dtype="float32", shape=[len(weights)]),
        },
    )


def fb_message(
    model_id: str,
    seq_id: int | None,
    data: list[types.Datum] | None = None,
    *,
    loss_fn: str = "cross_entropy",
    forward_only: bool = False,
) -> sdk_pb.ForwardBackwardRequest:
    """What resources/training.py::forward_backward serializes."""
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(
            data=data if data is not None else [ce_datum([1, 2, 3, 4])],
            loss_fn=loss_fn,  # type: ignore[arg-type]
        ),
        model_id=model_id,
        seq_id=seq_id,
    )
    msg = forward_backward_request_to_proto(request)
    msg.forward_only = forward_only
    return msg


def fb_body(model_id: str, seq_id: int | None, data: list[types.Datum] | None = None, **kw: Any) -> bytes:
    return fb_message(model_id, seq_id, data, **kw).SerializeToString()


def adam(**overrides: Any) -> dict[str, Any]:
    return {"learning_rate": 1e-4, "beta1": 0.9, "beta2": 0.95, "eps": 1e-12, "weight_decay": 0.0, **overrides}


def record_checkpoint(
    api: Api, model_id: str, name: str, *, kind: str = "training", with_optimizer: bool = False
) -> str:
    """A checkpoint row as a worker would record it after saving (no worker runs in these tests);
    returns its tinker:// path."""
    with api.db.write() as s:
        run = s.get(Run, model_id)
        assert run is not None
        checkpoints.record(
            s,
            tenant=run.tenant,
            run_id=model_id,
            kind=kind,
            name=name,
            storage_path=new_storage_path(model_id, kind, name, f"req-test-{name}"),
            base_model=run.base_model,
            lora_config=dict(run.lora_config),
            with_optimizer=with_optimizer,
            ephemeral=False,
            size_bytes=1,
            user_metadata=None,
            ttl_seconds=None,
            request_id=f"req-test-{name}",
            overwrite=False,
        )
    segment = "weights" if kind == "training" else "sampler_weights"
    return f"tinker://{model_id}/{segment}/{name}"


@contextmanager
def sweeper_held(api: Api) -> Iterator[None]:
    """Keep the app's own sweeper thread idle (it sweeps every 2 s and would delete an expired
    checkpoint in the middle of a test about what happens before the sweep): take its singleton
    lease from it, and hand it back afterwards.

    Taken by force: the app's sweeper renews its lease every pass, so waiting for it to lapse
    only worked when the sweeper had not started yet (under CI load it had, and the wait timed
    out). A pass it began before the takeover may still be running: give it time to end."""
    with api.db.write() as s:
        hold_singleton(s, "sweeper", "test-hold", ttl=120)  # creates the row if there is none
        s.execute(
            update(Singleton).where(Singleton.name == "sweeper").values(holder="test-hold", expires_at=db_now(s) + 120)
        )
    time.sleep(2.0)
    try:
        yield
    finally:
        with api.db.write() as s:
            s.execute(update(Singleton).where(Singleton.name == "sweeper").values(expires_at=db_now(s) - 1))
