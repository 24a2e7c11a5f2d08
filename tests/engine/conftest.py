"""Shared fixtures: one tokenizer cache per session, engines on the real tiny model on CPU."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from app.domain.models import builtin_tiny_spec
from tests.engine.helpers import DEVICE
from workers.engine import TorchEngine


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engine-cache")


@pytest.fixture
def make_engine(cache_dir: Path) -> Callable[[], TorchEngine]:
    def make() -> TorchEngine:
        return TorchEngine([builtin_tiny_spec()], device=DEVICE, cache_dir=cache_dir)

    return make


@pytest.fixture(scope="module")
def engine(cache_dir: Path) -> TorchEngine:
    """Shared by a module's tests: each test uses its own run ids."""
    return TorchEngine([builtin_tiny_spec()], device=DEVICE, cache_dir=cache_dir)
