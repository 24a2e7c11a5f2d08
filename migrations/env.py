"""Alembic environment: the URL comes from TuFT's settings (or -x url=...), the target metadata
from app.db.models; SQLite runs in batch mode so ALTERs work there too."""

from __future__ import annotations

from alembic import context

from app.db import models  # noqa: F401  (registers the tables on Base.metadata)
from app.db.base import Base
from app.db.engine import Database

config = context.config
url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")


def run_migrations_online() -> None:
    assert url, "no database url given to alembic"
    db = Database(url, process_name="migrate")
    with db.write_engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=db.sqlite,
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    db.dispose()


run_migrations_online()
