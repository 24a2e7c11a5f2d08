"""Wire-independent dense arrays.

Ops and results carry numbers as raw little-endian bytes rather than JSON lists: a float32 survives
the round trip bit for bit, and a 100k-token batch stays ~400 KB instead of ~2 MB of JSON text.
Only stdlib here (app.domain must import without numpy or torch).
"""

from __future__ import annotations

import math
import sys
from array import array
from typing import Literal

from pydantic import BaseModel, ConfigDict

DType = Literal["int64", "float32"]

_TYPECODE: dict[str, str] = {"int64": "q", "float32": "f"}
_ITEMSIZE: dict[str, int] = {"int64": 8, "float32": 4}


class Array(BaseModel):
    """A dense n-d array: `data` holds prod(shape) little-endian items of `dtype`."""

    model_config = ConfigDict(frozen=True, ser_json_bytes="base64", val_json_bytes="base64")

    dtype: DType
    shape: tuple[int, ...]
    data: bytes

    @classmethod
    def from_list(cls, values: list[float] | list[int], dtype: DType, shape: tuple[int, ...] | None = None) -> Array:
        arr = array(_TYPECODE[dtype], values)
        if sys.byteorder != "little":
            arr.byteswap()
        return cls(dtype=dtype, shape=shape if shape is not None else (len(values),), data=arr.tobytes())

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def tolist(self) -> list[float] | list[int]:
        arr = array(_TYPECODE[self.dtype])
        arr.frombytes(self.data)
        if sys.byteorder != "little":
            arr.byteswap()
        return arr.tolist()

    def check(self) -> None:
        """Raise ValueError unless data length agrees with dtype and shape."""
        if any(d < 0 for d in self.shape):
            raise ValueError(f"negative dimension in shape {list(self.shape)}")
        expected = self.size * _ITEMSIZE[self.dtype]
        if len(self.data) != expected:
            raise ValueError(
                f"tensor of shape {list(self.shape)} and dtype {self.dtype} "
                f"needs {expected} bytes, got {len(self.data)}"
            )
