"""What get_info tells clients to load as their tokenizer (ModelCatalog.tokenizer_id)."""

from __future__ import annotations

from pathlib import Path

from app.api.catalog import ModelCatalog
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
    assert catalog.tokenizer_id(BUILTIN_TINY_MODEL) == BUILTIN_TINY_MODEL  # no worker has built it yet
    cached = tmp_path / "data" / "cache" / "tokenizers" / "tiny-qwen3"
    cached.mkdir(parents=True)
    (cached / "tokenizer.json").write_text("{}")
    assert catalog.tokenizer_id(BUILTIN_TINY_MODEL) == str(cached)
