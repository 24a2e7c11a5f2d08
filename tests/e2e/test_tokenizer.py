"""`get_tokenizer()` works offline for the built-in model: the worker builds the tokenizer folder
at startup, `get_info` names it, and the SDK loads it with no Hugging Face Hub access."""

from __future__ import annotations

import time

import pytest

from tests.e2e.server import LiveServer
from tests.e2e.test_training import client_for

pytestmark = pytest.mark.e2e


def test_training_client_tokenizer_offline(embedded_server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # No Hub: a tokenizer name the SDK tried to download would fail at once instead of retrying.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    folder = embedded_server.data_dir / "cache" / "tokenizers" / "tiny-qwen3"
    deadline = time.monotonic() + 120
    # Built by the worker as it starts, before any run exists (workers/__main__.py).
    while not (folder / "tokenizer.json").exists():
        assert time.monotonic() < deadline, "the worker never built the tokenizer folder"
        time.sleep(0.5)

    client = client_for(embedded_server)
    training = client.create_lora_training_client(base_model="tuft/tiny-qwen3", rank=4)
    tokenizer = training.get_tokenizer()
    # Qwen's BPE, as the worker tokenizes (the OpenAI endpoint's text path uses the same folder).
    assert tokenizer.encode("Hello world", add_special_tokens=False) == [9707, 1879]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 151_645
    text = "Hello, TuFT! Fine-tuning offline."
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
