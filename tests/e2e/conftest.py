from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REDIS_URL
from tests.e2e.server import LiveServer, distributed, embedded


@pytest.fixture
def embedded_server(tmp_path: Path) -> Iterator[LiveServer]:
    server = embedded(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["embedded", pytest.param("postgres+redis", marks=[pytest.mark.postgres, pytest.mark.redis])])
def live_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LiveServer]:
    if request.param == "embedded":
        server = embedded(tmp_path)
    else:
        server = distributed(tmp_path, request.getfixturevalue("pg_url"), REDIS_URL)
    server.start()
    try:
        yield server
    finally:
        server.stop()
