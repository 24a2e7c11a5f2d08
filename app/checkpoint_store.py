"""Checkpoint files: the one module that lays them out, stages, seals, publishes, copies, verifies
and deletes them (docs/checkpoints.md "Files"). Rows (who may read what) are app/queue/checkpoints.py.

Layout: `<root>/<run>/<kind>/<name>/<save>/`, one folder per save ATTEMPT. A writer stages its
files in a hidden folder beside the final one (`.staging-<save>`), seals them (manifest.json with
the sha256 of every file and who wrote them, everything fsynced), then renames the staging folder
to its final name, which no other attempt can ever use. So two attempts of one save op (a zombie
worker and the one that took its run over) never share a path, and nothing here renames over,
or deletes, a folder another attempt wrote.

Deleting follows the database: a registered folder (one a checkpoints row names) is removed only
after the transaction that stopped naming it committed (DELETE, TTL expiry, an overwriting save),
and only if no row names it by then. An attempt whose commit never landed removes only its own
folder, after checking that no row names it. What a crash leaves behind (a staging folder, a
published folder whose commit never landed, a replaced folder whose cleanup never ran) is an
orphan: `sweep_orphans` removes it after a grace period, never a folder a row names nor one whose
attempt may still commit.

Lives on the API side of the import rule (the API's DELETE and copy_weights and the sweeper use
it): stdlib and the database only, no torch.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from app.age_crypto import AGE_SUFFIX, encrypt_file, parse_recipients
from app.db.engine import Database
from app.db.models import Checkpoint, Op
from app.files import fsync_path
from app.snapshot_manifest import sha256_file

log = logging.getLogger("tuft.checkpoint_store")

MANIFEST = "manifest.json"
STAGING = ".staging-"
# Hidden leftovers of the layout before this module (`.<save>.tmp-<op>`, `.<save>.old-<op>`,
# `.<save>.copy-<id>`): swept like staging folders.
_LEGACY_TEMP = (".tmp-", ".old-", ".copy-")


def run_dir(run_id: str) -> str:
    """Run ids are `<session>:train:<n>`; ':' is replaced so the tree stays portable to
    filesystems that refuse it (names are validated, app/domain/ids.py)."""
    return run_id.replace(":", "_")


def new_storage_path(run_id: str, kind: str, name: str, made_by: str) -> str:
    """A fresh relative folder for one attempt: `<run>/<kind>/<name>/<tag>-<random>`. The tag ties
    it to what made it (an op's request id, a copy's key) for whoever reads the tree; the random
    part makes it unique per attempt, so no two writers ever meet on one path."""
    tag = hashlib.sha256(made_by.encode()).hexdigest()[:16]
    return f"{run_dir(run_id)}/{kind}/{name}/{tag}-{secrets.token_hex(6)}"


def _file_hashes(folder: Path) -> dict[str, str]:
    hashes = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and not path.is_symlink() and rel != MANIFEST:
            hashes[rel] = sha256_file(path)
    return hashes


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.rglob("*"), folder]:
        fsync_path(path)


@dataclass
class Pending:
    """One attempt's checkpoint folder, from staging to published. `discard()` removes what this
    attempt wrote, and nothing else; it must only be called while no row names `storage_path`
    (before the commit, or after checking: CheckpointStore.remove_unregistered)."""

    store: CheckpointStore
    storage_path: str
    staging: Path
    published: bool = False

    @property
    def final(self) -> Path:
        return self.store.folder(self.storage_path)

    encryption: dict[str, Any] | None = None

    def encrypt(self, recipients: list[str] | tuple[str, ...]) -> int:
        """Replace every staged file by `<file>.age`, encrypted to `recipients`; return the bytes
        now stored. Before `seal`, so the manifest lists (and hashes) only the encrypted files.
        The plaintext exists only in this attempt's hidden staging folder, each file until its
        encrypted copy is written; a crash in between leaves a staging folder, which the orphan
        sweep removes."""
        parsed = parse_recipients(recipients)
        size = 0
        for path in sorted(p for p in self.staging.rglob("*") if p.is_file() and not p.is_symlink()):
            target = path.with_name(path.name + AGE_SUFFIX)
            encrypt_file(path, target, parsed)
            path.unlink()
            size += target.stat().st_size
        self.encryption = {"scheme": "age", "recipients": list(recipients)}
        return size

    def seal(self, manifest: dict[str, Any]) -> None:
        """Write manifest.json (the given fields, the sha256 of every file) and fsync it all."""
        body = {**manifest, "files": _file_hashes(self.staging)}
        if self.encryption is not None:
            body["encryption"] = self.encryption
        (self.staging / MANIFEST).write_text(json.dumps(body, indent=2, sort_keys=True))
        _fsync_tree(self.staging)

    def publish(self) -> None:
        """Rename the sealed staging folder to its final name. That name is this attempt's alone;
        if something is there anyway, refuse rather than replace it."""
        final = self.final
        if final.exists():
            raise FileExistsError(errno.EEXIST, "checkpoint folder already exists", str(final))
        self.staging.rename(final)
        self.published = True
        fsync_path(final.parent)

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        if self.published:
            self.store.remove(self.storage_path)


class CheckpointStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # ---- paths -------------------------------------------------------------------------------
    def folder(self, storage_path: str) -> Path:
        """The folder of a row's `storage_path` (any layout this server ever wrote: they are all
        relative folders under the root). A path that would leave the root is refused."""
        rel = Path(storage_path)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ValueError(f"bad checkpoint storage path {storage_path!r}")
        return self.root / rel

    # ---- writing -----------------------------------------------------------------------------
    def begin(self, run_id: str, kind: str, name: str, made_by: str) -> Pending:
        """A new, empty staging folder for one attempt (hand `.staging` to the engine)."""
        storage_path = new_storage_path(run_id, kind, name, made_by)
        final = self.folder(storage_path)
        staging = final.parent / f"{STAGING}{final.name}"
        for _ in range(5):
            # The name's folder may be removed by a delete at the same moment (remove() drops an
            # empty one); creating it again is all it takes.
            try:
                staging.mkdir(parents=True)
                break
            except FileNotFoundError:
                continue
        else:
            staging.mkdir(parents=True)
        return Pending(self, storage_path, staging)

    def copy(
        self, src_storage_path: str, run_id: str, kind: str, name: str, made_by: str, stamp: dict[str, Any]
    ) -> str:
        """Copy a checkpoint's files to a new folder of their own (staged, sealed, renamed: the copy
        is complete or absent) and return its storage path. `stamp` overrides manifest fields;
        the file hashes stay the source's, since the bytes are the same."""
        src = self.folder(src_storage_path)
        if not src.is_dir():
            raise FileNotFoundError(errno.ENOENT, "checkpoint files missing", str(src))
        pending = self.begin(run_id, kind, name, made_by)
        try:
            pending.staging.rmdir()
            shutil.copytree(src, pending.staging)
            try:
                old = json.loads((pending.staging / MANIFEST).read_text())
            except (OSError, ValueError):
                old = None  # unreadable: the copy keeps the source's bytes as they are
            if isinstance(old, dict):
                (pending.staging / MANIFEST).write_text(json.dumps({**old, **stamp}, indent=2, sort_keys=True))
            _fsync_tree(pending.staging)
            pending.publish()
        except BaseException:
            pending.discard()
            raise
        return pending.storage_path

    # ---- reading -----------------------------------------------------------------------------
    def verify(self, storage_path: str) -> str | None:
        """None if the folder holds every file its manifest lists, with the listed sha256; else
        what is wrong. Manifests written before hashes were recorded check presence only."""
        folder = self.folder(storage_path)
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            return f"cannot read {MANIFEST}: {exc}"
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict):
            return None if any(p.name != MANIFEST for p in folder.iterdir()) else "no files besides the manifest"
        for rel, digest in files.items():
            path = folder / rel
            if not path.is_file():
                return f"{rel} is missing"
            if sha256_file(path) != digest:
                return f"{rel} is corrupt (sha256 mismatch)"
        return None

    def encrypted(self, storage_path: str) -> bool:
        """Whether the folder's files are age-encrypted (`Pending.encrypt`): then only the `.age`
        files are the export, and the server itself cannot load them. manifest.json stays plain
        (it is the store's own record: hashes and writer, never weights)."""
        try:
            manifest = json.loads((self.folder(storage_path) / MANIFEST).read_text())
        except (OSError, ValueError):
            return False
        return isinstance(manifest, dict) and isinstance(manifest.get("encryption"), dict)

    # ---- deleting ----------------------------------------------------------------------------
    def remove(self, storage_path: str) -> None:
        """Delete a folder unconditionally (callers have checked that no row names it), then the
        name's folder if that was its last save."""
        folder = self.folder(storage_path)
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            folder.parent.rmdir()  # fails harmlessly while other saves (or a staging folder) remain

    def remove_unregistered(self, db: Database, storage_paths: list[str]) -> int:
        """Delete those folders no checkpoint row names: for files whose row is gone (committed)
        and for an attempt's own folder after its commit did not land. A row naming one (the
        commit did land after all) keeps it."""
        if not storage_paths:
            return 0
        with db.read() as s:
            keep = _named(s, storage_paths)
        removed = 0
        for rel in storage_paths:
            if rel not in keep:
                self.remove(rel)
                removed += 1
        return removed

    # ---- orphans -----------------------------------------------------------------------------
    def _candidates(self, older_than: float) -> Iterator[tuple[str, bool]]:
        """(relative path, is a temporary folder) of every save folder and temporary folder not
        modified since `older_than`; also drops empty name folders on the way."""
        for run in _dirs(self.root):
            for kind in _dirs(run):
                for name in _dirs(kind):
                    entries = list(_dirs(name, hidden=True))
                    if not entries:
                        with contextlib.suppress(OSError):
                            if _newest_mtime(name) < older_than:
                                name.rmdir()
                        continue
                    for entry in entries:
                        temporary = entry.name.startswith(STAGING) or (
                            entry.name.startswith(".") and any(t in entry.name for t in _LEGACY_TEMP)
                        )
                        if entry.name.startswith(".") and not temporary:
                            continue
                        if _newest_mtime(entry) < older_than:
                            yield entry.relative_to(self.root).as_posix(), temporary

    def sweep_orphans(self, db: Database, grace_seconds: float, now: float | None = None) -> list[str]:
        """Remove folders no row names, untouched for `grace_seconds`, whose writing attempt can no
        longer commit; return their paths. Order matters: the attempts are read before the rows
        that decide, so a commit landing in between is seen as a row (an attempt that is not in
        flight at that read can never register its folder later)."""
        cutoff = (time.time() if now is None else now) - grace_seconds
        candidates = list(self._candidates(cutoff))
        removed = [rel for rel, temporary in candidates if temporary]
        for rel in removed:
            shutil.rmtree(self.root / rel, ignore_errors=True)
        saves = [rel for rel, temporary in candidates if not temporary]
        if saves:
            with db.read() as s:
                registered = _named(s, saves)  # most of them: a first, cheap cut
            unnamed = [rel for rel in saves if rel not in registered]
            writers = {rel: _written_by(self.root / rel) for rel in unnamed}
            with db.read() as s:
                live = _in_flight(s, [w for w in writers.values() if w is not None])
                named = _named(s, unnamed)
            for rel in unnamed:
                writer = writers[rel]
                if rel in named or (writer is not None and _attempt_key(writer) in live):
                    continue
                self.remove(rel)
                removed.append(rel)
        if removed:
            log.warning("removed %d orphaned checkpoint folder(s): %s", len(removed), removed[:10])
        return removed


