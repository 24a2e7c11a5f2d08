"""Fixtures of the chaos suite: fault-free reference runs (once per mode and session) and clusters
that are always torn down, whatever the test did to them."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.checker import Reference, read_report, reference_from
from tests.chaos.driver import Driver
from tests.chaos.harness import Cluster, cluster, pg_ping, redis_ping
from tests.chaos.report import render

# The SDK runs in this process: no telemetry to servers that tests kill.
os.environ.setdefault("TINKER_TELEMETRY", "0")

# Every scenario runs this script: ITERATIONS x (forward_backward + optim_step) + save_state.
ITERATIONS = 8

MODES = [
    "embedded",
    pytest.param("distributed", marks=[pytest.mark.postgres, pytest.mark.redis]),
]


@pytest.fixture(scope="session")
def seed_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Filled with the first cluster's derived files (the built tokenizer); later clusters copy it."""
    return tmp_path_factory.mktemp("seed") / "cache"


def _save_cache(c: Cluster, dest: Path) -> None:
    if not dest.exists() and (c.data_dir / "cache").is_dir():
        shutil.copytree(c.data_dir / "cache", dest)


@pytest.fixture(scope="session")
def references(tmp_path_factory: pytest.TempPathFactory, seed_cache: Path) -> Callable[[str], Reference]:
    """references(mode): the fault-free run of the script in that mode, computed on first use."""
    done: dict[str, Reference] = {}

    def get(mode: str) -> Reference:
        if mode not in done:
            _require_services(mode)
            root = tmp_path_factory.mktemp(f"reference-{mode}")
            with cluster(root, mode, seed_cache=seed_cache) as c:
                c.start()
                driver = Driver(c.url, ITERATIONS)
                driver.start()
                driver.finish()
                done[mode] = reference_from(c, driver, mode)
                _save_cache(c, seed_cache)
        return done[mode]

    return get


def _require_services(mode: str) -> None:
    if mode == "distributed" and not (pg_ping() and redis_ping()):
        pytest.fail("distributed chaos scenarios need PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379")


@pytest.fixture
def chaos(tmp_path: Path, seed_cache: Path) -> Iterator[Callable[..., Cluster]]:
    """chaos(mode, **settings) -> a cluster (not started) torn down after the test."""
    with contextlib.ExitStack() as stack:
        count = 0

        def make(mode: str, **overrides: Any) -> Cluster:
            nonlocal count
            count += 1
            _require_services(mode)
            return stack.enter_context(cluster(tmp_path / f"cluster{count}", mode, seed_cache=seed_cache, **overrides))

        yield make


def pytest_terminal_summary(terminalreporter: Any) -> None:
    path = os.environ.get("TUFT_CHAOS_REPORT")
    if path and Path(path).is_file():
        terminalreporter.write_sep("=", "chaos scenarios")
        terminalreporter.write_line(render(read_report(Path(path))))
