"""The issue's quickstart program, run unmodified (bar the base URL) by the real tinker SDK."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import pytest

from tests.e2e.server import REPO, LiveServer

pytestmark = pytest.mark.e2e


def test_quickstart_program(live_server: LiveServer) -> None:
    env = {**os.environ, "TUFT_BASE_URL": live_server.url, "TINKER_TELEMETRY": "0"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "quickstart.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr + live_server.logs()
    out = proc.stdout
    assert "- tuft/tiny-qwen3" in out.splitlines()[0]
    loss = ast.literal_eval(re.search(r"Loss metrics: (\{.*\})", out).group(1))  # type: ignore[union-attr]
    assert set(loss) == {"loss:sum"} and loss["loss:sum"] > 0
    optim = ast.literal_eval(re.search(r"Optimizer metrics: (\{.*\})", out).group(1))  # type: ignore[union-attr]
    assert isinstance(optim, dict)
    run_ids = ast.literal_eval(re.search(r"Session contains training runs: (\[.*\])", out).group(1))  # type: ignore[union-attr]
    assert len(run_ids) == 1
    assert f"Checkpoint saved to: tinker://{run_ids[0]}/weights/demo-checkpoint" in out
    assert f"Sampler weights saved to: tinker://{run_ids[0]}/sampler_weights/demo-sampler" in out
    tokens = ast.literal_eval(re.search(r"Sample tokens: (\[.*\])", out).group(1))  # type: ignore[union-attr]
    assert len(tokens) == 5 and all(isinstance(t, int) for t in tokens)
