"""Readiness in-process (issue 7 item 10): `/readyz` and get_info on an embedded app whose worker
has not started yet, then once a worker is registered and the tokenizer folder is built. The live
`tuft launch` version is tests/e2e/test_cold_start.py."""

from __future__ import annotations

from pathlib import Path

from app.queue import leases
from tests.api.helpers import assert_error, make_settings, running_app


def test_not_ready_until_the_worker_and_the_tokenizer_are_there(tmp_path: Path) -> None:
    with running_app(make_settings(tmp_path / "data", None)) as api:
        model_id = api.model()
        assert api.get("/healthz", key=None).status_code == 200  # alive: the database answers

        ready = api.get("/readyz", key=None)
        assert ready.status_code == 503 and ready.headers["retry-after"] == "1"
        waiting = ready.json()["waiting_for"]
        assert ready.json()["status"] == "starting" and len(waiting) == 2, waiting
        assert "tokenizer of tuft/tiny-qwen3" in waiting[0] and "worker" in waiting[1]
        # get_info does not name a tokenizer the client could not load (it would keep it).
        info = api.post("/api/v1/get_info", {"model_id": model_id, "type": "get_info"})
        body = assert_error(info, 503, error="not_ready", contains="still being prepared")
        assert body["category"] == "server" and info.headers["retry-after"] == "1"

        with api.db.write() as s:
            leases.register_worker(s, worker_id="w-ready", host="h", device="cpu", queue="q", pid=1)
        assert api.get("/api/v1/readyz", key=None).json()["waiting_for"] == [waiting[0]]
        folder = api.data_dir / "cache" / "tokenizers" / "tiny-qwen3"
        folder.mkdir(parents=True)
        (folder / "tokenizer.json").write_text("{}")

        ready = api.get("/readyz", key=None)
        assert ready.status_code == 200 and ready.json() == {"status": "ready"}
        info = api.post("/api/v1/get_info", {"model_id": model_id, "type": "get_info"})
        assert info.status_code == 200, info.text
        assert info.json()["model_data"]["tokenizer_id"] == str(folder)


def test_a_deployment_api_is_ready_without_a_local_tokenizer(tmp_path: Path, sqlite_url: str) -> None:
    """In a deployment the API may not share the workers' data_dir: readiness does not wait for a
    folder that may never appear there, and get_info names the model (docs/deployment.md)."""
    with running_app(make_settings(tmp_path / "data", sqlite_url)) as api:
        assert api.get("/readyz", key=None).json() == {"status": "ready"}
        info = api.post("/api/v1/get_info", {"model_id": api.model(), "type": "get_info"})
        assert info.status_code == 200 and info.json()["model_data"]["tokenizer_id"] == "tuft/tiny-qwen3"
