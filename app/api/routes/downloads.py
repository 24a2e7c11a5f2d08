"""Checkpoint downloads over HTTP through signed, time-limited links (docs/downloads.md).

- `GET …/checkpoints/{segment}/{name}/archive` (SDK 0.25, `tinker checkpoint download`): a link to
  the whole checkpoint as a tar, built on the fly; 200 JSON `{url, expires}` when the caller
  accepts JSON (0.25 always sends `Accept: application/json`), else a 302 to the link.
- `GET …/checkpoints/external_weights/{name}/external_weights_urls` (SDK 0.38): one link per file.
- `GET /api/v1/downloads/{token}/{file}`: serves a link. No API key (the SDK and CLI fetch links
  with plain urllib); the token is the authority, and the checkpoint must still exist, be the same
  one the link was signed for, and still be readable by the tenant it was issued to.

Files are streamed from handles opened before the response starts, so a checkpoint deleted
mid-download finishes the transfer in progress, and nothing is ever read whole into memory.
"""

from __future__ import annotations

import email.utils
import logging
import os
import stat
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.api.deps import State, Tenant
from app.api.state import AppState
from app.checkpoint_store import MANIFEST, CheckpointStore
from app.db.engine import db_now
from app.domain.errors import InvalidInput, NotFound
from app.domain.ids import TinkerPath, parse_checkpoint_id
from app.queue import checkpoints
from app.signing import BadLink, Grant, LinkExpired, signer_for

log = logging.getLogger("tuft.downloads")
router = APIRouter()

_CHECKPOINT = "/api/v1/training_runs/{run_id}/checkpoints/{segment}/{name}"
_CHUNK = 1 << 20
# Marks a complete archive for 0.25's CLI (`push-hf` refuses an archive without it). A registered
# checkpoint's folder is complete by construction: it is renamed into place before its row exists,
# and no writer touches it afterwards (app/checkpoint_store.py).
_COMPLETE_MARKER = "checkpoint_complete"


def _link_base(request: Request, state: AppState) -> str:
    if state.settings.public_base_url:
        return state.settings.public_base_url.rstrip("/")
    return str(request.base_url).rstrip("/")


def _checkpoint_files(folder: Path) -> list[str]:
    """Regular files of a checkpoint folder, relative and sorted; hidden names (temporary files)
    and symlinks are never offered."""
    found: list[str] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            path = Path(root) / f
            if not f.startswith(".") and stat.S_ISREG(path.lstat().st_mode):
                found.append(path.relative_to(folder).as_posix())
    return found


def _export_files(store: CheckpointStore, storage_path: str) -> list[str]:
    """What a download offers: the folder's files, except the store's own manifest.json in an
    age-encrypted export, whose files are then all `<file>.age` (tinker-cookbook's download
    refuses a file without that suffix when it asked for encryption)."""
    files = _checkpoint_files(store.folder(storage_path))
    return [f for f in files if f != MANIFEST] if store.encrypted(storage_path) else files


def _readable(state: AppState, tenant: str, run_id: str, segment: str, name: str) -> tuple[Grant, list[str]]:
    """The caller's own or a published checkpoint: an unsigned grant and its files."""
    kind, name = parse_checkpoint_id(f"{segment}/{name}")
    if "\x00" in run_id:  # PostgreSQL refuses NUL in text: answer as for any unknown run
        raise NotFound(f"checkpoint {segment}/{name} of {run_id!r} not found")
    with state.db.read() as s:
        row = checkpoints.resolve(s, tenant, TinkerPath(run_id, kind, name))
        op, storage = row.created_by_op, row.storage_path
    files = _export_files(CheckpointStore(state.settings.resolved_checkpoint_dir()), storage)
    if not files:
        raise NotFound(f"checkpoint {segment}/{name} of {run_id} has no files")
    grant = Grant(run_id=run_id, kind=kind, name=name, op=op, tenant=tenant, file=None, expires=0)
    return grant, files


def _signed_url(base: str, state: AppState, grant: Grant) -> str:
    token = signer_for(state.settings).sign(grant)
    return f"{base}/api/v1/downloads/{token}/{quote(grant.display_name)}"


def _expiry(state: AppState) -> int:
    return int(time.time()) + state.settings.download_link_ttl_seconds


@router.get(_CHECKPOINT + "/archive")
async def archive_url(run_id: str, segment: str, name: str, request: Request, state: State, tenant: Tenant) -> Response:
    grant, _files = await run_in_threadpool(_readable, state, tenant, run_id, segment, name)
    expires = _expiry(state)
    url = _signed_url(_link_base(request, state), state, replace(grant, expires=expires))
    if "application/json" in request.headers.get("accept", ""):
        return JSONResponse({"url": url, "expires": datetime.fromtimestamp(expires, UTC).isoformat()})
    # The SDK's original contract: a redirect, whose Expires header 0.25 reads.
    headers = {"Expires": email.utils.formatdate(expires, usegmt=True), "Cache-Control": "no-store"}
    return RedirectResponse(url, status_code=302, headers=headers)


@router.get(_CHECKPOINT + "/external_weights_urls")
async def external_weights_urls(
    run_id: str, segment: str, name: str, request: Request, state: State, tenant: Tenant
) -> dict[str, Any]:
    parse_checkpoint_id(f"{segment}/{name}")
    if segment != "external_weights":
        raise InvalidInput(
            f"external_weights_urls serves external weights checkpoints only "
            f"(tinker://<run>/external_weights/<name>), not {segment}/{name}; "
            "save one with TrainingClient.save_weights_external"
        )
    grant, files = await run_in_threadpool(_readable, state, tenant, run_id, segment, name)
    expires = _expiry(state)
    base = _link_base(request, state)
    urls = {f: _signed_url(base, state, replace(grant, file=f, expires=expires)) for f in files}
    return {"urls": urls, "expires": datetime.fromtimestamp(expires, UTC).isoformat()}


