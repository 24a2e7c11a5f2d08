"""The real SDK against `tuft launch`: a base model whose architecture LoRA cannot cover fails
create_lora_training_client at once with the server's reason, instead of leaving the client
waiting on a run that never trains."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.e2e.server import embedded


@pytest.mark.e2e
def test_sdk_gets_the_refusal_of_an_uncoverable_architecture(tmp_path: Path) -> None:
    import tinker

    folder = tmp_path / "tiny-mamba"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mamba", "vocab_size": 512}))
    config = tmp_path / "tuft.yaml"
    config.write_text(f"supported_models:\n  - model_name: tiny-mamba\n    model_path: {folder}\n")
    server = embedded(tmp_path)
    server.args += ["--config", str(config)]
    server.start()
    try:
        client = tinker.ServiceClient(base_url=server.url, api_key="tml-local-dev-key")
        started = time.monotonic()
        with pytest.raises(tinker.BadRequestError) as caught:
            made = client.create_lora_training_client(base_model="tiny-mamba", rank=8)
            if hasattr(made, "result"):  # 0.38 returns a future
                made.result()
        assert time.monotonic() - started < 30
        assert "train_attn: the model has no attention layers LoRA can wrap" in str(caught.value)
    finally:
        server.stop()
