"""Protobuf tensors <-> `app.domain.tensors.Array` (tinker-protocol.md §7.2, §7.4).

The public wire carries little-endian buffers. The SDK only writes FLOAT32 and INT64, but the schema
also allows INT32 and BFLOAT16, which (like the SDK's own reader, `proto/response_conv.py`) are
widened to int64 / float32. Sparse CSR tensors are densified with pad value 0, the training pad.
"""

from __future__ import annotations

import math
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from app.domain.errors import InvalidInput, PayloadTooLarge
from app.domain.tensors import Array, DType
from app.wire.proto import pb

_LITTLE = sys.byteorder == "little"


@dataclass(frozen=True)
class _WireDType:
    typecode: str  # array typecode of the bytes on the wire
    itemsize: int
    domain: DType  # what it becomes after widening


_WIRE_DTYPES: dict[int, _WireDType] = {
    pb.DTYPE_FLOAT32: _WireDType("f", 4, "float32"),
    pb.DTYPE_INT64: _WireDType("q", 8, "int64"),
    pb.DTYPE_INT32: _WireDType("i", 4, "int64"),
    pb.DTYPE_BFLOAT16: _WireDType("H", 2, "float32"),
}
_DOMAIN_TO_PROTO: dict[str, pb.DType.ValueType] = {"float32": pb.DTYPE_FLOAT32, "int64": pb.DTYPE_INT64}
_DOMAIN_ITEMSIZE: dict[str, int] = {"float32": 4, "int64": 8}
_DOMAIN_TYPECODE: dict[str, str] = {"float32": "f", "int64": "q"}


def unpack_le(typecode: str, raw: bytes) -> array[Any]:
    """Little-endian bytes -> array; the caller has checked that the length is a multiple."""
    out = array(typecode)
    out.frombytes(raw)
    if not _LITTLE:
        out.byteswap()
    return out


def pack_le(typecode: str, values: Sequence[int] | Sequence[float]) -> bytes:
    out = array(typecode, values)
    if not _LITTLE:
        out.byteswap()
    return out.tobytes()


class SparseBudget:
    """Bytes that densifying sparse tensors may still allocate for one request.

    A CSR tensor of a few bytes can declare a [10**9, 10**9] shape; the plain body cap does not
    bound that, so densification draws on this budget instead.
    """

    def __init__(self, limit: int) -> None:
        self.remaining = limit

    def take(self, nbytes: int, what: str) -> None:
        if nbytes > self.remaining:
            raise PayloadTooLarge(f"{what}: sparse tensor densifies to {nbytes} bytes, over the limit")
        self.remaining -= nbytes


def tensor_elements(msg: pb.Tensor) -> int:
    """How many elements the tensor declares (its shape, else its dense bytes), read without
    decoding anything: the API bounds requests by it before building arrays."""
    if msg.shape:
        return math.prod(max(int(d), 0) for d in msg.shape)
    wire = _WIRE_DTYPES.get(msg.dtype)
    return len(msg.dense) // wire.itemsize if wire is not None else 0


def array_from_proto(msg: pb.Tensor, what: str, budget: SparseBudget) -> Array:
    """Decode one `Tensor` into a dense `Array`; `what` names it in error messages."""
    wire = _WIRE_DTYPES.get(msg.dtype)
    if wire is None:
        raise InvalidInput(f"{what}: unsupported tensor dtype {msg.dtype}; send float32 or int64")
    shape = tuple(int(d) for d in msg.shape)
    if any(d < 0 for d in shape):
        raise InvalidInput(f"{what}: negative dimension in shape {list(shape)}")
    if msg.WhichOneof("encoding") == "sparse_csr":
        dense = _densify_csr(msg.sparse_csr, wire, shape, what, budget)
        return Array(dtype=wire.domain, shape=shape, data=_le_bytes(_widen(dense, wire)))
    raw = msg.dense
    count = _item_count(raw, wire, f"{what}: dense data")
    if not shape:
        # A hand-built TensorData without a shape sends none; the SDK reads that as 1-D (§7.2).
        shape = (count,)
    elif math.prod(shape) != count:
        raise InvalidInput(f"{what}: shape {list(shape)} needs {math.prod(shape)} elements, got {count}")
    if wire.typecode == _DOMAIN_TYPECODE[wire.domain]:
        # Same layout as the domain: keep the exact bytes (NaN payloads survive bit for bit).
        return Array(dtype=wire.domain, shape=shape, data=bytes(raw))
    return Array(dtype=wire.domain, shape=shape, data=_le_bytes(_widen(unpack_le(wire.typecode, raw), wire)))


