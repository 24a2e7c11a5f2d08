"""Signed download links (docs/downloads.md): an HMAC-SHA256 over a small JSON grant that says
which checkpoint (and file) may be fetched, by whose authority, and until when.

The token is `<payload>.<signature>`, both base64url without padding, so it fits in a URL path.
Links are bearer credentials: the download route checks only the token, never an API key, because
the SDK and CLI fetch them with plain urllib. Every API process of a deployment must sign with
the same key; without `download_signing_key` it is generated once and kept in the checkpoint
directory, which every API process serving downloads sees anyway.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import os
import secrets
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from app.config import Settings

KEY_FILE = ".download-signing-key"
# Bound into every signature, so a MAC made with this key for another purpose never verifies here.
_CONTEXT = b"tuft-download-v1."
_MIN_KEY_CHARS = 32


class BadLink(Exception):
    """Malformed, tampered with, or signed with another key."""


class LinkExpired(Exception):
    def __init__(self, grant: Grant) -> None:
        super().__init__(f"link for {grant.run_id} {grant.kind}/{grant.name} expired at {grant.expires}")
        self.grant = grant


@dataclass(frozen=True)
class Grant:
    run_id: str
    kind: str
    name: str
    # The checkpoint row's created_by_op: a checkpoint deleted and saved again under the same name
    # is another checkpoint, and the old links must not reach it.
    op: str
    # The tenant the link was issued to: another tenant's link stops working when the checkpoint
    # is unpublished.
    tenant: str
    # A file's path relative to the checkpoint folder, or None for the whole folder as a tar.
    file: str | None
    expires: int  # unix seconds

    @property
    def display_name(self) -> str:
        """The last part of the link's URL: what `curl -O` or a browser saves it as."""
        return self.file if self.file is not None else f"{self.name}.tar"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._key, _CONTEXT + payload.encode(), hashlib.sha256).digest())

    def sign(self, grant: Grant) -> str:
        payload = _b64(json.dumps(asdict(grant), sort_keys=True, separators=(",", ":")).encode())
        return f"{payload}.{self._mac(payload)}"

    def verify(self, token: str, now: float) -> Grant:
        """The grant of a genuine token; BadLink if it is not one, LinkExpired once it has expired
        (checked after the signature, so an expired forgery is still reported as a forgery)."""
        payload, dot, signature = token.partition(".")
        if not dot or not payload or not signature.isascii():
            raise BadLink("malformed token")
        if not hmac.compare_digest(self._mac(payload), signature):
            raise BadLink("bad signature")
        try:
            fields: Any = json.loads(_unb64(payload))
            grant = Grant(**fields)
        except (ValueError, TypeError, binascii.Error) as exc:
            # Only reachable with the key itself: a signed but unreadable grant.
            raise BadLink(f"unreadable grant: {exc}") from exc
        if not isinstance(grant.expires, int) or (grant.file is not None and not isinstance(grant.file, str)):
            raise BadLink("unreadable grant")
        if now >= grant.expires:
            raise LinkExpired(grant)
        return grant


def load_or_create_key(directory: Path) -> bytes:
    """The key kept in `directory`, created there first if missing. Several processes may race to
    create it: each writes a complete file under a private name and hard-links it into place,
    which fails if another got there first; then all of them read the one winner."""
    path = directory / KEY_FILE
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f"{KEY_FILE}.tmp-{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (secrets.token_hex(32) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    key = path.read_text().strip()
    if len(key) < _MIN_KEY_CHARS:
        raise RuntimeError(
            f"download signing key file {path} is damaged; delete it (every API process must then be "
            "restarted; existing links stop working) or set download_signing_key"
        )
    return key.encode()


@functools.lru_cache(maxsize=8)
def _signer(configured_key: str | None, checkpoint_dir: str) -> Signer:
    if configured_key is not None:
        return Signer(configured_key.encode())
    return Signer(load_or_create_key(Path(checkpoint_dir)))


def signer_for(settings: Settings) -> Signer:
    """The deployment's signer; the key file is read once per process."""
    return _signer(settings.download_signing_key, str(settings.resolved_checkpoint_dir()))
