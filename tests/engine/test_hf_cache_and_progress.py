"""A Hugging Face id served from the local hub cache, and progress lines for long work
(docs/migrating-from-tuft.md, docs/metrics.md "Long tasks").

The cache is a fake folder tree in tmp (models--Org--Name/snapshots/<rev>, refs/main) holding a
tiny random qwen3 saved by transformers: CPU-cheap, no network.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from app.config import load_settings
from app.domain.hf_cache import cached_snapshot, hub_cache_dir, resolve_model_path
from app.domain.models import ModelSpec
from tests.engine.helpers import DEVICE, TINY, lora
from workers.engine import TorchEngine, progress
from workers.engine.base_models import load_base_model
from workers.engine.tiny import build_tiny_tokenizer

REPO_ID = "TinyOrg/tiny-qwen3"
REV = "0123abcd"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """<hub>/models--TinyOrg--tiny-qwen3/snapshots/<REV> with refs/main, as huggingface_hub lays it out."""
    hub = tmp_path_factory.mktemp("hf") / "hub"
    repo = hub / "models--TinyOrg--tiny-qwen3"
    snapshot = repo / "snapshots" / REV
    config = AutoConfig.for_model(
        "qwen3",
        vocab_size=512,
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(config, name, 3)  # the defaults point past the 512-token vocabulary
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        AutoModelForCausalLM.from_config(config).save_pretrained(snapshot)
        build_tiny_tokenizer(cache_dir).save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    return hub


def test_cache_location_honours_hf_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub_cache_dir() == tmp_path / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub_cache_dir() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert hub_cache_dir() == tmp_path / "elsewhere"


def test_hf_id_resolves_from_cache(hub: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(hub.parent))
    snapshot = hub / "models--TinyOrg--tiny-qwen3" / "snapshots" / REV
    assert cached_snapshot(REPO_ID) == snapshot
    assert resolve_model_path(REPO_ID) == str(snapshot)
    assert resolve_model_path("TinyOrg/not-cached") == "TinyOrg/not-cached"  # left for the error to name
    config = tmp_path / "tuft.yaml"
    config.write_text(f"supported_models:\n  - model_name: tiny\n    model_path: {REPO_ID}\n")
    monkeypatch.delenv("TUFT_SETTINGS_JSON", raising=False)
    spec = load_settings(config).supported_models[0]
    # Clients are still told the id, which they can load; the worker reads the snapshot.
    assert (spec.model_path, spec.tokenizer_id) == (str(snapshot), REPO_ID)


def test_model_load_logs_progress(hub: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    seen: list[tuple[str, str, float | None]] = []
    progress.add_listener(lambda *update: seen.append(update))
    try:
        with caplog.at_level(logging.INFO, logger="tuft.progress"):
            loaded = load_base_model(
                ModelSpec(model_name="tiny", model_path=REPO_ID), torch.device(DEVICE), torch.float32, hub
            )
    finally:
        progress._listeners.clear()
    assert loaded.vocab_size == 512
    lines = [r.getMessage() for r in caplog.records if r.name == "tuft.progress"]
    assert lines[0].startswith("loading model tiny (") and lines[0].endswith("… 0%")
    assert "100% in" in lines[-1]
    assert seen[0] == ("loading model", "tiny", 0.0) and seen[-1] == ("loading model", "tiny", None)


def test_checkpoint_save_logs_progress(cache_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    engine = TorchEngine(
        [ModelSpec(model_name=TINY, model_path="builtin:tiny-qwen3")], device=DEVICE, cache_dir=cache_dir
    )
    engine.create_run("progress:ck", TINY, lora(rank=4))
    dest = tmp_path / "ck"
    dest.mkdir()
    # A tiny checkpoint logs at DEBUG (only large ones at INFO: small saves are frequent).
    with caplog.at_level(logging.DEBUG, logger="tuft.progress"):
        engine.save_run("progress:ck", dest, with_optimizer=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "tuft.progress"]
    assert lines[0].startswith(f"writing checkpoint {dest} (") and "with optimizer state" in lines[0]
    assert "100% in" in lines[-1]
    assert all(r.levelno == logging.DEBUG for r in caplog.records if r.name == "tuft.progress")


def test_progress_logs_steps_not_every_update(caplog: pytest.LogCaptureFixture) -> None:
    from workers.metrics import LONG_TASK_PROGRESS, long_task_progress

    work = progress.Progress("loading model", "steps", total=100.0, every=3600.0)
    progress.add_listener(long_task_progress)
    try:
        with caplog.at_level(logging.INFO, logger="tuft.progress"):
            work.start()
            for _ in range(99):
                work.advance(1.0)
            assert LONG_TASK_PROGRESS.labels(task="loading model", name="steps")._value.get() == pytest.approx(0.99)
            work.advance(1.0)
            work.finish()
    finally:
        progress.remove_listener(long_task_progress)
    lines = [r.getMessage() for r in caplog.records if r.name == "tuft.progress"]
    assert [line.rsplit(" ", 1)[-1] for line in lines[:-1]] == ["0%", "20%", "40%", "60%", "80%"]
    assert "100% in" in lines[-1]
    # The series goes once the task ends: nothing stale left for a scrape.
    assert not [s for m in LONG_TASK_PROGRESS.collect() for s in m.samples if s.labels.get("name") == "steps"]


def test_move_to_device_reports_by_bytes(caplog: pytest.LogCaptureFixture) -> None:
    """The move that follows reading on a GPU, run to the meta device (no GPU on CI)."""
    from workers.engine.base_models import _move
    from workers.engine.tiny import build_tiny_model

    model = build_tiny_model(dtype=torch.float32, device=torch.device("cpu"))
    work = progress.Progress("loading model", "move", total=100.0, every=3600.0)
    with caplog.at_level(logging.INFO, logger="tuft.progress"):
        _move(model, torch.device("meta"), work, share=100.0)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert work.done == pytest.approx(100.0)
    lines = [r.getMessage() for r in caplog.records if r.name == "tuft.progress"]
    assert 1 <= len(lines) <= 4 and all("to meta" in line for line in lines)  # steps, not tensors


def test_heartbeat_while_unmeasured_work_runs(caplog: pytest.LogCaptureFixture) -> None:
    import time

    work = progress.Progress("loading model", "beat", total=1.0, every=0.05)
    with caplog.at_level(logging.INFO, logger="tuft.progress"), progress.heartbeat(work, "reading weights"):
        time.sleep(0.3)
    beats = [r.getMessage() for r in caplog.records if "reading weights" in r.getMessage()]
    assert beats and beats[0].startswith("loading model beat: reading weights, ")
