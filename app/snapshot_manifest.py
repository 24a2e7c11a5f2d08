"""Snapshot manifests: the sha256 of every file, and the manifest's own hash registered in the DB.

Shared by the worker (which writes them) and the admin CLI (`tuft snapshots verify`), so it lives
on the API side of the import rule and needs nothing but the stdlib.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

MANIFEST = "snapshot.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, info: dict[str, Any]) -> str:
    """Hash every file into snapshot.json; return the manifest's own sha256 (stored in the DB)."""
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    body = json.dumps({**info, "files": files}, indent=2, sort_keys=True).encode()
    (folder / MANIFEST).write_bytes(body)
    return hashlib.sha256(body).hexdigest()


def verify(folder: Path, manifest_sha256: str) -> str | None:
    """None if the snapshot is intact, else what is wrong."""
    try:
        body = (folder / MANIFEST).read_bytes()
    except OSError as exc:
        return f"cannot read manifest: {exc}"
    if hashlib.sha256(body).hexdigest() != manifest_sha256:
        return "manifest does not match the registered hash"
    for name, digest in json.loads(body)["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != digest:
            return f"{name} is corrupt (sha256 mismatch)"
    return None
