"""A worker paused in the middle of a save (issue 7 item 1), in the deployment shape: `tuft api` +
two `tuft worker` on PostgreSQL + Redis.

Worker A stops itself (SIGSTOP, the `checkpoint_sealed` fault point) once its checkpoint folder is
sealed (files and manifest written, fsynced) and before it is renamed into place. Its lease
expires, worker B takes the run over, saves again, registers the checkpoint, and the client gets
its success. Then A continues. Its commit must be fenced off, and it must not touch B's folder:
the listed checkpoint's files are bitwise the reference run's, and the SDK can load them
(`create_training_client_from_state`). Before the fix A renamed B's folder away and deleted it.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

import pytest
import tinker

from tests.chaos.checker import Reference, check
from tests.chaos.conftest import ITERATIONS
from tests.chaos.driver import CHECKPOINT_NAME, Driver
from tests.chaos.harness import API_KEY, Cluster, proc_state, wait_for
from tests.e2e.test_training import memorise_datum, resolved

pytestmark = [pytest.mark.chaos, pytest.mark.e2e, pytest.mark.postgres, pytest.mark.redis]


def test_a_worker_paused_mid_save_leaves_the_registered_checkpoint_alone(
    chaos: Callable[..., Cluster], references: Callable[[str], Reference]
) -> None:
    reference = references("distributed")
    point = "checkpoint_sealed:stop"  # the script's one save: save_state, the last op
    # Only the future zombie at first, so that it owns the run; the rescuer joins afterwards.
    c = chaos("distributed").start(worker_faults=[point])
    zombie = c.workers["worker0"]
    driver = Driver(c.url, ITERATIONS)
    driver.start()
    run_id = driver.wait_created()
    c.start_worker("worker1", wait=False)  # the rescuer
    wait_for(lambda: proc_state(zombie.pid) == "T", 180, "the zombie to stop with its checkpoint sealed", 0.05, c.logs)
    last = driver.expected_ops
    assert c.applied_seq(run_id) == last - 1
    stopped_epoch = c.run_row(run_id).lease_epoch

    # The lease expires (TTL 2 s); the rescuer takes the run over and saves again.
    c.wait_applied(run_id, last, timeout=180)
    assert c.run_row(run_id).lease_epoch > stopped_epoch
    ((registered,),) = c.sql("select storage_path from checkpoints where run_id = :r", r=run_id)
    folder = c.data_dir / "checkpoints" / registered

    # The zombie continues: publishes its own folder, is fenced off, removes only that folder.
    c.kill(zombie.pid, signal.SIGCONT)
    fenced = "FENCED commit rejected"
    wait_for(lambda: fenced in zombie.log.read_text(), 60, "the zombie's commit to be rejected", 0.05, c.logs)

    def settled() -> bool:
        return not folder.is_dir() or [p.name for p in folder.parent.iterdir()] == [folder.name]

    wait_for(settled, 60, "the zombie to remove its own unregistered folder", 0.05, c.logs)
    # Before the fix the zombie renamed the registered folder away and deleted it.
    assert folder.is_dir(), f"the registered checkpoint's folder {registered} was deleted\n{c.logs()}"
    driver.finish()
    save = c.sql("select attempt, claimed_epoch from ops where run_id = :r and seq = :s", r=run_id, s=last)[0]
    # 2 attempts, or more if a loaded machine delayed the rescuer's own renewals past the 2 s TTL.
    assert save.attempt >= 2 and save.claimed_epoch > stopped_epoch
    assert c.sql("select storage_path from checkpoints where run_id = :r", r=run_id) == [(registered,)]

    # The checkpoint the client was told about is whole: bitwise the reference's weights...
    result = check(c, driver, reference, "worker paused mid-save (sealed, not renamed), run taken over", faults=point)
    assert result.zombie_commits_rejected >= 1 and result.bitwise_equal
    # ...and the SDK can train from it: the restored run's first loss is the one the original run
    # would have had next (the rescuer is still serving).
    client = tinker.ServiceClient(base_url=c.url, api_key=API_KEY)
    path = f"tinker://{run_id}/weights/{CHECKPOINT_NAME}"
    restored = resolved(client.create_training_client_from_state_with_optimizer(path))
    datum = memorise_datum()
    loss = restored.forward([datum], "cross_entropy").result(timeout=120).metrics["loss:sum"]
    assert loss < reference.losses[0]  # trained weights, not a fresh adapter
