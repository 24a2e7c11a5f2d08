"""The dev key is never served on a network address unless that is said explicitly (issue 7
item 11): `tuft launch` and `tuft api` refuse at once, before touching the database."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

TUFT = [sys.executable, "-m", "app.cli.main"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUFT_")}
    return {**env, **extra}


def tuft(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TUFT, *args], capture_output=True, text=True, timeout=120, env=_env(**env))


def test_launch_refuses_the_dev_key_on_a_network_address(tmp_path: Path) -> None:
    for host in ("0.0.0.0", "::", "192.0.2.10", "tuft.example.org"):
        result = tuft("launch", "--host", host, "--data-dir", str(tmp_path), "--port", "1")
        assert result.returncode == 2, (host, result.stdout, result.stderr)
        assert "refusing to serve" in result.stderr and "tml-local-dev-key" in result.stderr, result.stderr
        assert "allow_dev_key_on_network" in result.stderr and "Traceback" not in result.stderr
    # Nothing was created: the refusal comes before migrations and the worker.
    assert not (tmp_path / "tuft.db").exists()


def test_api_refuses_a_configured_dev_key_on_a_network_address(tmp_path: Path) -> None:
    config = tmp_path / "tuft.yaml"
    config.write_text("dev_key_enabled: true\n")
    result = tuft("api", "--config", str(config), "--host", "0.0.0.0", "--data-dir", str(tmp_path), "--port", "1")
    assert result.returncode == 2 and "refusing to serve" in result.stderr, result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serves(args: list[str], env: dict[str, str], port: int) -> bool:
    """Start `tuft api`, and tell whether it answers /healthz (then stop it)."""
    proc = subprocess.Popen([*TUFT, *args], env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        return False
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_explicit_opt_in_or_no_dev_key_serves(tmp_path: Path) -> None:
    assert tuft("db", "upgrade", "--data-dir", str(tmp_path)).returncode == 0
    port = _free_port()
    args = ["api", "--data-dir", str(tmp_path), "--host", "0.0.0.0", "--port", str(port)]
    # Told explicitly (the environment form of allow_dev_key_on_network).
    assert _serves(args, {"TUFT_ALLOW_DEV_KEY_ON_NETWORK": "1"}, port)
    # The dev key switched off: nothing to protect (what the Docker image does).
    assert _serves(args, {"TUFT_DEV_KEY_ENABLED": "0"}, port)
    # Loopback needs no permission.
    loopback = ["api", "--data-dir", str(tmp_path), "--host", "127.0.0.1", "--port", str(port)]
    assert _serves(loopback, {}, port)
