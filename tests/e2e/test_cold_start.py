"""Cold start (issue 7 item 10): from the first moment `tuft launch` answers, get_info never names
a tokenizer that cannot be loaded offline (SDK 0.38 caches it for the client's life), `/readyz`
says ready only once it can, and an SDK client started at the first `/healthz` gets a working
tokenizer. The built-in model's tokenizer folder is built by the worker as it starts, some
seconds after the API opens its port."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from transformers import AutoTokenizer

from tests.e2e.server import embedded
from tests.e2e.test_training import client_for, new_training

pytestmark = pytest.mark.e2e

KEY = {"X-API-Key": "tml-local-dev-key"}
HELLO = [9707, 1879]  # "Hello world" in Qwen's BPE


def _loads_offline(tokenizer_id: str) -> bool:
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_id, local_files_only=True)
    except (OSError, ValueError):
        return False
    return bool(tokenizer.encode("Hello world", add_special_tokens=False) == HELLO)


def _get(client: httpx.Client, path: str) -> httpx.Response | None:
    try:
        return client.get(path)
    except httpx.HTTPError:
        return None  # not listening yet


def test_nothing_unloadable_is_announced_while_starting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    server = embedded(tmp_path)
    server.procs.append(server._spawn(server.args, "api"))
    sdk: dict[str, Any] = {}

    def sdk_client() -> None:
        # What a user's script does as soon as the server answers: 0.38 asks get_info right after
        # creating the training client, and caches the answer.
        try:
            tokenizer = new_training(client_for(server)).get_tokenizer()
            sdk["hello"] = tokenizer.encode("Hello world", add_special_tokens=False)
        except Exception as exc:  # reported by the assertion below
            sdk["error"] = repr(exc)

    try:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            model_id = None
            checked: set[str] = set()
            answers: list[int] = []
            started = None
            deadline = time.monotonic() + 180
            while True:
                assert time.monotonic() < deadline, f"never ready; get_info answers {answers}\n{server.logs()}"
                assert server.procs[0].poll() is None, server.logs()
                health = _get(http, "/healthz")
                if health is None or health.status_code != 200:
                    time.sleep(0.05)
                    continue
                if started is None:
                    started = threading.Thread(target=sdk_client, daemon=True)
                    started.start()
                if model_id is None:
                    session = http.post(
                        "/api/v1/create_session", json={"tags": [], "sdk_version": "0.38.0"}, headers=KEY
                    )
                    assert session.status_code == 200, session.text
                    body = {
                        "session_id": session.json()["session_id"],
                        "model_seq_id": 0,
                        "base_model": "tuft/tiny-qwen3",
                        "lora_config": {"rank": 4},
                    }
                    created = http.post("/api/v1/create_model", json=body, headers=KEY)
                    assert created.status_code == 200, created.text
                    model_id = created.json()["model_id"]
                ready = _get(http, "/readyz")
                info = http.post("/api/v1/get_info", json={"model_id": model_id}, headers=KEY)
                answers.append(info.status_code)
                if info.status_code == 200:
                    tokenizer_id = info.json()["model_data"]["tokenizer_id"]
                    if tokenizer_id not in checked:
                        assert _loads_offline(tokenizer_id), (
                            f"get_info announced {tokenizer_id!r}, not loadable offline"
                        )
                        checked.add(tokenizer_id)
                else:
                    # Not yet: a retryable answer with a JSON body, never a name it cannot load.
                    assert info.status_code == 503, info.text
                    assert info.headers["retry-after"] == "1"
                    assert info.json()["category"] == "server"
                    assert ready is not None and ready.status_code == 503, "ready, but get_info is not"
                if ready is not None and ready.status_code == 200:
                    assert ready.json() == {"status": "ready"}
                    assert info.status_code == 200, info.text
                    break
                assert ready is not None and ready.status_code == 503, ready
                assert ready.json()["status"] == "starting" and ready.json()["waiting_for"], ready.text
                time.sleep(0.05)
            assert started is not None
            started.join(timeout=180)
            assert sdk.get("hello") == HELLO, sdk
            # The "ready" line comes only now (a client starting on it gets a loadable tokenizer).
            logs = server.logs()
            assert "TuFT ready on http://127.0.0.1" in logs, logs
    finally:
        server.stop()
