"""app.wire.proto loads the SDK's schema without importing the SDK, yet shares its classes."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("sdk_first", [False, True])
def test_same_classes_whichever_is_imported_first(sdk_first: bool) -> None:
    imports = ["from app.wire.proto import pb", "from tinker.proto import tinker_public_pb2 as sdk"]
    if sdk_first:
        imports.reverse()
    code = "; ".join(
        [
            *imports,
            "assert pb.Tensor is sdk.Tensor and pb.SampleResponse is sdk.SampleResponse",
            "print('ok')",
        ]
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
