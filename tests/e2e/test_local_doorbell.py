"""`tuft launch` without Redis: the API wakes its worker directly (app/localbell.py), so a client
that waits for each result is not served on the worker's poll tick."""

from __future__ import annotations

from pathlib import Path

import pytest
import tinker
from tinker import types

from tests.e2e.server import embedded
from tests.e2e.test_training import resolved

pytestmark = [pytest.mark.e2e]


def test_ops_run_when_submitted_even_with_the_poll_tick_off(tmp_path: Path) -> None:
    # A poll tick of 10 minutes: only the doorbell can get these ops run within the test.
    config = tmp_path / "tuft.yaml"
    config.write_text("worker_poll_seconds: 600\n")
    server = embedded(tmp_path)
    server.args += ["--config", str(config)]
    server.start()
    try:
        client = tinker.ServiceClient(base_url=server.url, api_key="tml-local-dev-key")
        training = resolved(client.create_lora_training_client(base_model="tuft/tiny-qwen3", rank=8, seed=0))
        datum = types.Datum(
            model_input=types.ModelInput.from_ints([101, 57, 12, 7]),
            loss_fn_inputs={"target_tokens": [57, 12, 7, 102]},
        )
        steps = []
        for _ in range(3):
            out = training.forward_backward([datum], "cross_entropy").result(timeout=60)
            step = training.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=60)
            steps.append((out.metrics["loss:sum"], step.metrics["optimizer_step"]))
        assert [s for _, s in steps] == [1.0, 2.0, 3.0]
        assert steps[2][0] < steps[0][0]  # it trained: the loss went down
    finally:
        server.stop()
