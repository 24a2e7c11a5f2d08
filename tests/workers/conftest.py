from __future__ import annotations

from pathlib import Path

import pytest

from app.config import Settings, load_settings
from workers.engine import TorchEngine


@pytest.fixture(scope="session")
def engine_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engine-cache")


def make_settings(tmp_path: Path, db_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": tmp_path,
        "database_url": db_url,
        "lease_ttl_seconds": 1.0,
        "heartbeat_seconds": 0.2,
        "snapshot_every_ops": 4,
        "snapshot_every_seconds": 3600.0,
    }
    values.update(overrides)
    return load_settings(**values)  # type: ignore[arg-type]


def make_engine(settings: Settings, cache: Path) -> TorchEngine:
    return TorchEngine(settings.models(), device="cpu", cache_dir=cache)
