"""The one import point of the Tinker protobuf classes.

The schema is the installed `tinker` SDK's own generated module rather than a vendored copy, so the
server's wire types can never drift from what the client sends (tinker-protocol.md §7.1).

`from tinker.proto import tinker_public_pb2` would first run `tinker/__init__.py`, which imports
the whole client (httpx, numpy, and torch whenever it is installed: about 2 s and a few hundred MB
in the API process). The generated file itself needs only `google.protobuf`, so unless the SDK is
already imported it is loaded straight from the SDK's directory. Both routes yield the very same
classes: protobuf keeps one class per descriptor, and adding the identical file to the descriptor
pool twice is accepted.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING


def _load_sdk_schema() -> ModuleType:
    if "tinker" in sys.modules:
        from tinker.proto import tinker_public_pb2

        return tinker_public_pb2
    package = importlib.util.find_spec("tinker")  # locates the package without executing it
    if package is None or not package.submodule_search_locations:
        raise ImportError("the tinker SDK is not installed; it provides the protobuf schema")
    path = Path(next(iter(package.submodule_search_locations))) / "proto" / "tinker_public_pb2.py"
    spec = importlib.util.spec_from_file_location("_tuft_tinker_public_pb2", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the tinker protobuf schema from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if TYPE_CHECKING:
    from tinker.proto import tinker_public_pb2 as pb
else:
    pb = _load_sdk_schema()

__all__ = ["pb"]
