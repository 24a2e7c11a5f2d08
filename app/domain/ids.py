"""Identifier formats shared by the API, the queue and the workers.

The SDK computes training-run ids itself on the create-from-checkpoint path as
`f"{session_id}:train:{model_seq_id}"` (tinker-protocol.md §4.1), so every run id uses that form.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Literal

from app.domain.errors import InvalidInput

CheckpointKind = Literal["training", "sampler", "external"]

# tinker://<run>/<path segment>/<name>; the segment names are the SDK's (types/checkpoint.py).
# "external" (save_weights_external) exists from SDK 0.28 (docs/compatibility.md; tinker-protocol.md §8).
SEGMENT_FOR_KIND: dict[str, str] = {"training": "weights", "sampler": "sampler_weights", "external": "external_weights"}
_KIND_FOR_SEGMENT: dict[str, CheckpointKind] = {
    "weights": "training",
    "sampler_weights": "sampler",
    "external_weights": "external",
}
_EXPECTED_IDS = "weights/<name>, sampler_weights/<name> or external_weights/<name>"

# Checkpoint names become directory names: one path component of safe characters, never "." or "..".
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def new_session_id() -> str:
    return f"s-{uuid.uuid4().hex[:16]}"


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


def run_id_for(session_id: str, model_seq_id: int) -> str:
    return f"{session_id}:train:{model_seq_id}"


def sampler_id_for(session_id: str, sampling_session_seq_id: int) -> str:
    return f"{session_id}:sample:{sampling_session_seq_id}"


def validate_checkpoint_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidInput(
            f"invalid checkpoint name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '/' or '..')"
        )
    return name


@dataclass(frozen=True)
class TinkerPath:
    run_id: str
    kind: CheckpointKind
    name: str

    @property
    def checkpoint_id(self) -> str:
        return checkpoint_id(self.kind, self.name)

    def __str__(self) -> str:
        return f"tinker://{self.run_id}/{self.checkpoint_id}"


def checkpoint_id(kind: CheckpointKind, name: str) -> str:
    """(kind, name) -> the SDK's checkpoint id, e.g. `weights/<name>`."""
    return f"{SEGMENT_FOR_KIND[kind]}/{name}"


def checkpoint_path(run_id: str, kind: CheckpointKind, name: str) -> str:
    return str(TinkerPath(run_id, kind, name))


def parse_checkpoint_id(checkpoint_id: str) -> tuple[CheckpointKind, str]:
    """`weights/<name>`, `sampler_weights/<name>` or `external_weights/<name>` -> (kind, name)."""
    segment, _, name = checkpoint_id.partition("/")
    if segment not in _KIND_FOR_SEGMENT or not name:
        raise InvalidInput(f"invalid checkpoint id {checkpoint_id!r}: expected {_EXPECTED_IDS}")
    return _KIND_FOR_SEGMENT[segment], validate_checkpoint_name(name)


def parse_tinker_path(path: str) -> TinkerPath:
    if not path.startswith("tinker://"):
        raise InvalidInput(f"invalid checkpoint path {path!r}: expected tinker://<run>/<kind>/<name>")
    parts = path[len("tinker://") :].split("/")
    if len(parts) != 3 or not parts[0] or "\x00" in path:
        raise InvalidInput(f"invalid checkpoint path {path!r}: expected tinker://<run>/<kind>/<name>")
    kind, name = parse_checkpoint_id(f"{parts[1]}/{parts[2]}")
    return TinkerPath(parts[0], kind, name)
