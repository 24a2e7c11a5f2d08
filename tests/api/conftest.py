"""One app per database backend, shared by the API tests (each test makes its own sessions and
runs, so tests never see each other's objects). Starting an app per test, with a fresh Postgres
database and Alembic run each time, would cost most of the suite's time budget.

The SQLite app is the embedded default (database_url None, so <data_dir>/tuft.db and the dev key
active); the Postgres app gets a database of its own, dropped at the end.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from tests.api.helpers import Api, make_settings, running_app
from tests.conftest import PG_ADMIN_URL, _pg_url_for


@pytest.fixture(scope="session", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    data_dir = tmp_path_factory.mktemp(f"api-{request.param}")
    if request.param == "sqlite":
        # The embedded mode's get_info waits for the built-in tokenizer folder that its worker
        # builds at startup (app/api/catalog.py); no worker runs here, so stand in for it.
        tokenizer = data_dir / "cache" / "tokenizers" / "tiny-qwen3"
        tokenizer.mkdir(parents=True)
        (tokenizer / "tokenizer.json").write_text("{}")
        with running_app(make_settings(data_dir, None)) as app:
            yield app
        return
    name = f"tuft_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        with running_app(make_settings(data_dir, _pg_url_for(name))) as app:
            yield app
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