def _item_count(raw: bytes, wire: _WireDType, what: str) -> int:
    if len(raw) % wire.itemsize:
        raise InvalidInput(f"{what} is {len(raw)} bytes, not a multiple of the {wire.itemsize}-byte item")
    return len(raw) // wire.itemsize


def _widen(values: array[Any], wire: _WireDType) -> array[Any]:
    """Native-order array in the domain dtype's typecode."""
    if wire.typecode == "H":
        # bfloat16 is the upper half of a float32: shift into place and reinterpret the bits.
        bits = array("I", (v << 16 for v in values))
        out = array("f")
        out.frombytes(bits.tobytes())
        return out
    target = _DOMAIN_TYPECODE[wire.domain]
    return values if values.typecode == target else array(target, values)


def _le_bytes(values: array[Any]) -> bytes:
    if _LITTLE:
        return values.tobytes()
    copy = array(values.typecode, values)
    copy.byteswap()
    return copy.tobytes()


def _densify_csr(
    csr: pb.SparseCsr,
    wire: _WireDType,
    shape: tuple[int, ...],
    what: str,
    budget: SparseBudget,
) -> array[Any]:
    if len(shape) != 2:
        raise InvalidInput(f"{what}: a sparse CSR tensor needs a 2-D shape, got {list(shape)}")
    nrows, ncols = shape
    budget.take(nrows * ncols * _DOMAIN_ITEMSIZE[wire.domain], what)
    index = _WIRE_DTYPES[pb.DTYPE_INT64]
    _item_count(csr.values, wire, f"{what}: sparse values")
    _item_count(csr.crow_indices, index, f"{what}: crow_indices")
    _item_count(csr.col_indices, index, f"{what}: col_indices")
    values = unpack_le(wire.typecode, csr.values)
    crow = unpack_le("q", csr.crow_indices)
    col = unpack_le("q", csr.col_indices)
    nnz = len(values)
    if len(crow) != nrows + 1 or crow[0] != 0 or crow[-1] != nnz:
        raise InvalidInput(f"{what}: crow_indices must have {nrows + 1} entries running from 0 to {nnz}")
    if len(col) != nnz:
        raise InvalidInput(f"{what}: {len(col)} col_indices for {nnz} values")
    if any(crow[row] > crow[row + 1] for row in range(nrows)):
        raise InvalidInput(f"{what}: crow_indices must not decrease")
    dense = array(values.typecode, bytes(nrows * ncols * wire.itemsize))
    for row in range(nrows):
        base = row * ncols
        for j in range(crow[row], crow[row + 1]):
            c = col[j]
            if not 0 <= c < ncols:
                raise InvalidInput(f"{what}: column index {c} out of range for {ncols} columns")
            dense[base + c] = values[j]
    return dense


def batched_tensor(arrays: Sequence[Array], trailing_shape: tuple[int, ...]) -> pb.BatchedTensor:
    """Concatenate per-datum arrays of one field into a `BatchedTensor` (§7.4).

    Offsets are int64 *byte* offsets into `data`, one per datum plus the end; the SDK rebuilds each
    datum's shape as [elements / prod(trailing_shape), *trailing_shape].
    """
    dtype = arrays[0].dtype
    offsets = [0]
    for arr in arrays:
        offsets.append(offsets[-1] + len(arr.data))
    return pb.BatchedTensor(
        data=b"".join(arr.data for arr in arrays),
        offsets=pack_le("q", offsets),
        dtype=_DOMAIN_TO_PROTO[dtype],
        trailing_shape=list(trailing_shape),
    )
