"""The broker-less doorbell (app/localbell.py): the API's ring reaches the workers of its host."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

from app.doorbell import make_doorbell
from app.localbell import BellListener, BellSender, bell_dir
from app.queue.submit import Wakeup


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_ring_wakes_the_listening_worker_and_a_closed_one_is_no_longer_rung(tmp_path: Path) -> None:
    wake = threading.Event()
    listener = BellListener(bell_dir(tmp_path), wake).start()
    sender = BellSender(bell_dir(tmp_path))
    try:
        assert sender.ring() == 1
        assert wake.wait(5)
    finally:
        listener.close()
    assert not listener.file.exists()
    assert sender.ring() == 0
    sender.close()


def test_the_api_doorbell_without_redis_rings_local_workers_after_a_commit(tmp_path: Path) -> None:
    wake = threading.Event()
    listener = BellListener(bell_dir(tmp_path), wake).start()
    doorbell = make_doorbell(None, tmp_path)
    try:
        doorbell.ring([])  # nothing was submitted: nobody is woken
        assert not wake.wait(0.5)
        doorbell.ring([Wakeup(queue="cpu.host.1", run_id="s-1:train:0")])
        assert wake.wait(5)
    finally:
        doorbell.close()
        listener.close()


def test_dead_workers_files_are_removed_and_other_hosts_workers_are_not_rung(tmp_path: Path) -> None:
    folder = bell_dir(tmp_path)
    folder.mkdir(parents=True)
    host = socket.gethostname()
    stale = folder / f"{host}-1-1.port"
    stale.write_text(f"{host} {dead_pid()} 9\n")
    # A worker on another host that shares the data directory: its port is not on our localhost.
    elsewhere = folder / "other-host-7-7.port"
    elsewhere.write_text("other-host 7 9\n")
    listener = BellListener(folder, threading.Event()).start()
    sender = BellSender(folder)
    try:
        assert not stale.exists()
        assert elsewhere.exists()
        assert sender.ring() == 1  # only the live listener of this host
    finally:
        sender.close()
        listener.close()
