"""kill -9 of the API process (F1-F4): once while the SDK is still submitting the pipelined ops
(some committed, some in flight, some not sent), once while it polls the futures. The SDK retries
its submissions (same seq_id, so the same op) and its polls through the outage; nothing the
server acknowledged is lost and the run ends bitwise equal to the fault-free one.

Embedded, the API process is `tuft launch` (API + sweeper + supervisor): killing it also ends its
worker (the worker asks the kernel for SIGTERM when its parent dies, so no orphan keeps a GPU), and
the restarted launch starts a new worker, which rebuilds the run from the database. Distributed,
workers are separate processes and keep working while the API is down."""

from __future__ import annotations

import signal
from collections.abc import Callable

import pytest

from tests.chaos.checker import Reference, check
from tests.chaos.conftest import ITERATIONS, MODES
from tests.chaos.driver import Driver
from tests.chaos.harness import Cluster, alive, wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.e2e]


@pytest.mark.parametrize("mode", MODES)
def test_api_kill9_during_submission_and_polling(
    mode: str, chaos: Callable[..., Cluster], references: Callable[[str], Reference]
) -> None:
    reference = references(mode)
    c = chaos(mode).start()
    driver = Driver(c.url, ITERATIONS)
    driver.start()
    run_id = driver.wait_created()
    n = driver.expected_ops

    # 1. While the SDK is still submitting: a couple of ops are durable, the rest are not.
    wait_for(lambda: c.op_count(run_id) >= 2, 60, "the first submissions", interval=0.002)
    c.kill_api()
    durable_at_first_kill = c.op_count(run_id)
    c.start_api()

    # 2. While the client polls: every op is durable, not all have run.
    wait_for(lambda: c.op_count(run_id) == n, 120, "every submission to be durable", interval=0.01)
    c.kill_api()
    applied_at_second_kill = c.applied_seq(run_id)
    # Separate workers do not need the API: the run makes progress while it is down.
    if mode == "distributed" and applied_at_second_kill < n:
        c.wait_applied(run_id, applied_at_second_kill + 1)
    c.start_api()

    driver.finish()
    check(
        c,
        driver,
        reference,
        "kill -9 of the API while submitting, then while polling",
        faults=f"2 x SIGKILL API ({durable_at_first_kill}/{n} ops durable at the 1st, "
        f"{applied_at_second_kill}/{n} applied at the 2nd)",
    )
    # The scenario exercised what it claims: submissions were in flight at the first kill.
    assert durable_at_first_kill < n, "every op was already durable at the first kill"


def test_sigterm_to_launch_stops_its_worker(chaos: Callable[..., Cluster]) -> None:
    c = chaos("embedded").start()
    worker = c.worker_pid()
    assert c.api is not None
    c.api.popen.send_signal(signal.SIGTERM)
    c.api.popen.wait(timeout=60)
    # The supervisor's graceful stop: SIGTERM to the worker, which releases its runs and exits.
    wait_for(lambda: not alive(worker), 15, "launch's worker to stop with it")
