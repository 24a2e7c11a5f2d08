"""The schema comes from Alembic alone, and matches the models on both dialects."""

from __future__ import annotations

from sqlalchemy import inspect

from app.db import migrate
from app.db.base import Base
from app.db.engine import Database


def test_upgrade_check_downgrade_roundtrip(db_url: str) -> None:
    migrate.upgrade(db_url)
    migrate.check(db_url)  # raises if models and migrated schema differ
    assert migrate.at_head(db_url)
    migrate.downgrade(db_url, "base")
    db = Database(db_url)
    try:
        assert set(inspect(db.write_engine).get_table_names()) <= {"alembic_version"}
    finally:
        db.dispose()
    assert not migrate.at_head(db_url)
    migrate.upgrade(db_url)
    db = Database(db_url)
    try:
        assert set(Base.metadata.tables) <= set(inspect(db.write_engine).get_table_names())
    finally:
        db.dispose()
