"""Settings -> EngineConfig: the worker hands the engine plain values."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.config import Settings
from workers.__main__ import engine_config
from workers.engine import EngineConfig


def test_engine_config_from_settings() -> None:
    assert engine_config(Settings()) == EngineConfig(micro_batch_tokens=None, activation_checkpointing="auto")
    custom = Settings(micro_batch_tokens=4096, activation_checkpointing="on")
    assert engine_config(custom) == EngineConfig(micro_batch_tokens=4096, activation_checkpointing="on")
    for bad in ({"micro_batch_tokens": 0}, {"micro_batch_tokens": "big"}, {"activation_checkpointing": "yes"}):
        with pytest.raises(ValidationError):
            Settings(**bad)  # type: ignore[arg-type]


def test_decode_cache_bytes_from_settings() -> None:
    assert engine_config(Settings()).decode_cache_bytes is None  # auto: the engine sizes it
    assert engine_config(Settings(engine_decode_cache_bytes=0)).decode_cache_bytes == 0
    assert engine_config(Settings(engine_decode_cache_bytes=2**30)).decode_cache_bytes == 2**30
    for bad in (-1, "lots"):
        with pytest.raises(ValidationError):
            Settings(engine_decode_cache_bytes=bad)  # type: ignore[arg-type]
