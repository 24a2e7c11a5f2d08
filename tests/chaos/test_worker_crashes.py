"""A worker killed at a named point of an op or of a snapshot (F5-F9), and a worker killed from
outside at a random moment (F6): the run is rebuilt from snapshot + replay by a restarted worker
(embedded: `tuft launch`'s supervisor) or by another worker after the lease TTL (distributed), and
ends bitwise equal to the fault-free run. Also measures the recovery time."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable

import pytest

from tests.chaos.checker import Reference, check
from tests.chaos.conftest import ITERATIONS
from tests.chaos.driver import Driver
from tests.chaos.harness import Cluster, alive, children, cmdline, wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.e2e]


def fired(c: Cluster, spec: str) -> None:
    """Every crash point of `spec` fired exactly once (so the scenario exercised what it says)."""
    for item in spec.split(","):
        name = item.split(":")[0]
        assert c.log_count(rf"FAULT {name}: ") == 1, f"crash point {name} fired {c.log_count(name)} times"


EMBEDDED_POINTS = [
    # forward_backward computed, result not committed (the 4th one, seq 7).
    "after_engine_forward_backward:exit:3",
    # optim_step applied to the in-memory state, not committed (the 5th one, seq 10); then
    # save_state written to disk, not committed (re-executed: the same checkpoint is rewritten).
    "after_engine_optim_step:exit:4,after_engine_save_weights:exit:0",
    # The second snapshot's files are written and fsynced but not renamed into place.
    "snapshot_before_rename:exit:1",
    # optim_step computed, not committed (seq 10); the restarted worker, rebuilding the run from
    # the last snapshot, dies again on the first op it replays; the next one rebuilds once more.
    "after_engine_optim_step:exit:4,replay_op:exit:0",
]


@pytest.mark.parametrize("point", EMBEDDED_POINTS)
def test_embedded_worker_crash_point(
    point: str, chaos: Callable[..., Cluster], references: Callable[[str], Reference]
) -> None:
    reference = references("embedded")
    c = chaos("embedded").start(fault=point)
    driver = Driver(c.url, ITERATIONS)
    driver.start()
    driver.finish()
    fired(c, point)
    crashes = point.count(",") + 1
    assert c.log_count(r"worker exited with code 137; restarting") == crashes
    names = " + ".join(item.split(":")[0] for item in point.split(","))
    check(c, driver, reference, f"worker crash at {names}", faults=point)


DISTRIBUTED_GAUNTLETS = {
    # Op crash points: an optim_step claimed but not run, and a crash right after a commit (the
    # result is durable; the next owner must not run the op again).
    "ops": "before_engine_optim_step:exit:1,after_commit_optim_step:exit:4",
    # Snapshot crash points: killed before the rename (files left under a temporary name), then
    # after the rename but before registration (an orphan folder), then a full disk on the next
    # write (an alert; the run goes on with the previous snapshot).
    "snapshots": "snapshot_before_rename:exit:0,snapshot_before_register:exit:0,snapshot_write:enospc:2",
}


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.parametrize("gauntlet", sorted(DISTRIBUTED_GAUNTLETS))
def test_distributed_worker_crash_points(
    gauntlet: str, chaos: Callable[..., Cluster], references: Callable[[str], Reference]
) -> None:
    """Two workers share the crash points (and their hit counters): whichever runs the op dies,
    the other takes the run over after the lease TTL, and the dead one is restarted."""
    reference = references("distributed")
    spec = DISTRIBUTED_GAUNTLETS[gauntlet]
    c = chaos("distributed").start(fault=spec, workers=2)
    c.supervise()
    driver = Driver(c.url, ITERATIONS)
    driver.start()
    driver.finish()
    fired(c, spec)
    if "enospc" in spec:
        assert c.log_count(r"ALERT snapshot") >= 1
    if gauntlet == "snapshots":
        # The admin CLI agrees: every registered snapshot matches its manifest.
        verified = c.cli("snapshots", "verify", driver.model_id or "")
        assert verified and all(s["ok"] for s in verified), verified
    check(c, driver, reference, f"distributed worker crashes ({gauntlet})", faults=spec)


# ---- external kill -9 at a random moment, with recovery time -----------------------------------


def _measure_recovery(
    c: Cluster, run_id: str, kill: Callable[[], int], after_kill: Callable[[], None] = lambda: None
) -> dict[str, float]:
    """kill -9 the run's worker; seconds until the run commits its next op, with milestones:
    respawned (embedded: the supervisor started a new worker), lease_expired (the epoch moved:
    the sweeper or another worker took the expired lease back), registered (the new worker
    finished importing and registered), lease_taken (a live worker holds the run), rebuilt (state
    restored from snapshot + replay, from the worker's log), next_commit (the run serves again)."""
    epoch = c.run_row(run_id).lease_epoch
    t0 = time.time()
    old_pid = kill()
    # A commit already on the wire when the signal landed may still arrive: read after it.
    time.sleep(0.2)
    before = c.applied_seq(run_id)
    after_kill()  # e.g. submit the op held back, so there is always one left for the survivor
    marks: dict[str, float] = {}

    def mark(name: str, now: float) -> None:
        marks.setdefault(name, now - t0)

    while True:
        now = time.time()
        if c.mode == "embedded":
            assert c.api is not None
            if any(p != old_pid and "-m workers" in cmdline(p) for p in children(c.api.pid)):
                mark("respawned", now)
        (row,) = c.sql(
            "select r.applied_seq, r.lease_epoch, w.pid from runs r "
            "left join workers w on w.worker_id = r.owner_worker where r.run_id = :r",
            r=run_id,
        )
        if row.lease_epoch > epoch:
            mark("lease_expired", now)
        if row.pid is not None and row.pid != old_pid:
            mark("lease_taken", now)
        if row.applied_seq > before:
            mark("next_commit", now)
            break
        if now - t0 >= 120:
            c.dump_stacks()
            raise AssertionError(f"the run did not recover within 120s; milestones {marks}\n{c.logs()}")
        time.sleep(0.02)
    if c.mode == "embedded":
        marks["registered"] = float(c.sql("select max(started_at) from workers")[0][0]) - t0
    rebuilt = c.log_times(r"rebuilt \S+ to seq")
    if rebuilt and rebuilt[-1] > t0:
        marks["rebuilt"] = rebuilt[-1] - t0
    return {k: round(v, 2) for k, v in sorted(marks.items(), key=lambda kv: kv[1])}


def test_embedded_external_sigkill_recovery_time(
    chaos: Callable[..., Cluster], references: Callable[[str], Reference]
) -> None:
    """kill -9 of the worker from outside (no crash point): the supervisor restarts it after a 1 s
    backoff, the new process imports torch and builds the model, rebuilds the run from the
    snapshot at seq 4 plus replay, and runs the op that was in flight again."""
    reference = references("embedded")
    c = chaos("embedded").start()
    driver = Driver(c.url, ITERATIONS, hold_last=True)
    driver.start()
    run_id = driver.wait_created()
    c.wait_applied(run_id, 6)
    marks = _measure_recovery(c, run_id, lambda: c.kill_worker(), driver.release)
    driver.finish()
    row = check(
        c,
        driver,
        reference,
        "external kill -9 of the worker",
        faults="SIGKILL at seq 6",
        recovery_seconds=[marks["next_commit"]],
    )
    print(f"\nembedded recovery milestones (s after kill -9): {marks}; row {row}")
    assert marks["next_commit"] < 60


@pytest.mark.postgres
@pytest.mark.redis
def test_distributed_external_sigkill_at_a_random_moment_recovery_time(
    chaos: Callable[..., Cluster], references: Callable[[str], Reference]
) -> None:
    """Two workers; the run's owner is killed (SIGKILL) at a random moment of the op stream; the
    other worker takes the run over once the lease expires (TTL 2 s), rebuilds it from the latest
    snapshot plus replay, and runs the op that was in flight again."""
    reference = references("distributed")
    seed = int(os.environ.get("TUFT_CHAOS_SEED", str(time.time_ns() % 2**31)))
    rng = random.Random(seed)
    print(f"\nrandom kill seed: {seed} (rerun with TUFT_CHAOS_SEED={seed})")
    c = chaos("distributed").start(workers=2)
    # The final op is held back until after the kill: on a fast or lightly loaded machine the whole
    # stream can finish between the random point and the kill, which would leave nothing to recover.
    driver = Driver(c.url, ITERATIONS, hold_last=True)
    driver.start()
    run_id = driver.wait_created()
    n = driver.expected_ops
    c.wait_applied(run_id, rng.randrange(2, n - 4))
    time.sleep(rng.uniform(0, 0.3))  # a random moment inside the op stream, not a sync point
    owner = wait_for(lambda: c.owner_pid(run_id), 30, "the run to have an owner")
    killed_at = c.applied_seq(run_id)

    def kill() -> int:
        c.kill(owner)
        wait_for(lambda: not alive(owner), 30, "the owner to die")
        return owner

    marks = _measure_recovery(c, run_id, kill, driver.release)
    driver.finish()
    row = check(
        c,
        driver,
        reference,
        "external kill -9 of the run's owner at a random moment",
        faults=f"SIGKILL after seq {killed_at} (seed {seed})",
        recovery_seconds=[marks["next_commit"]],
    )
    print(f"distributed recovery milestones (s after kill -9): {marks}; row {row}")
    assert marks["next_commit"] < 60


def test_snapshot_files_left_by_a_crash_are_garbage_collected(chaos: Callable[..., Cluster]) -> None:
    """F9: the worker dies after renaming its first snapshot into place, before registering it.
    The run goes on (checked elsewhere); the orphan folder must not stay on disk forever."""
    point = "snapshot_before_register:exit:0"
    c = chaos("embedded").start(fault=point)
    driver = Driver(c.url, ITERATIONS)
    driver.start()
    driver.finish()
    fired(c, point)
    assert driver.model_id is not None
    registered = {r[0] for r in c.sql("select storage_path from snapshots where run_id = :r", r=driver.model_id)}
    root = c.data_dir / "snapshots"
    on_disk = {str(p.relative_to(root)) for p in root.glob("*/*")}
    assert on_disk == registered, f"unregistered snapshot folders left on disk: {sorted(on_disk - registered)}"
