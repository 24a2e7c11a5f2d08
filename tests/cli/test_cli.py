"""The `tuft` command as users run it: db upgrade, keys create/list/revoke, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from app.auth import KeyResolver
from app.db.engine import Database
from app.domain.errors import Unauthorized

TUFT = [sys.executable, "-m", "app.cli.main"]


def tuft(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TUFT, *args], capture_output=True, text=True, timeout=120)


def test_keys_lifecycle(db_url: str, tmp_path: Path) -> None:
    common = ["--data-dir", str(tmp_path), "--database-url", db_url]
    assert tuft("db", "upgrade", *common).returncode == 0
    created = tuft("keys", "create", "--tenant", "acme", "--name", "ci", "--json", *common)
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    assert key["key"].startswith("tml-") and key["tenant"] == "acme"

    db = Database(db_url)
    try:
        resolver = KeyResolver(db, {"tml-configured": "cfg"})
        # known(): answered without the database only for configured keys and cached valid ones.
        assert resolver.known("tml-configured") == "cfg"
        assert resolver.known(key["key"]) is None and resolver.known("tml-wrong") is None
        assert resolver.tenant_for(key["key"]) == "acme"
        assert resolver.known(key["key"]) == "acme"
        with pytest.raises(Unauthorized):
            resolver.tenant_for("tml-wrong")
        assert resolver.known("tml-wrong") is None  # a cached refusal still goes the checked way
        assert resolver.known(None) is None
        listed = json.loads(tuft("keys", "list", "--json", *common).stdout)
        assert [(k["tenant"], k["name"], k["revoked"]) for k in listed] == [("acme", "ci", False)]
        assert key["key"] not in json.dumps(listed)  # only a prefix is ever shown again
        assert tuft("keys", "revoke", str(key["id"]), *common).returncode == 0
        assert json.loads(tuft("keys", "list", "--json", *common).stdout)[0]["revoked"] is True
        try:
            KeyResolver(db, {}).tenant_for(key["key"])
            raise AssertionError("revoked key still accepted")
        except Unauthorized:
            pass
    finally:
        db.dispose()


def test_clear_errors(tmp_path: Path) -> None:
    missing = tuft("keys", "list", "--data-dir", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "cannot use the database" in missing.stderr and "Traceback" not in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("api_keys:\n  - key: not-tml\n")
    result = tuft("launch", "--config", str(bad), "--data-dir", str(tmp_path))
    assert result.returncode == 2 and "must start with 'tml-'" in result.stderr
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("no_such_setting: 1\n")
    result = tuft("api", "--config", str(unknown))
    assert result.returncode == 2 and "no_such_setting" in result.stderr


def test_api_refuses_an_unmigrated_database(tmp_path: Path) -> None:
    result = tuft("api", "--data-dir", str(tmp_path), "--port", "1")
    assert result.returncode == 2 and "tuft db upgrade" in result.stderr
