"""create_model on an architecture LoRA cannot cover: HTTP 400 with the reason, before any worker
loads the model (app/domain/architectures.py). Only config.json is read, so a folder with nothing
else stands in for the model here."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.api.helpers import Api, assert_error, make_settings, running_app


@pytest.fixture(scope="module")
def api_archs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    root = tmp_path_factory.mktemp("archs-api")
    models = []
    for name, model_type in [("tiny-mamba", "mamba"), ("tiny-llama", "llama")]:
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps({"model_type": model_type, "vocab_size": 512}))
        models.append({"model_name": name, "model_path": str(root / name)})
    with running_app(make_settings(root / "data", None, supported_models=models)) as app:
        yield app


def _create(api: Api, base_model: str, **lora: bool) -> Any:
    body = {
        "session_id": api.session(),
        "model_seq_id": 0,
        "base_model": base_model,
        "lora_config": {"rank": 8, "train_unembed": True, "train_mlp": True, "train_attn": True, **lora},
        "type": "create_model",
    }
    return api.post("/api/v1/create_model", body)


def test_uncoverable_architecture_is_refused_with_the_reason(api_archs: Api) -> None:
    err = assert_error(_create(api_archs, "tiny-mamba"), 400, error="invalid_input")
    assert err["category"] == "user"
    assert err["message"] == (
        "tiny-mamba (mamba) cannot be trained with this LoRA config: "
        "train_attn: the model has no attention layers LoRA can wrap; "
        "train_mlp: the model has no MLP layers LoRA can wrap. "
        "Set train_attn=False and train_mlp=False to train only what it can (train_unembed)"
    )


def test_what_the_architecture_can_cover_is_accepted(api_archs: Api) -> None:
    api_archs.accepted(_create(api_archs, "tiny-mamba", train_attn=False, train_mlp=False))
    api_archs.accepted(_create(api_archs, "tiny-llama"))
