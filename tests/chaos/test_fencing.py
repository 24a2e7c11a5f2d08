"""Zombies and poison (F16, F5 with K attempts).

Zombie: a worker pauses (SIGSTOP, standing in for a GC pause, a partition or a slow CUDA call)
between computing a result and committing it, for longer than its lease. Another worker takes the
run over under a higher epoch and goes on. When the zombie resumes, its commit carries the old
epoch and must be REJECTED; the run ends bitwise equal to the fault-free one.

Poison: an op that kills its worker on every attempt is failed (category server) after
max_op_attempts, and the run continues (poison_policy continue).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest
import tinker

from tests.chaos.checker import FENCED, Reference, check
from tests.chaos.conftest import ITERATIONS
from tests.chaos.driver import Driver
from tests.chaos.harness import Cluster, proc_state, wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.e2e]


@pytest.mark.postgres
@pytest.mark.redis
def test_zombie_commit_after_takeover_is_rejected(
    chaos: Callable[..., Cluster], references: Callable[[str], Reference]
) -> None:
    reference = references("distributed")
    point = "after_engine_optim_step:stop:2"  # optim_step #3 = seq 6
    # Only the future zombie at first, so that it owns the run; the rescuer joins afterwards.
    c = chaos("distributed").start(worker_faults=[point])
    zombie = c.workers["worker0"]
    driver = Driver(c.url, ITERATIONS)
    driver.start()
    run_id = driver.wait_created()
    rescuer = c.start_worker("worker1", wait=False)
    wait_for(lambda: proc_state(zombie.pid) == "T", 120, "the zombie to stop between compute and commit")
    assert c.applied_seq(run_id) == 5
    stopped_epoch = c.run_row(run_id).lease_epoch

    # The lease expires (TTL 2 s), the rescuer takes the run under a new epoch, runs seq 6 again.
    c.wait_applied(run_id, 8)
    row = c.run_row(run_id)
    assert row.lease_epoch > stopped_epoch
    assert c.owner_pid(run_id) == rescuer.pid
    # What an operator sees meanwhile: the rescuer holds the run.
    listed = {w["pid"]: w for w in c.cli("workers", "list")}
    assert listed[rescuer.pid]["runs"] == 1 and listed[zombie.pid]["runs"] == 0

    # The zombie wakes up and tries to commit its seq 6 under the old epoch.
    c.kill(zombie.pid, signal.SIGCONT)
    wait_for(lambda: c.log_count(FENCED) >= 1, 60, "the zombie's commit to be rejected", 0.05, c.logs)
    driver.finish()
    seq6 = c.sql("select attempt, claimed_epoch from ops where run_id = :r and seq = 6", r=run_id)[0]
    result = check(c, driver, reference, "zombie worker commits after a takeover", faults=point)
    assert result.zombie_commits_rejected >= 1
    assert "FENCED commit rejected" in zombie.log.read_text()
    assert seq6.attempt == 2 and seq6.claimed_epoch > stopped_epoch


def test_poison_op_fails_after_max_attempts_and_the_run_goes_on(
    chaos: Callable[..., Cluster], references: Callable[[str], Reference]
) -> None:
    """optim_step #3 (seq 6) kills its worker on each of its max_op_attempts=2 attempts (the
    supervisor restarts it each time); the third pick-up fails it instead of running it."""
    reference = references("embedded")
    point = "before_engine_optim_step:exit:2:2"
    c = chaos("embedded", max_op_attempts=2).start(fault=point)
    driver = Driver(c.url, ITERATIONS)
    driver.start()
    driver.finish()
    assert c.log_count(r"FAULT before_engine_optim_step: ") == 2
    assert c.log_count(r"ALERT poison op") == 1

    # The client got a failed future for seq 6 (category server) and results for everything else.
    (seq, outcome), *others = driver.failed()
    assert (seq, others) == (6, []), driver.failed()
    assert isinstance(outcome.error, tinker.RequestFailedError), repr(outcome.error)
    assert outcome.error.category == "server", outcome.error.category
    check(c, driver, reference, "poison op (kills its worker every attempt)", faults=point, failed_seqs=frozenset({6}))
    # Later ops succeeded on top of 7 optimizer steps, not 8.
    assert [m["optimizer_step"] for m in driver.optim_metrics() if m] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]

    # The operator sees it: the run is active, the op failed with its reason.
    assert driver.model_id is not None
    shown = c.cli("runs", "show", driver.model_id)
    assert shown["status"] == "active" and shown["applied_seq"] == driver.expected_ops
    ops = {op["seq"]: op for op in c.cli("ops", "list", driver.model_id)}
    assert ops[6]["status"] == "failed" and ops[6]["error_category"] == "server" and ops[6]["attempt"] >= 2
    assert "attempted 2 times" in ops[6]["error"]
    assert all(op["status"] == "succeeded" for s, op in ops.items() if s != 6)


@pytest.mark.postgres
@pytest.mark.redis
def test_a_paused_worker_that_resumes_is_listed_live_again(chaos: Callable[..., Cluster]) -> None:
    """A deployment (PostgreSQL): the sweeper declares a paused worker dead, and the worker that
    resumes heartbeats and is listed live again. (Embedded mode kills a paused worker instead:
    see the watchdog test below.)"""
    c = chaos("distributed").start()
    worker = c.worker_pid()
    c.kill(worker, signal.SIGSTOP)
    try:
        wait_for(
            lambda: c.sql("select stopped_at from workers where pid = :p", p=worker)[0][0] is not None,
            60,
            "the sweeper to declare the paused worker dead",
        )
    finally:
        c.kill(worker, signal.SIGCONT)
    resumed = time.time()
    # It heartbeats again (every 0.3 s)...
    wait_for(
        lambda: c.sql("select heartbeat_at from workers where pid = :p", p=worker)[0][0] > resumed,
        30,
        "the resumed worker to heartbeat",
    )
    # ...so the operator's view must say it is alive.
    listed = {w["pid"]: w for w in c.cli("workers", "list")}
    assert listed[worker]["state"] == "live", listed[worker]


def test_embedded_worker_paused_inside_a_write_transaction_is_replaced(
    chaos: Callable[..., Cluster], references: Callable[[str], Reference]
) -> None:
    """Embedded mode (SQLite): the worker stops inside its heartbeat's write transaction, holding
    the database's only write lock. Nothing could commit (not its ops, not the sweeper, not the
    API) until it resumed; there is no other worker to take over. `tuft launch`'s watchdog kills it
    once its heartbeat is twice the lease TTL old (4 s here) and starts a new one, which rebuilds
    the run and goes on; the run ends bitwise equal to the fault-free one."""
    reference = references("embedded")
    point = "heartbeat_in_transaction:stop:6"  # ~2 s into the run, the run's lease held
    c = chaos("embedded").start(fault=point)
    first = c.worker_pid()
    driver = Driver(c.url, ITERATIONS, hold_last=True)
    driver.start()
    run_id = driver.wait_created()
    wait_for(lambda: proc_state(first) == "T", 120, f"the worker to stop at {point}", 0.02, c.logs)
    stopped_at = time.monotonic()
    before = c.applied_seq(run_id)
    driver.release()
    try:
        wait_for(lambda: c.applied_seq(run_id) > before, 60, "a new worker to commit the run's next op", 0.05, c.logs)
        recovery = time.monotonic() - stopped_at
    finally:
        if proc_state(first) == "T":
            c.kill(first, signal.SIGCONT)
    assert c.log_count(r"WATCHDOG worker \d+ has not heartbeat") == 1, c.logs()
    assert proc_state(first) is None or proc_state(first) == "Z", "the paused worker must have been killed"
    replacement = c.worker_pid()
    assert replacement != first
    print(f"\nRECOVERY embedded {point}: {recovery:.2f} s from SIGSTOP to the new worker's first commit")
    driver.finish()
    check(
        c,
        driver,
        reference,
        "embedded worker paused inside a write transaction",
        faults=point,
        recovery_seconds=[round(recovery, 2)],
    )
    # What the operator sees: the new worker live, the killed one dead.
    c.wait_registered(replacement)
    listed = {w["pid"]: w for w in c.cli("workers", "list")}
    assert listed[replacement]["state"] == "live", listed
