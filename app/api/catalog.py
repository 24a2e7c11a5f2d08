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
from app.domain.models import BUILTIN_TINY_MODEL, ModelSpec


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

    def tokenizer_id(self, name: str) -> str:
        """What the SDK's get_tokenizer() loads with AutoTokenizer.from_pretrained: a local folder
        when one exists (no hub access here), else the model name; `tokenizer_id` in the model's
        config overrides both, for clients on other machines."""
        spec = self.get(name)
        if spec.tokenizer_id:
            return spec.tokenizer_id
        if name == BUILTIN_TINY_MODEL:
            folder = self.settings.resolved_data_dir() / "cache" / "tokenizers" / "tiny-qwen3"
            return str(folder) if (folder / "tokenizer.json").exists() else name
        return spec.model_path if Path(spec.model_path).is_dir() else name


@cache
def _vocab_from_folder(path: str) -> int:
    try:
        config = json.loads((Path(path) / "config.json").read_text())
        return int(config.get("vocab_size") or config["text_config"]["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(f"cannot read the vocabulary size of {path}: {exc}") from exc
