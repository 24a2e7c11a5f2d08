"""What get_info tells clients to load as their tokenizer (ModelCatalog.tokenizer_id)."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.api.catalog import ModelCatalog, TokenizerNotReady
from app.config import load_settings
from app.domain.models import BUILTIN_TINY_MODEL


def _catalog(tmp_path: Path, models: list[dict[str, object]]) -> ModelCatalog:
    return ModelCatalog(load_settings(data_dir=tmp_path / "data", supported_models=models))


def test_configured_tokenizer_id_wins(tmp_path: Path) -> None:
    folder = tmp_path / "qwen"
    folder.mkdir()
    catalog = _catalog(
        tmp_path,
        [
            {
                "model_name": "Qwen/Qwen3-8B",
                "model_path": str(folder),
                "vocab_size": 10,
                "tokenizer_id": "Qwen/Qwen3-8B",
            },
            {"model_name": "local/seen", "model_path": str(folder), "vocab_size": 10},
            {"model_name": "Qwen/Unseen", "model_path": str(tmp_path / "elsewhere"), "vocab_size": 10},
        ],
    )
    # Set explicitly: returned as is, even though the API host sees the model folder.
    assert catalog.tokenizer_id("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"
    # Unset: the folder when the API host sees it, else the model's name.
    assert catalog.tokenizer_id("local/seen") == str(folder)
    assert catalog.tokenizer_id("Qwen/Unseen") == "Qwen/Unseen"


def test_builtin_model_points_at_its_cached_tokenizer_once_built(tmp_path: Path) -> None:
    catalog = _catalog(tmp_path, [])
    # No worker has built it yet: in the embedded mode get_info waits (503) rather than name a
    # tokenizer the client cannot load, and cache that for good (issue 7 item 10).
    assert catalog.tokenizer_pending() == [BUILTIN_TINY_MODEL]
    with pytest.raises(TokenizerNotReady, match="still being prepared"):
        catalog.tokenizer_id(BUILTIN_TINY_MODEL)
    # A deployment's API may not share the workers' data_dir: it names the model, as before.
    deployed = ModelCatalog(load_settings(data_dir=tmp_path / "data", database_url="postgresql://db/tuft"))
    assert deployed.tokenizer_pending() == []
    assert deployed.tokenizer_id(BUILTIN_TINY_MODEL) == BUILTIN_TINY_MODEL
    cached = tmp_path / "data" / "cache" / "tokenizers" / "tiny-qwen3"
    cached.mkdir(parents=True)
    (cached / "tokenizer.json").write_text("{}")
    assert catalog.tokenizer_id(BUILTIN_TINY_MODEL) == str(cached)
