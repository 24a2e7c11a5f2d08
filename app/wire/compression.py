"""Request-body decompression with a hard cap (tinker-protocol.md §1.3, §7.2).

The SDK zstd-compresses `forward_backward` bodies when `client/config` sets
`proto_compress_fwdbwd`. A few KB of zstd can expand to gigabytes, so the body is inflated in
steps sized to the remaining budget, and fails as soon as the output passes the cap: the frame
header's declared size is only a hint. A frame that ends early is malformed, not a shorter body.
"""

from __future__ import annotations

import zstandard

from app.domain.errors import MalformedRequest, PayloadTooLarge

_IDENTITY = frozenset({"", "identity"})
# The most one compressed byte can inflate to: an RLE block is 4 bytes for up to 128 KiB.
_MAX_RATIO = 1 << 15
_MIN_STEP = 64
_SLACK = 4 << 20  # how far past the cap a hostile body may get before being stopped


def decompress_body(body: bytes, content_encoding: str | None, max_decompressed_bytes: int) -> bytes | bytearray:
    """Return the body as sent before compression, never more than `max_decompressed_bytes` long
    (a bytearray when inflated: copying it into bytes would double the peak memory)."""
    encoding = (content_encoding or "").strip().lower()
    if encoding in _IDENTITY:
        if len(body) > max_decompressed_bytes:
            raise PayloadTooLarge(f"request body is {len(body)} bytes; the limit is {max_decompressed_bytes}")
        return body
    if encoding != "zstd":
        raise MalformedRequest(f"unsupported Content-Encoding {content_encoding!r}: send zstd or none")
    return _inflate_zstd(body, max_decompressed_bytes)


def _inflate_zstd(body: bytes, limit: int) -> bytearray:
    # The declared size, when present, lets an honest oversized body fail before any work.
    try:
        declared = zstandard.frame_content_size(body)
    except zstandard.ZstdError as exc:
        raise MalformedRequest(f"request body is not a valid zstd frame: {exc}") from exc
    if declared > limit:
        raise PayloadTooLarge(f"request body inflates to {declared} bytes; the limit is {limit}")
    # A window larger than the cap is never needed by a legitimate body, and bounds decoder memory.
    window = max(1 << 10, 1 << max(limit - 1, 1).bit_length())
    decompressor = zstandard.ZstdDecompressor(max_window_size=window)
    out = bytearray()
    pending = body
    try:
        while pending:  # one pass per frame: RFC 8878 allows several, back to back
            frame = decompressor.decompressobj()
            offset = 0
            while not frame.eof:
                # A decompressobj has no output cap, so feed it only as much input as can inflate
                # to what the budget still allows; its `eof` also exposes a truncated frame.
                if offset >= len(pending):
                    raise MalformedRequest("zstd request body is truncated")
                step = max(_MIN_STEP, (limit - len(out) + _SLACK) // _MAX_RATIO)
                out += frame.decompress(pending[offset : offset + step])
                offset += step
                if len(out) > limit:
                    raise PayloadTooLarge(f"request body inflates to more than {limit} bytes")
            pending = frame.unused_data + pending[offset:]
    except zstandard.ZstdError as exc:
        raise MalformedRequest(f"request body is not valid zstd data: {exc}") from exc
    return out