def _dirs(folder: Path, hidden: bool = False) -> Iterator[Path]:
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False) and (hidden or not entry.name.startswith(".")):
            yield Path(entry.path)


def _newest_mtime(folder: Path) -> float:
    newest = 0.0
    with contextlib.suppress(OSError):
        newest = folder.stat().st_mtime
        for path in folder.rglob("*"):
            with contextlib.suppress(OSError):
                newest = max(newest, path.lstat().st_mtime)
    return newest


def _written_by(folder: Path) -> dict[str, Any] | None:
    """The attempt that wrote a save folder (manifest `written_by`), if the manifest says."""
    try:
        writer = json.loads((folder / MANIFEST).read_text()).get("written_by")
    except (OSError, ValueError, AttributeError):
        return None
    return writer if isinstance(writer, dict) and isinstance(writer.get("request_id"), str) else None


def _attempt_key(writer: dict[str, Any]) -> tuple[str, Any, Any]:
    return writer["request_id"], writer.get("attempt"), writer.get("epoch")


def _in_flight(s: Any, writers: list[dict[str, Any]]) -> set[tuple[str, Any, Any]]:
    """Attempts that may still commit: their op is running under that same claim."""
    ids = sorted({w["request_id"] for w in writers})
    if not ids:
        return set()
    rows = s.execute(
        select(Op.request_id, Op.attempt, Op.claimed_epoch).where(Op.request_id.in_(ids), Op.status == "running")
    ).all()
    return {(r[0], r[1], r[2]) for r in rows}


def _named(s: Any, storage_paths: list[str]) -> set[str]:
    """Those of `storage_paths` a checkpoint row names."""
    named: set[str] = set()
    for i in range(0, len(storage_paths), 500):
        chunk = storage_paths[i : i + 500]
        named.update(s.execute(select(Checkpoint.storage_path).where(Checkpoint.storage_path.in_(chunk))).scalars())
    return named
