"""A sample that kills its worker every time (F5 with K attempts, for sampling).

Embedded `tuft launch`: the first sample ends its worker on each of its max_op_attempts=2 claims
(the launch supervisor restarts the worker each time; the sample goes back to the queue when its
claim lapses, or when the worker releases it on its way out after a sticky device error). The
third pick-up fails it with category server instead of running it, so the deployment goes on:
the same client's next sample, and another tenant's training ops and sample, succeed on the
restarted worker, which nothing kills again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import tinker
from tinker import types

from tests.chaos.driver import BASE_MODEL, RESULT_TIMEOUT
from tests.chaos.harness import API_KEY, Cluster
from tests.e2e.test_training import memorise_datum, resolved

pytestmark = [pytest.mark.chaos, pytest.mark.e2e]

OTHER_KEY = "tml-chaos-tenant-b"
PROMPT = types.ModelInput.from_ints([1, 2, 3, 4])
PARAMS = types.SamplingParams(max_tokens=4, temperature=0.0)


def _sample(sampler: Any) -> Any:
    return sampler.sample(prompt=PROMPT, num_samples=1, sampling_params=PARAMS).result(timeout=RESULT_TIMEOUT)


@pytest.mark.parametrize(
    ("action", "exit_code"),
    [
        # Killed (a segfault, an OOM kill): the claim lapses and the sweeper requeues the sample.
        ("exit", 137),
        # A sticky device error: the worker exits on its own and releases the sample on the way out.
        ("device_fatal", 3),
    ],
)
def test_a_sample_that_kills_its_worker_every_time_fails_and_the_deployment_goes_on(
    chaos: Callable[..., Cluster], action: str, exit_code: int
) -> None:
    point = f"before_engine_sample:{action}:0:2"  # the first two samples run end their worker
    c = chaos("embedded", max_op_attempts=2, api_keys=[{"key": OTHER_KEY, "tenant": "tenant-b"}]).start(fault=point)
    first_worker = c.worker_pid()
    client = tinker.ServiceClient(base_url=c.url, api_key=API_KEY)
    sampler = resolved(client.create_sampling_client(base_model=BASE_MODEL))

    started = time.monotonic()
    with pytest.raises(tinker.RequestFailedError) as failed:
        _sample(sampler)
    seconds = time.monotonic() - started
    assert failed.value.category == "server", failed.value.category
    assert "attempted 2 times and each attempt ended its worker" in str(failed.value), str(failed.value)
    # Two claims, two dead workers (restarted by launch), then failed without a third run.
    assert c.log_count(r"FAULT before_engine_sample: ") == 2
    assert c.log_count(rf"worker exited with code {exit_code};") == 2
    assert c.log_count(r"ALERT poison sample") == 1
    survivor = c.worker_pid()
    assert survivor != first_worker

    # The deployment goes on: the same client samples again; another tenant trains and samples.
    again = _sample(sampler)
    assert len(again.sequences) == 1 and 1 <= len(again.sequences[0].tokens) <= 4
    other = tinker.ServiceClient(base_url=c.url, api_key=OTHER_KEY)
    training = resolved(other.create_lora_training_client(base_model=BASE_MODEL, rank=4, seed=7))
    fwd = training.forward_backward([memorise_datum()], "cross_entropy").result(timeout=RESULT_TIMEOUT)
    step = training.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=RESULT_TIMEOUT)
    assert fwd.loss_fn_outputs and step is not None
    theirs = _sample(resolved(training.save_weights_and_get_sampling_client()))
    assert len(theirs.sequences) == 1 and 1 <= len(theirs.sequences[0].tokens) <= 4

    # Nothing else died, and the queue says what happened to each sample.
    assert c.log_count(r"worker exited with code") == 2 and c.worker_pid() == survivor
    rows = c.sql("select tenant, status, error_category, attempt from ops where kind = 'sample' order by created_at")
    assert [tuple(r) for r in rows] == [
        ("default", "failed", "server", 2),
        ("default", "succeeded", None, 1),
        ("tenant-b", "succeeded", None, 1),
    ]
    print(f"{action}: poison sample failed after {seconds:.1f}s (2 worker deaths and restarts)")
