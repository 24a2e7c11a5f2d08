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
