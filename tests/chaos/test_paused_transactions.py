"""A worker paused INSIDE an open transaction (issue 7 item 3).

SIGSTOP (standing in for a GC pause, a frozen VM or a network partition) lands while the worker
holds row locks: in its heartbeat (the runs it owns and its workers row), in a fenced commit (the
run's row and the op's) or in a claim (the op's row). Before the session bounds of app/db/engine.py
the other worker and the sweeper queued behind those locks until the paused process resumed; now
the server ends the paused transaction after `idle_in_transaction_session_timeout` (5 s), the
waiters' lock timeouts are retried, and the other worker takes the run over and commits while the
first one is still stopped. When the paused worker resumes, its transaction is gone and its late
writes are fenced out; the run ends bitwise equal to the fault-free one.

Both workers get the same fault spec: the hit counter is shared across processes and only a
worker that holds a lease (heartbeat) or runs an op (commit, claim) reaches the point, so the
owner of the run is the one that stops, and the point fires once.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest

from tests.chaos.checker import Reference, check
from tests.chaos.conftest import ITERATIONS
from tests.chaos.driver import Driver
from tests.chaos.harness import Cluster, proc_state, wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.e2e, pytest.mark.postgres, pytest.mark.redis]

# Lease TTL 2 s in the chaos settings: the bound is TTL + 5 s = 7 s. The pause lasts far longer
# than anything asserted here, so before the fix (no commit until SIGCONT) the wait below fails.
PAUSE_SECONDS = 90.0
# Generous for a loaded 2-core machine: the survivor may first build the base model. The times
# measured are printed and written to docs/reliability.md, not asserted tightly.
RECOVERY_LIMIT = 45.0


@pytest.mark.parametrize(
    "point",
    [
        "heartbeat_in_transaction:stop:6",  # ~2 s into the run: runs + workers rows locked
        "commit_in_transaction:stop:3",  # the 4th fenced commit: the run's and the op's rows locked
        "claim_in_transaction:stop:3",  # the 4th claim: the op's row locked
    ],
)
def test_a_worker_paused_inside_a_transaction_does_not_stall_the_other(
    chaos: Callable[..., Cluster], references: Callable[[str], Reference], point: str
) -> None:
    reference = references("distributed")
    c = chaos("distributed").start(workers=2, fault=point)
    driver = Driver(c.url, ITERATIONS, hold_last=True)
    driver.start()
    run_id = driver.wait_created()
    pids = [w.pid for w in c.workers.values()]

    def paused() -> int | None:
        return next((pid for pid in pids if proc_state(pid) == "T"), None)

    wait_for(lambda: paused() is not None, 120, f"a worker to stop at {point}", 0.02, c.logs)
    stopped_at = time.monotonic()
    zombie = paused()
    assert zombie is not None
    before = c.applied_seq(run_id)
    # The save_state is submitted now, so there is work left for the survivor whatever the point.
    driver.release()
    try:
        wait_for(
            lambda: c.applied_seq(run_id) > before,
            RECOVERY_LIMIT,
            "the other worker to commit the run's next op while the first is paused",
            0.05,
            c.logs,
        )
        recovery = time.monotonic() - stopped_at
        assert proc_state(zombie) == "T", "the paused worker must still be paused: the survivor did it"
        # The server ended the paused transaction (idle_in_transaction_session_timeout): no worker
        # session is left idle inside a transaction, holding locks.
        stuck = c.sql(
            "select application_name, state, now() - state_change as idle from pg_stat_activity"
            " where datname = current_database() and state like 'idle in transaction%'"
        )
        assert not [r for r in stuck if r.idle.total_seconds() > 3], stuck
        owner = c.owner_pid(run_id)
        assert owner is None or owner != zombie
        wait_for(lambda: c.applied_seq(run_id) == driver.expected_ops, PAUSE_SECONDS, "the run to finish", 0.1)
    finally:
        c.kill(zombie, signal.SIGCONT)
    print(f"\nRECOVERY {point}: {recovery:.2f} s from SIGSTOP to the survivor's first commit")
    driver.finish()
    # The paused transaction was ended by the server, not committed late: still one application.
    check(
        c,
        driver,
        reference,
        f"worker paused inside a transaction ({point.split(':')[0]})",
        faults=point,
        recovery_seconds=[round(recovery, 2)],
    )
    # The resumed worker is alive and goes on: its next heartbeat lands.
    resumed = time.time()
    wait_for(
        lambda: c.sql("select heartbeat_at from workers where pid = :p", p=zombie)[0][0] > resumed,
        60,
        "the resumed worker to heartbeat again",
    )
