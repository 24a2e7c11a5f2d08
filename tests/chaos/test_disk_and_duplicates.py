"""A full snapshot disk (F18) and duplicate deliveries (F19, F20).

Disk full: snapshot_dir is a 64 KiB tmpfs, far smaller than one snapshot (~7 MB): every snapshot
write fails with ENOSPC. That is an alert, never a failed run; and when the worker then dies, the
run is rebuilt from its seed plus a replay of every mutating op.

Duplicates: the doorbell is rung hundreds of times (extra `workers.wake` Celery tasks), and
acknowledged submissions are sent again: the same body at the same seq_id is the same request,
another body is a 409.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import celery
import httpx
import pytest
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

from tests.chaos.checker import Reference, check
from tests.chaos.conftest import ITERATIONS
from tests.chaos.driver import LEARNING_RATE, Driver
from tests.chaos.harness import API_KEY, REDIS_URL, Cluster, wait_for
from tests.e2e.test_training import memorise_datum

pytestmark = [pytest.mark.chaos, pytest.mark.e2e]


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (we run as root in CI), unmounted afterwards."""
    mount = tmp_path / "tiny-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_snapshot_disk_full(
    tiny_disk: Path, chaos: Callable[..., Cluster], references: Callable[[str], Reference]
) -> None:
    reference = references("embedded")
    point = "after_engine_forward_backward:exit:5"  # seq 11, after two failed snapshots
    c = chaos("embedded", snapshot_dir=str(tiny_disk)).start(fault=point)
    try:
        driver = Driver(c.url, ITERATIONS)
        driver.start()
        driver.finish()
        run_id = driver.model_id
        # (A real ENOSPC reaches the writer as safetensors' SafetensorError, not as an OSError.)
        assert c.log_count(r"ALERT snapshot of \S+ at seq \d+ failed") >= 2
        assert c.log_count(r"No space left on device") >= 2
        assert c.sql("select count(*) from snapshots where run_id = :r", r=run_id)[0][0] == 0
        assert c.run_row(run_id).last_snapshot_seq is None
        # No snapshot to start from: the replacement worker replayed all ten mutating ops.
        assert c.log_count(r"rebuilt \S+ to seq 10: snapshot at -1 \+ 10 ops replayed") == 1
        # Failed writes leave nothing behind on the full disk.
        assert [p for p in tiny_disk.rglob("*") if p.is_file()] == []
        check(c, driver, reference, "snapshot disk full (64 KiB tmpfs), then a worker crash", faults=f"ENOSPC, {point}")
    finally:
        c.close()  # before the tmpfs is unmounted


def _fb_body(model_id: str, seq: int, datum: types.Datum) -> bytes:
    """What the SDK sends for forward_backward([datum], "cross_entropy") at this seq_id."""
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=[datum], loss_fn="cross_entropy"),
        model_id=model_id,
        seq_id=seq,
    )
    return forward_backward_request_to_proto(request).SerializeToString()


def _optim_body(model_id: str, seq: int, learning_rate: float) -> dict[str, object]:
    request = types.OptimStepRequest(
        adam_params=types.AdamParams(learning_rate=learning_rate), model_id=model_id, seq_id=seq
    )
    return request.model_dump(mode="json")


def _resubmit(c: Cluster, model_id: str, seq: int, *, same: bool) -> httpx.Response:
    headers = {"X-API-Key": API_KEY}
    if seq % 2 == 1:  # forward_backward
        datum = memorise_datum()
        if not same:
            datum.loss_fn_inputs["weights"] = types.TensorData(data=[1.0] * 8, dtype="float32", shape=[8])
        return httpx.post(
            f"{c.url}/api/v1/forward_backward",
            content=_fb_body(model_id, seq, datum),
            headers={**headers, "Content-Type": "application/x-protobuf"},
            timeout=30,
        )
    lr = LEARNING_RATE if same else LEARNING_RATE * 2
    return httpx.post(f"{c.url}/api/v1/optim_step", json=_optim_body(model_id, seq, lr), headers=headers, timeout=30)


@pytest.mark.postgres
@pytest.mark.redis
def test_duplicate_doorbells_and_submissions(
    chaos: Callable[..., Cluster], references: Callable[[str], Reference]
) -> None:
    reference = references("distributed")
    c = chaos("distributed").start()
    driver = Driver(c.url, ITERATIONS)
    driver.start()
    run_id = driver.wait_created()
    n = driver.expected_ops

    # Ring every queue over and over while the run executes.
    queues = ["tuft.new", *(q for (q,) in c.sql("select queue from workers"))]
    bell = celery.Celery("chaos-doorbell", broker=REDIS_URL)
    rung = 0
    stop = threading.Event()

    def ring() -> None:
        nonlocal rung
        while not stop.is_set() and rung < 600:
            for queue in queues:
                bell.send_task("workers.wake", args=[None if rung % 2 else run_id], queue=queue)
                rung += 1

    ringer = threading.Thread(target=ring, name="chaos-ringer", daemon=True)
    ringer.start()

    wait_for(lambda: c.op_count(run_id) == n, 120, "every submission to be durable")
    ids = dict(c.sql("select seq, request_id from ops where run_id = :r and seq is not null", r=run_id))
    conflicts: list[dict[str, object]] = []

    def resend_all() -> None:
        for seq in (1, 2, n - 2, n - 1):  # early ops (done) and late ones (maybe still queued)
            again = _resubmit(c, run_id, seq, same=True)
            assert again.status_code == 200, again.text
            assert again.json()["request_id"] == ids[seq], f"seq {seq} resubmitted became another request"
            other = _resubmit(c, run_id, seq, same=False)
            assert other.status_code == 409, other.text
            conflicts.append(other.json())

    resend_all()
    driver.finish()
    stop.set()
    ringer.join(timeout=30)
    resend_all()  # after completion too: still the same requests, their results unchanged (checked below)
    assert all(body.get("error") == "conflict" for body in conflicts), conflicts
    assert c.op_count(run_id) == n
    check(
        c,
        driver,
        reference,
        "duplicate doorbells and duplicate submissions",
        faults=f"{rung} extra wake-ups, 8 replayed + 8 conflicting submissions",
    )
