"""Live TuFT servers as subprocesses, exactly as users start them (`tuft launch`, or `tuft db
upgrade` + `tuft api` + `tuft worker`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

# The server may run in another virtual environment than the tests: the SDK matrix runs these
# tests under each supported tinker version against the one server build (Makefile: test-sdk).
TUFT = [os.environ.get("TUFT_SERVER_PYTHON", sys.executable), "-m", "app.cli.main"]
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUFT_")}
    env.update({"PYTHONUNBUFFERED": "1", "TINKER_TELEMETRY": "0"})
    env.update(extra or {})
    return env


@dataclass
class LiveServer:
    port: int
    data_dir: Path
    args: list[str]
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    worker_args: list[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the process
        return subprocess.Popen([*TUFT, *args], cwd=REPO, env=_env(self.env), stdout=log, stderr=subprocess.STDOUT)

    def start(self, timeout: float = 120.0) -> LiveServer:
        self.procs.append(self._spawn(self.args, "api"))
        if self.worker_args is not None:
            self.procs.append(self._spawn(self.worker_args, "worker"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(f"{self.url}/api/v1/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"server did not come up:\n{self.logs()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(sig)
        for proc in self.procs:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-6000:]}" for p in sorted(self.log_dir.glob("*.log"))
        )


def embedded(tmp_path: Path) -> LiveServer:
    data = tmp_path / "data"
    port = free_port()
    args = ["launch", "--port", str(port), "--data-dir", str(data), "--device", "cpu"]
    return LiveServer(port=port, data_dir=data, args=args, log_dir=tmp_path)


def distributed(tmp_path: Path, database_url: str, redis_url: str) -> LiveServer:
    data = tmp_path / "data"
    port = free_port()
    common = ["--data-dir", str(data), "--database-url", database_url, "--redis-url", redis_url]
    subprocess.run([*TUFT, "db", "upgrade", *common], cwd=REPO, env=_env(), check=True, capture_output=True)
    server = LiveServer(port=port, data_dir=data, args=["api", "--port", str(port), *common], log_dir=tmp_path)
    server.worker_args = ["worker", "--device", "cpu", *common]
    # The dev key is on only in the embedded default; deployments configure their keys.
    config = tmp_path / "tuft.yaml"
    config.write_text("api_keys:\n  - key: tml-local-dev-key\n    tenant: default\n")
    server.args += ["--config", str(config)]
    server.worker_args += ["--config", str(config)]
    return server
