"""age (filippo.io/age) encryption of exported weights, through pyrage.

`save_weights_external(..., age_encryption_recipients=[...])` asks for every exported file to be
encrypted to those recipients and stored with a `.age` suffix (the SDK's own docstring). The API
checks the recipients when the request arrives, so a bad one fails the future with category
`user` at once rather than after the save ran; the worker encrypts with the same parser
(app/checkpoint_store.py, `Pending.encrypt`). Only public keys pass through the server: it can
never decrypt what it wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyrage

from app.domain.errors import InvalidInput

AGE_SUFFIX = ".age"
# The SDK documents "at most 10" recipients (TrainingClient.save_weights_external).
MAX_RECIPIENTS = 10
# A native key is 62 characters and an RSA-4096 SSH key about 740; anything far longer is not a key.
_MAX_RECIPIENT_CHARS = 4096

# The extension module ships no type information.
_age: Any = pyrage


def parse_recipients(recipients: list[str] | tuple[str, ...]) -> list[Any]:
    """pyrage recipients for native `age1...` keys and SSH public keys (`ssh-ed25519 ...`,
    `ssh-rsa ...`); anything else is an InvalidInput that names the bad entry."""
    if not recipients:
        raise InvalidInput("age_encryption_recipients must name at least one recipient, or be omitted")
    if len(recipients) > MAX_RECIPIENTS:
        raise InvalidInput(f"age_encryption_recipients: at most {MAX_RECIPIENTS} recipients, got {len(recipients)}")
    parsed = []
    for i, text in enumerate(recipients):
        if not isinstance(text, str) or not text.strip() or len(text) > _MAX_RECIPIENT_CHARS:
            raise InvalidInput(f"age_encryption_recipients[{i}] is not an age recipient (empty or too long)")
        key = text.strip()
        try:
            if key.startswith("ssh-"):
                parsed.append(_age.ssh.Recipient.from_str(key))
            else:
                parsed.append(_age.x25519.Recipient.from_str(key))
        except _age.RecipientError as exc:
            shown = key if len(key) <= 80 else key[:77] + "..."
            raise InvalidInput(
                f"age_encryption_recipients[{i}] ({shown!r}) is not a valid age recipient: {exc}; expected "
                "a native age public key (age1...) or an SSH public key (ssh-ed25519 ... / ssh-rsa ...)"
            ) from exc
    return parsed


def encrypt_file(src: Path, dest: Path, recipients: list[Any]) -> None:
    """Encrypt `src` into `dest` (age binary format, what `age -d` and pyrage.decrypt_file read).
    pyrage streams the file, so a large adapter is never held in memory whole."""
    _age.encrypt_file(str(src), str(dest), recipients)
