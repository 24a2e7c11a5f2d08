"""The SDK tells its user why a future waits (issue 10 item 7): with no worker running, and with the
training run paused by an operator, the SDK's own log line carries TuFT's reason; once a worker
starts or the run is resumed, the same futures return their results.

The SDK logs a try_again's queue_state_reason through its QueueStateObserver: the sampling client
at once (every version), the training client at once on 0.25 and after a 15-minute grace on 0.38
(its PAUSE_GRACE_PERIOD, set to 0 here so that the test need not wait 15 minutes: the line and its
text are the SDK's own).
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tinker
from tinker import types

from tests.conftest import REDIS_URL
from tests.e2e.server import REPO, TUFT, LiveServer, _env, distributed

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.redis]

BASE = "tuft/tiny-qwen3"
NO_WORKER = "waiting for a worker: no TuFT worker is running (start one with `tuft worker`)"


@pytest.fixture
def api_only(tmp_path: Path, pg_url: str) -> Iterator[tuple[LiveServer, list[str]]]:
    """`tuft api` with no worker (yet); a short long poll, so each try_again comes within 2 s."""
    server = distributed(tmp_path, pg_url, REDIS_URL)
    config = tmp_path / "tuft.yaml"
    config.write_text(config.read_text() + "long_poll_seconds: 2\n")
    worker_args, server.worker_args = server.worker_args, None
    assert worker_args is not None
    server.start()
    try:
        yield server, worker_args
    finally:
        server.stop()


def _wait_for_log(caplog: pytest.LogCaptureFixture, text: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in caplog.records:
            message = record.getMessage()
            if text in message and record.name.startswith("tinker"):
                return message
        time.sleep(0.2)
    raise AssertionError(f"the SDK never logged {text!r}: {[r.getMessage() for r in caplog.records][-10:]}")


def _admin(server: LiveServer, *args: str) -> None:
    common = server.args[server.args.index("--data-dir") :]
    subprocess.run([*TUFT, *args, *common], cwd=REPO, env=_env(), check=True, capture_output=True, timeout=60)


def _resolved(client_or_future: object) -> object:
    return client_or_future.result() if hasattr(client_or_future, "result") else client_or_future  # type: ignore[attr-defined]


def test_sdk_shows_no_worker_and_paused_run(
    api_only: tuple[LiveServer, list[str]], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, worker_args = api_only
    caplog.set_level(logging.WARNING, logger="tinker")
    service = tinker.ServiceClient(base_url=server.url, api_key="tml-local-dev-key")
    sampler = _resolved(service.create_sampling_client(base_model=BASE))
    assert isinstance(sampler, tinker.SamplingClient)
    pending = sampler.sample(
        prompt=types.ModelInput.from_ints([101, 57, 12]),
        num_samples=1,
        sampling_params=types.SamplingParams(max_tokens=3, temperature=0.0),
    )
    message = _wait_for_log(caplog, "Sampling is paused for sampler")
    assert message.endswith(f"Reason: {NO_WORKER}"), message

    # A worker starts: the same future now completes.
    server.procs.append(server._spawn(worker_args, "worker"))
    result = pending.result(timeout=180)
    assert len(result.sequences) == 1 and len(result.sequences[0].tokens) == 3

    # 0.38 reports a training pause only after 15 minutes; 0.25 has no grace period.
    import tinker.lib.queue_state_logger as queue_state_logger

    if hasattr(queue_state_logger, "PAUSE_GRACE_PERIOD"):
        monkeypatch.setattr(queue_state_logger, "PAUSE_GRACE_PERIOD", 0)
    training = _resolved(service.create_lora_training_client(base_model=BASE, rank=8, seed=0))
    assert isinstance(training, tinker.TrainingClient)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([101, 57, 12, 7]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=[57, 12, 7, 102], dtype="int64", shape=[4]),
            "weights": types.TensorData(data=[1.0] * 4, dtype="float32", shape=[4]),
        },
    )
    first = training.forward_backward([datum], "cross_entropy").result(timeout=120)
    model_id = training.model_id
    _admin(server, "runs", "pause", model_id)
    waiting = training.forward_backward([datum], "cross_entropy")
    message = _wait_for_log(caplog, f"Training for {model_id} is paused")
    assert message.endswith(
        f"Reason: training run {model_id} is paused (paused by an operator); it runs again after "
        f"`tuft runs resume {model_id}`."
    ), message
    _admin(server, "runs", "resume", model_id)
    again = waiting.result(timeout=120)
    # The same datum, no optimizer step in between: the same loss.
    assert again.metrics["loss:sum"] == pytest.approx(first.metrics["loss:sum"], rel=1e-5)