# ---- serving a link -------------------------------------------------------------------------


@dataclass
class _Open:
    """Files opened for one response: (name in the response, handle, size)."""

    entries: list[tuple[str, IO[bytes], int]]
    mtime: float

    def close(self) -> None:
        for _, handle, _ in self.entries:
            handle.close()


def _refused(request: Request, status: int, code: str, message: str, why: str) -> JSONResponse:
    client = request.client.host if request.client else "?"
    log.warning("download refused (%d, %s) for %s: %s", status, code, client, why)
    return JSONResponse({"error": code, "message": message, "category": "user", "detail": message}, status)


def _open_file(folder: Path, rel: str) -> tuple[IO[bytes], int]:
    path = folder / rel
    # The name comes from a signed grant, but a checkpoint folder is never left through a link.
    if ".." in Path(rel).parts or path.name.startswith("."):
        raise NotFound(f"file {rel!r} not found in this checkpoint")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise NotFound(f"file {rel!r} not found in this checkpoint") from exc
    handle = os.fdopen(fd, "rb")
    info = os.fstat(handle.fileno())
    if not stat.S_ISREG(info.st_mode):
        handle.close()
        raise NotFound(f"file {rel!r} not found in this checkpoint")
    return handle, info.st_size


def _open_grant(state: AppState, grant: Grant) -> _Open:
    label = f"checkpoint {grant.kind}/{grant.name} of {grant.run_id}"
    with state.db.read() as s:
        row = checkpoints.find(s, grant.run_id, grant.kind, grant.name)
        if (
            row is None
            or row.created_by_op != grant.op
            or (row.expires_at is not None and row.expires_at < db_now(s))
            or (row.tenant != grant.tenant and not row.public)
        ):
            raise NotFound(f"{label} no longer exists or is no longer shared; this link does not work any more")
        store = CheckpointStore(state.settings.resolved_checkpoint_dir())
        folder, storage = store.folder(row.storage_path), row.storage_path
        mtime = row.created_at
    names = [grant.file] if grant.file is not None else _export_files(store, storage)
    opened = _Open([], mtime)
    try:
        for rel in names:
            handle, size = _open_file(folder, rel)
            opened.entries.append((rel, handle, size))
    except BaseException:
        opened.close()
        raise
    if not opened.entries:
        raise NotFound(f"{label} has no files")
    return opened


def _copy(handle: IO[bytes], size: int) -> Iterator[bytes]:
    remaining = size
    while remaining > 0:
        chunk = handle.read(min(_CHUNK, remaining))
        if not chunk:
            # Checkpoint files never change once registered; a short file means storage trouble.
            raise OSError(f"{handle.name}: file shorter than its recorded size")
        remaining -= len(chunk)
        yield chunk


def _tar_header(name: str, size: int, mtime: float) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, int(mtime), 0o644
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _tar_plan(opened: _Open) -> tuple[list[tuple[bytes, IO[bytes] | None, int]], int]:
    """Headers and contents of the archive, and its exact length (sent as Content-Length)."""
    members: list[tuple[bytes, IO[bytes] | None, int]] = [
        (_tar_header(rel, size, opened.mtime), handle, size) for rel, handle, size in opened.entries
    ]
    if all(rel != _COMPLETE_MARKER for rel, _, _ in opened.entries):
        members.append((_tar_header(_COMPLETE_MARKER, 0, opened.mtime), None, 0))
    length = sum(len(header) + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE for header, _, size in members)
    length += 2 * tarfile.BLOCKSIZE  # end-of-archive marker
    length += -length % tarfile.RECORDSIZE  # padded to whole records, as tarfile itself writes
    return members, length


def _tar_stream(opened: _Open, members: list[tuple[bytes, IO[bytes] | None, int]], length: int) -> Iterator[bytes]:
    try:
        sent = 0
        for header, handle, size in members:
            yield header
            if handle is not None:
                yield from _copy(handle, size)
            pad = -size % tarfile.BLOCKSIZE
            yield tarfile.NUL * pad
            sent += len(header) + size + pad
        yield tarfile.NUL * (length - sent)
    finally:
        opened.close()


def _file_stream(opened: _Open) -> Iterator[bytes]:
    try:
        _, handle, size = opened.entries[0]
        yield from _copy(handle, size)
    finally:
        opened.close()


@router.get("/api/v1/downloads/{token}/{filename:path}")
async def download(token: str, filename: str, request: Request, state: State) -> Response:
    try:
        grant = signer_for(state.settings).verify(token, time.time())
    except LinkExpired as exc:
        return _refused(request, 410, "link_expired", "this download link has expired; request a new one", str(exc))
    except BadLink as exc:
        return _refused(request, 403, "invalid_link", "this download link is not valid", str(exc))
    if filename != grant.display_name:
        return _refused(
            request, 403, "invalid_link", "this download link is not valid", f"file {filename!r} is not the signed one"
        )
    opened = await run_in_threadpool(_open_grant, state, grant)
    log.info("download %s/%s of %s (%s) for tenant %s", grant.kind, grant.name, grant.run_id, filename, grant.tenant)
    disposition = f"attachment; filename*=UTF-8''{quote(Path(grant.display_name).name)}"
    headers = {"Content-Disposition": disposition, "Cache-Control": "no-store"}
    if grant.file is None:
        members, length = _tar_plan(opened)
        headers["Content-Length"] = str(length)
        return StreamingResponse(_tar_stream(opened, members, length), media_type="application/x-tar", headers=headers)
    headers["Content-Length"] = str(opened.entries[0][2])
    return StreamingResponse(_file_stream(opened), media_type="application/octet-stream", headers=headers)
