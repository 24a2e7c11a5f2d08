"""The shared services fail (F12-F14): Redis stopped, restarted and flushed (it is only a doorbell:
workers poll the database and the sweeper rings again), and PostgreSQL restarted with
`-m immediate` while a worker holds a computed result (the worker retries the commit, never the
op; the API answers 503 meanwhile, then recovers). Each test brings the service back in `finally`."""

from __future__ import annotations

import signal
from collections.abc import Callable

import httpx
import pytest

from tests.chaos.checker import Reference, check
from tests.chaos.conftest import ITERATIONS
from tests.chaos.driver import Driver
from tests.chaos.harness import (
    API_KEY,
    Cluster,
    pg_down,
    pg_restart,
    proc_state,
    redis_down,
    redis_flush,
    redis_ping,
    wait_for,
)

pytestmark = [pytest.mark.chaos, pytest.mark.e2e, pytest.mark.postgres, pytest.mark.redis]


def test_redis_down_restarted_and_flushed(
    chaos: Callable[..., Cluster], references: Callable[[str], Reference]
) -> None:
    reference = references("distributed")
    c = chaos("distributed").start()
    driver = Driver(c.url, ITERATIONS)
    n = driver.expected_ops
    with redis_down():
        # No broker at all: the API still accepts every op (the doorbell is best effort) and
        # the worker finds them by polling the database.
        driver.start()
        run_id = driver.wait_created()
        wait_for(lambda: c.op_count(run_id) == n, 120, "every submission to be durable without Redis")
        c.wait_applied(run_id, 3)
    assert redis_ping()
    # Redis back, empty: progress goes on.
    applied = c.applied_seq(run_id)
    c.wait_applied(run_id, min(applied + 2, n))
    # Restart mid-run (data gone again), then a flush while ops run.
    with redis_down():
        applied = c.applied_seq(run_id)
        c.wait_applied(run_id, min(applied + 1, n))
    redis_flush()
    driver.finish()
    for proc in c.workers.values():
        assert proc.alive(), f"{proc.name} died when Redis went away\n{c.logs()}"
    check(c, driver, reference, "Redis stopped, restarted and flushed mid-run", faults="redis down x2 + flushall")


def _retrieve_status(c: Cluster, request_id: str) -> int:
    r = httpx.post(
        f"{c.url}/api/v1/retrieve_future",
        json={"request_id": request_id},
        headers={"X-API-Key": API_KEY},
        timeout=30,
    )
    return r.status_code


def test_postgres_restart_while_a_result_waits_for_its_commit(
    chaos: Callable[..., Cluster], references: Callable[[str], Reference]
) -> None:
    """The worker computes optim_step #3 (seq 6) and stops itself before committing; PostgreSQL
    goes down (immediate); the worker resumes and its commit fails; PostgreSQL comes back; the
    worker commits the SAME result (the op ran once: attempt 1). The lease TTL is longer than the
    outage here so that nobody takes the run over meanwhile (that case is the zombie test).
    Then a plain immediate restart while ops flow."""
    reference = references("distributed")
    point = "after_engine_optim_step:stop:2"
    c = chaos("distributed", lease_ttl_seconds=20.0).start(fault=point)
    worker = c.workers["worker0"]
    driver = Driver(c.url, ITERATIONS)
    driver.start()
    run_id = driver.wait_created()
    wait_for(lambda: proc_state(worker.pid) == "T", 120, "the worker to stop itself after computing seq 6")
    assert c.applied_seq(run_id) == 5
    probe = c.sql("select request_id from ops where run_id = :r and seq = 6", r=run_id)[0][0]
    with pg_down():
        # The API cannot read the queue: futures answer 503 (the SDK polls again), not 500.
        status = _retrieve_status(c, probe)
        c.kill(worker.pid, signal.SIGCONT)
        wait_for(lambda: c.log_count(r"commit failed \(\w+\); retrying") >= 1, 60, "the worker's commit to fail")
    c.wait_applied(run_id, 6)
    # Now a restart while ops are flowing.
    c.wait_applied(run_id, 9)
    pg_restart()
    driver.finish()
    attempts = c.sql("select attempt from ops where run_id = :r and seq = 6", r=run_id)[0][0]
    row = check(
        c, driver, reference, "PostgreSQL stopped while a result waits for its commit, then restarted", faults=point
    )
    assert status == 503, f"retrieve_future during the outage answered {status}"
    assert attempts == 1, f"seq 6 was executed {attempts} times: the commit must be retried, not the op"
    assert row.zombie_commits_rejected == 0


def test_submissions_during_a_database_outage_answer_503(chaos: Callable[..., Cluster]) -> None:
    c = chaos("distributed").start(workers=0)
    optim = {"model_id": "s-0:train:0", "seq_id": 1, "adam_params": {"learning_rate": 1e-2}, "type": "optim_step"}
    with pg_down():
        submit = httpx.post(f"{c.url}/api/v1/optim_step", json=optim, headers={"X-API-Key": API_KEY}, timeout=30)
        health = httpx.get(f"{c.url}/api/v1/healthz", timeout=30)
    assert (submit.status_code, health.status_code) == (503, 503), (submit.text, health.text)
