"""database_listen_url (docs/scaling.md, PgBouncer): read from the file or TUFT_DATABASE_LISTEN_URL,
and refused where it cannot mean anything (no PostgreSQL database_url)."""

from __future__ import annotations

import pytest

from app.config import ConfigError, load_settings

PG = "postgresql+psycopg://tuft@pgbouncer:6432/tuft"
DIRECT = "postgresql://tuft@db:5432/tuft"


def test_listen_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUFT_SETTINGS_JSON", raising=False)
    monkeypatch.setenv("TUFT_DATABASE_URL", PG)
    monkeypatch.setenv("TUFT_DATABASE_LISTEN_URL", DIRECT)
    settings = load_settings()
    assert (settings.database_url, settings.database_listen_url) == (PG, DIRECT)


def test_listen_url_defaults_to_none_and_needs_postgresql(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("TUFT_DATABASE_URL", "TUFT_DATABASE_LISTEN_URL"):
        monkeypatch.delenv(var, raising=False)
    assert load_settings(database_url=PG).database_listen_url is None
    with pytest.raises(ConfigError, match="database_listen_url"):
        load_settings(database_listen_url=DIRECT)  # embedded SQLite: nothing LISTENs
    with pytest.raises(ConfigError, match="database_listen_url"):
        load_settings(database_url=PG, database_listen_url="sqlite:///x.db")
