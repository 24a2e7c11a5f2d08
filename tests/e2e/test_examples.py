"""The learning examples, run as users run them (a subprocess with the SDK of this interpreter)
against one live embedded server: chat SFT must learn its canned answers, GRPO must raise its
reward. Seeds are fixed; the thresholds sit well inside what several seeds reached."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import tinker
from tinker import types

from tests.e2e.server import REPO, LiveServer, embedded

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = embedded(tmp_path_factory.mktemp("examples")).start()
    try:
        # One sample from the base model makes the worker load it, and with it save the tokenizer
        # folder that get_info() then reports (examples/sft_chat.py explains why that matters).
        client = tinker.ServiceClient(base_url=live.url, api_key="tml-local-dev-key")
        made: Any = client.create_sampling_client(base_model="tuft/tiny-qwen3")
        sampler = made.result() if hasattr(made, "result") else made  # 0.38: a future; 0.25: the client
        sampler.sample(types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=1)).result(timeout=120)
        yield live
    finally:
        live.stop()


def run_example(server: LiveServer, name: str, *args: str) -> dict[str, Any]:
    env = {**os.environ, "TINKER_BASE_URL": server.url, "TINKER_TELEMETRY": "0"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / name), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr + server.logs()
    result_lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(result_lines) == 1, proc.stdout
    result: dict[str, Any] = json.loads(result_lines[0][len("RESULT ") :])
    result["stdout"] = proc.stdout
    return result


def test_sft_chat_learns_the_canned_answers(server: LiveServer) -> None:
    result = run_example(server, "sft_chat.py", "--steps", "30", "--seed", "0")
    # The SDK's tokenizer_id mechanism served the tokenizer: no Hub, no local rebuild.
    assert result["tokenizer"].startswith("server folder "), result["tokenizer"]
    epochs = result["epochs"]
    assert [e["epoch"] for e in epochs] == list(range(len(epochs))) and len(epochs) == 11
    first, last = epochs[0], epochs[-1]
    # Untrained: about ln(vocab) nats per answer token or worse.
    assert first["train_nll"] > 8 and first["heldout_nll"] > 8, first
    assert last["train_nll"] < 0.1 * first["train_nll"], epochs
    # Held-out wordings share their answers with training ones, so their NLL falls too.
    assert last["heldout_nll"] < 0.25 * first["heldout_nll"], epochs
    assert f"epoch={last['epoch']} train_nll={last['train_nll']:.4f}" in result["stdout"]

    samples = result["samples"]
    # One training question per canned answer, answered greedily.
    assert len(samples) == 8 and len({s["expected"] for s in samples}) == 8
    assert any(s["match"] for s in samples), samples
    assert all(s["match"] == (s["got"] == s["expected"]) for s in samples)


def test_rl_grpo_raises_the_reward(server: LiveServer) -> None:
    result = run_example(server, "rl_grpo.py", "--iterations", "12", "--seed", "0")
    rewards = result["mean_reward"]
    assert len(rewards) == 12 and all(0.0 <= r <= 1.0 for r in rewards)
    # A random policy answers with a common token about a quarter of the time.
    first, last = statistics.fmean(rewards[:3]), statistics.fmean(rewards[-3:])
    assert first < 0.5, rewards
    assert last > 0.9 and last - first > 0.4, rewards
    assert "iter=11 mean_reward=" in result["stdout"]
