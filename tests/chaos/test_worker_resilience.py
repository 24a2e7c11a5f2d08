"""Faults that are not the op's (issue 7, items 2 and 4), in the deployment shape:

- the database goes away for 2 s just as a worker is about to run `save_state` (its connections
  killed, none accepted): the op is handed back and runs again, never failed;
- a sticky device error (DeviceFatal): the worker exits without committing, `tuft launch`'s
  supervisor (or another worker) takes over, and the run ends bitwise equal to the reference;
- an out-of-memory error after the gradients were half accumulated: freed, rebuilt, retried.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.pool import NullPool

from tests.chaos.checker import Reference, check
from tests.chaos.conftest import ITERATIONS
from tests.chaos.driver import Driver
from tests.chaos.harness import PG_ADMIN_URL, Cluster, proc_state, wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.e2e]


def database_outage(url: str, seconds: float, during: Callable[[], None]) -> None:
    """An outage of this cluster's database only (the shared server keeps running): every
    connection to it killed and none accepted for `seconds`; `during()` runs once it has begun."""
    name = make_url(url).database
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false'))
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"), {"d": name})
        during()
        time.sleep(seconds)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true'))
        admin.dispose()


@pytest.mark.postgres
@pytest.mark.redis
def test_database_outage_during_save_state_does_not_fail_it(
    chaos: Callable[..., Cluster], references: Callable[[str], Reference]
) -> None:
    reference = references("distributed")
    # The worker pauses itself right before save_state reads the database; the outage starts, the
    # worker goes on into it. A lease longer than the outage: the op must survive on this worker.
    point = "before_engine_save_weights:stop"
    c = chaos("distributed", lease_ttl_seconds=15.0).start(worker_faults=[point])
    worker = c.workers["worker0"]
    driver = Driver(c.url, ITERATIONS)
    driver.start()
    run_id = driver.wait_created()
    wait_for(lambda: proc_state(worker.pid) == "T", 180, "the worker to stop before save_state", 0.05, c.logs)
    assert c.database_url is not None
    database_outage(c.database_url, 2.0, during=lambda: c.kill(worker.pid, signal.SIGCONT))
    back = time.time()
    driver.finish()
    assert c.log_count(r"handed back after a transient error") >= 1, c.logs()
    save = c.sql("select status, attempt, finished_at from ops where run_id = :r and kind = 'save_weights'", r=run_id)
    assert [(row.status, row.attempt) for row in save] == [("succeeded", 1)]
    print(f"\nsave_state committed {save[0].finished_at - back:.1f}s after the database came back")
    check(c, driver, reference, "database outage (2 s, connections killed) during save_state", faults=point)


def test_device_fatal_ends_the_worker_and_the_restarted_one_completes_the_run(
    chaos: Callable[..., Cluster], references: Callable[[str], Reference]
) -> None:
    reference = references("embedded")
    point = "before_engine_optim_step:device_fatal:2"  # optim_step #3 (seq 6)
    c = chaos("embedded").start(fault=point)
    driver = Driver(c.url, ITERATIONS)
    driver.start()
    driver.finish()
    assert c.log_count(r"FAULT before_engine_optim_step: device_fatal") == 1
    assert c.log_count(r"worker exited with code 3; restarting") == 1
    run_id = driver.model_id or ""
    seq6 = c.sql("select status, attempt, finished_at from ops where run_id = :r and seq = 6", r=run_id)[0]
    assert (seq6.status, seq6.attempt) == ("succeeded", 2)  # the first attempt committed nothing
    fault_at = c.log_times(r"FAULT before_engine_optim_step")[0]
    print(f"\ndevice error -> op committed by the restarted worker: {seq6.finished_at - fault_at:.1f}s")
    check(c, driver, reference, "device error (DeviceFatal) in optim_step", faults=point)


@pytest.mark.postgres
@pytest.mark.redis
def test_device_fatal_under_celery_releases_the_runs_to_another_worker(
    chaos: Callable[..., Cluster], references: Callable[[str], Reference]
) -> None:
    reference = references("distributed")
    point = "before_engine_forward_backward:device_fatal:3"  # forward_backward #4 (seq 7)
    c = chaos("distributed").start(worker_faults=[point, point], workers=2)
    driver = Driver(c.url, ITERATIONS)
    driver.start()
    driver.finish()
    assert c.log_count(r"FAULT before_engine_forward_backward: device_fatal") == 1
    assert c.log_count(r"exits after a device error") == 1
    # The worker that hit it releases its runs on the way out (Celery's warm shutdown) and exits.
    exited = wait_for(lambda: [p for p in c.workers.values() if not p.alive()], 60, "the worker to exit", 0.1, c.logs)
    assert [p.popen.returncode for p in exited] == [3], c.logs()
    seq7 = c.sql("select attempt, finished_at from ops where run_id = :r and seq = 7", r=driver.model_id or "")[0]
    assert seq7.attempt == 2
    fault_at = c.log_times(r"FAULT before_engine_forward_backward")[0]
    print(f"\ndevice error -> op committed by the other worker: {seq7.finished_at - fault_at:.1f}s")
    check(c, driver, reference, "device error (DeviceFatal) under Celery, 2 workers", faults=point)


def test_out_of_memory_after_half_the_gradients_is_retried_and_ends_bitwise_equal(
    chaos: Callable[..., Cluster], references: Callable[[str], Reference]
) -> None:
    reference = references("embedded")
    # forward_backward #3 has accumulated its gradients when the error comes: a retry on the same
    # state would double them; the run must be rebuilt first.
    point = "after_engine_forward_backward:oom:2"
    c = chaos("embedded").start(fault=point)
    driver = Driver(c.url, ITERATIONS)
    driver.start()
    driver.finish()
    assert c.log_count(r"ran out of memory .* freeing memory and retrying once") == 1
    assert c.log_count(r"worker exited with code") == 0
    check(c, driver, reference, "out of memory after forward_backward's gradients, retried", faults=point)
