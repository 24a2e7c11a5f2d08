"""Encrypted exports cannot be used by the server that wrote them.

`save_weights_external(..., age_encryption_recipients=[...])` stores only `<file>.age` files,
encrypted to keys the server never sees the private half of (app/age_crypto.py). Loading or
sampling such a checkpoint would fail on a worker with a message about missing files; refusing
it where the request arrives says why, and fails nothing else.
"""

from __future__ import annotations

from app.api.state import AppState
from app.checkpoint_store import CheckpointStore
from app.db.models import Checkpoint
from app.domain.errors import InvalidInput


def refuse_encrypted(state: AppState, ckpt: Checkpoint, path: str) -> None:
    # Only external checkpoints can be encrypted: the others are never read from disk here.
    if ckpt.kind == "external" and CheckpointStore(state.settings.resolved_checkpoint_dir()).encrypted(
        ckpt.storage_path
    ):
        raise InvalidInput(
            f"{path} is age-encrypted (saved with age_encryption_recipients): only its recipients can "
            "read it, so this server cannot load or sample it; download it, or save an unencrypted "
            "export or a checkpoint (save_state / save_weights_for_sampler) to use it here"
        )
