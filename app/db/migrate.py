"""Run Alembic programmatically (tuft db upgrade, tuft launch): no alembic.ini needed on disk."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from app.db.engine import normalize_url

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)


def check(url: str) -> None:
    """Raise if the models and the migrated schema differ (alembic check)."""
    command.check(alembic_config(url))


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    from sqlalchemy.engine import make_url

    return make_url(normalize_url(url)).render_as_string(hide_password=True)


class SchemaError(Exception):
    """The database's schema is not one this code can serve: a one-line message for operators."""


def schema_revisions(url: str) -> tuple[set[str], set[str], set[str]]:
    """(the database's current revisions, this code's heads, every revision this code knows)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from app.db.engine import Database

    db = Database(url, process_name="schema-check")
    try:
        with db.write_engine.connect() as conn:
            current = set(MigrationContext.configure(conn).get_current_heads())
    finally:
        db.dispose()
    script = ScriptDirectory.from_config(alembic_config(url))
    return current, set(script.get_heads()), {rev.revision for rev in script.walk_revisions()}


def schema_status(url: str) -> str:
    """`current` (at this code's head), `behind` (empty, or an older revision: `tuft db upgrade`
    brings it here) or `newer` (a revision this code does not know: a newer release migrated it)."""
    current, heads, known = schema_revisions(url)
    if current == heads:
        return "current"
    if current - known:
        return "newer"
    return "behind"


def require_current(url: str, who: str) -> None:
    """Raise SchemaError unless the schema is exactly this code's head. A process must not serve
    a schema it does not know (a newer release may have changed what a column means) nor an older
    one (its queries would fail mid-op)."""
    current, heads, known = schema_revisions(url)
    if current == heads:
        return
    where = redact(url)
    if current - known:
        raise SchemaError(
            f"{who}: the database at {where} has schema revision {', '.join(sorted(current))}, which this "
            f"release does not know (it knows up to {', '.join(sorted(heads))}): a newer TuFT migrated it. "
            "Run the newer release, or restore a backup taken before its upgrade."
        )
    have = ", ".join(sorted(current)) or "none (empty database)"
    raise SchemaError(
        f"{who}: the database at {where} is at schema revision {have}, this release needs "
        f"{', '.join(sorted(heads))}; run `tuft db upgrade` first"
    )


def safe_upgrade(url: str) -> None:
    """`tuft db upgrade`: refuse a newer database with a SchemaError instead of Alembic's traceback."""
    if schema_status(url) == "newer":
        try:
            require_current(url, "tuft db upgrade")
        except SchemaError as exc:
            raise SchemaError(f"{exc} Nothing was changed.") from None
    upgrade(url)


def wait_for_current(url: str, who: str, timeout: float) -> None:
    """A worker started before `tuft db upgrade` ran waits for it (up to `timeout`); a newer or
    still-older schema is a SchemaError."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            status = schema_status(url)
        except Exception:  # the server not up yet: wait like for a missing schema
            if time.monotonic() > deadline:
                raise
            status = "behind"
        if status == "current":
            return
        if status == "newer" or time.monotonic() > deadline:
            require_current(url, who)
        time.sleep(1.0)


def at_head(url: str) -> bool:
    return schema_status(url) == "current"
