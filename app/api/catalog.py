"""The models this server serves, as the API needs them: names, limits and vocabulary sizes.

The API validates token ids against the vocabulary without loading a model: the size comes from
the config (built-in model) or from the model folder's config.json (plain JSON, no torch).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from app.config import Settings
from app.domain.errors import InvalidInput
from app.domain.models import BUILTIN_TINY_MODEL, BUILTIN_TINY_PATH, ModelSpec


class ModelCatalog:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.specs = {m.model_name: m for m in settings.models()}

    def get(self, name: str) -> ModelSpec:
        spec = self.specs.get(name)
        if spec is None:
            raise InvalidInput(f"unknown base model {name!r}; this server serves {sorted(self.specs)}")
        return spec

    def max_model_len(self) -> int:
        """The longest sequence any served model takes: a bound on a request before its run (and
        so its model) is known."""
        return max(spec.max_model_len for spec in self.specs.values())

    def vocab_size(self, name: str) -> int:
        spec = self.get(name)
        return spec.vocab_size or _vocab_from_folder(spec.model_path)

    def model_type(self, name: str) -> str | None:
        """config.json's `model_type` (None for the built-in model or a folder without one)."""
        spec = self.get(name)
        return None if spec.model_path == BUILTIN_TINY_PATH else _model_type_from_folder(spec.model_path)

    def capabilities(self) -> list[dict[str, Any]]:
        return [
            {
                "model_name": m.model_name,
                "max_context_length": m.max_model_len,
                "trainable": True,
                "sampleable": True,
            }
            for m in self.specs.values()
        ]

    def builtin_tokenizer_folder(self) -> Path:
        """Built by the worker as it starts (workers/__main__.py), atomically: once the folder
        exists it is complete."""
        return self.settings.resolved_data_dir() / "cache" / "tokenizers" / "tiny-qwen3"

    def tokenizer_pending(self) -> list[str]:
        """The models whose tokenizer get_info cannot announce yet: the built-in model's, in the
        embedded mode, until the worker has built its folder. (In a deployment the API may not
        share the workers' data_dir, so it announces the name rather than wait for a folder that
        may never appear here; docs/configuration.md.)"""
        return [
            name
            for name, spec in self.specs.items()
            if name == BUILTIN_TINY_MODEL
            and not spec.tokenizer_id
            and self.settings.embedded
            and not (self.builtin_tokenizer_folder() / "tokenizer.json").exists()
        ]

    def tokenizer_id(self, name: str) -> str:
        """What the SDK's get_tokenizer() loads with AutoTokenizer.from_pretrained: a local folder
        when one exists (no hub access here), else the model name; `tokenizer_id` in the model's
        config overrides both, for clients on other machines. TokenizerNotReady while the folder
        is still being built (0.38 caches the answer for the client's life, so a name it cannot
        load would break its get_tokenizer() for good)."""
        spec = self.get(name)
        if spec.tokenizer_id:
            return spec.tokenizer_id
        if name == BUILTIN_TINY_MODEL:
            if name in self.tokenizer_pending():
                raise TokenizerNotReady(
                    f"the server is starting: the tokenizer of {name} is still being prepared; retry shortly"
                )
            folder = self.builtin_tokenizer_folder()
            return str(folder) if (folder / "tokenizer.json").exists() else name
        return spec.model_path if Path(spec.model_path).is_dir() else name


class TokenizerNotReady(Exception):
    """get_info must wait: answered 503 with Retry-After, which the SDK retries."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@cache
def _vocab_from_folder(path: str) -> int:
    try:
        config = json.loads((Path(path) / "config.json").read_text())
        return int(config.get("vocab_size") or config["text_config"]["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(f"cannot read the vocabulary size of {path}: {exc}") from exc


@cache
def _model_type_from_folder(path: str) -> str | None:
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None  # the worker reports an unreadable folder when it loads the model
    model_type = config.get("model_type") if isinstance(config, dict) else None
    return model_type if isinstance(model_type, str) else None
