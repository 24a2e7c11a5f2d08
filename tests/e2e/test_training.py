"""Real learning and real restarts, driven by the tinker SDK against a live server."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import tinker
from tinker import types

from tests.e2e.server import LiveServer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPT = [101, 57, 12, 7, 102]
CONTINUATION = [1000, 2000, 3000, 4000]


def memorise_datum(prompt: list[int] = PROMPT, answer: list[int] = CONTINUATION) -> types.Datum:
    """Next-token prediction over prompt + answer, with weight on the answer's tokens only."""
    tokens = prompt + answer
    weights = [0.0] * (len(prompt) - 1) + [1.0] * len(answer)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=tokens[1:], dtype="int64", shape=[len(tokens) - 1]),
            "weights": types.TensorData(data=weights, dtype="float32", shape=[len(weights)]),
        },
    )


def client_for(server: LiveServer) -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=server.url, api_key="tml-local-dev-key")


def resolved(client_or_future: Any) -> Any:
    """0.38 returns a future of the client (using it directly is deprecated); 0.25 the client."""
    return client_or_future.result() if hasattr(client_or_future, "result") else client_or_future


def new_training(client: tinker.ServiceClient) -> tinker.TrainingClient:
    return resolved(client.create_lora_training_client(base_model="tuft/tiny-qwen3", rank=8, seed=0))


def greedy(sampler: tinker.SamplingClient, n: int = len(CONTINUATION)) -> list[int]:
    out = sampler.sample(
        prompt=types.ModelInput.from_ints(PROMPT),
        num_samples=1,
        sampling_params=types.SamplingParams(max_tokens=n, temperature=0.0),
    ).result(timeout=60)
    return list(out.sequences[0].tokens)


def test_learns_and_samples_memorised_sequence(live_server: LiveServer) -> None:
    client = client_for(live_server)
    training = new_training(client)
    datum = memorise_datum()
    losses = []
    for _ in range(30):
        fb = training.forward_backward([datum], "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=60)
        losses.append(fb.result(timeout=60).metrics["loss:sum"])
    assert losses[-1] < 0.02 * losses[0] and losses[-1] < 1.0, losses
    assert losses[5] < losses[0], losses
    # forward() computes the same loss without touching the weights.
    fwd1 = training.forward([datum], "cross_entropy").result(timeout=60)
    fwd2 = training.forward([datum], "cross_entropy").result(timeout=60)
    assert fwd1.metrics["loss:sum"] == fwd2.metrics["loss:sum"] < losses[0]
    logprobs = fwd1.loss_fn_outputs[0]["logprobs"].tolist()
    assert len(logprobs) == len(PROMPT) + len(CONTINUATION) - 1
    assert fwd1.metrics["loss:sum"] == pytest.approx(-sum(logprobs[len(PROMPT) - 1 :]), rel=1e-4)

    sampler = resolved(training.save_weights_and_get_sampling_client())
    assert greedy(sampler) == CONTINUATION
    named = training.save_weights_for_sampler("memorised").result(timeout=60)
    assert greedy(resolved(client.create_sampling_client(model_path=named.path))) == CONTINUATION
    # The base model alone has not learnt it.
    assert greedy(resolved(client.create_sampling_client(base_model="tuft/tiny-qwen3"))) != CONTINUATION


def _train_some(training: tinker.TrainingClient, steps: int = 12) -> None:
    datum = memorise_datum()
    for _ in range(steps):
        training.forward_backward([datum], "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=1e-2))
    training.forward([datum], "cross_entropy").result(timeout=120)


def test_sampler_weights_survive_a_restart(tmp_path: Path, embedded_server: LiveServer) -> None:
    client = client_for(embedded_server)
    training = new_training(client)
    _train_some(training)
    saved = training.save_weights_for_sampler("before-restart").result(timeout=60)
    state = training.save_state("state-before-restart").result(timeout=60)
    expected = greedy(resolved(client.create_sampling_client(model_path=saved.path)))

    embedded_server.stop()
    embedded_server.start()

    client2 = client_for(embedded_server)
    assert greedy(resolved(client2.create_sampling_client(model_path=saved.path))) == expected
    rest = client2.create_rest_client()
    listed = rest.list_checkpoints(training.model_id).result(timeout=30)
    assert {c.tinker_path for c in listed.checkpoints} == {saved.path, state.path}


def _wait_for_op_row(db_file: Path, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sqlite3.connect(db_file) as conn:
            if (
                conn.execute("select count(*) from ops where run_id is not null and seq is not null").fetchone()[0]
                >= count
            ):
                return
        time.sleep(0.05)
    raise AssertionError("op never reached the database")


def test_future_survives_a_restart_between_submit_and_retrieve(embedded_server: LiveServer) -> None:
    client = client_for(embedded_server)
    training = new_training(client)
    datum = memorise_datum()
    reference = training.forward([datum], "cross_entropy").result(timeout=60)

    embedded_server.stop()
    # The server is down: the submission is retried by the SDK until the server is back.
    pending = training.forward_backward([datum], "cross_entropy")
    embedded_server.start()
    _wait_for_op_row(embedded_server.data_dir / "tuft.db", 2)
    embedded_server.stop()  # the op is durable but may not have run yet
    embedded_server.start()
    result = pending.result(timeout=120)
    assert result.metrics["loss:sum"] == pytest.approx(reference.metrics["loss:sum"], rel=1e-6)
    after = training.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=120)
    assert after.metrics["optimizer_step"] == 1.0
