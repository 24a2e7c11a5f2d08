"""Per-row token choice for a decode batch, on the device, with randomness that belongs to the row.

Every row carries its own temperature, top-k, top-p, stop ids and token budget as tensors, so one
step chooses the tokens of all rows with a handful of batched ops and no per-row Python.

Randomness is counter-based: the noise for token v at step t of sample s of a request with seed S
is a hash of (S, s, t, v) turned into Gumbel noise, computed with integer tensor ops. There is no
generator state shared between rows, so a request's tokens do not depend on what else is in the
batch, on the batch order or on how many steps other rows ran; and a stop found late (a stop string
checked a few steps after the fact) cuts the row without changing anything before the cut.
argmax(logits / T + Gumbel) draws from softmax(logits / T) (the Gumbel-max trick), restricted to the
tokens top-k and top-p keep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_M32 = 0xFFFFFFFF


def as_i32(value: int) -> int:
    """The int32 whose bits are the low 32 bits of `value`."""
    value &= _M32
    return value - (1 << 32) if value >= 1 << 31 else value


def _srl(x: torch.Tensor, shift: int) -> torch.Tensor:
    # A logical right shift of int32 bit patterns (torch's >> is arithmetic on negative values).
    return (x >> shift) & ((1 << (32 - shift)) - 1)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) of int32 tensors taken as 32-bit patterns.

    int32, not int64: CPUs vectorise 32-bit multiplies (AVX2 has none for 64 bits) and GPUs do them
    in one instruction. Products wrap modulo 2**32, which is the hash's own arithmetic, and every
    shift is logical, so the CPU and CUDA give the same bits.
    """
    x = x ^ _srl(x, 16)
    x = x * 0x7FEB352D
    x = x ^ _srl(x, 15)
    x = x * as_i32(0x846CA68B)
    return x ^ _srl(x, 16)


@dataclass
class RowParams:
    """Sampling parameters of the rows of a batch, one entry per row."""

    temperature: torch.Tensor  # [B] float32; 0 is greedy
    top_k: torch.Tensor  # [B] int64; >= the allowed vocabulary means off
    top_p: torch.Tensor  # [B] float32; 1 is off
    seed_lo: torch.Tensor  # [B] int32 bit patterns: low and high 32 bits of the request's seed
    seed_hi: torch.Tensor
    sample_index: torch.Tensor  # [B] int32: which of the request's num_samples the row is
    stop_ids: torch.Tensor  # [B, S] int64, padded with -1
    max_tokens: torch.Tensor  # [B] int64
    # The filters' settings on the host too, so deciding which filters a step runs never waits on
    # the device.
    host_top_k: tuple[int, ...]
    host_top_p: tuple[float, ...]

    def select(self, index: torch.Tensor) -> RowParams:
        keep = index.tolist()
        tensors = {
            name: getattr(self, name).index_select(0, index)
            for name in self.__dataclass_fields__
            if not name.startswith("host_")
        }
        return RowParams(
            **tensors,
            host_top_k=tuple(self.host_top_k[i] for i in keep),
            host_top_p=tuple(self.host_top_p[i] for i in keep),
        )


def build_rows(
    rows: list[tuple[float, int, float, int, int, tuple[int, ...], int]], allowed: int, device: torch.device
) -> RowParams:
    """rows: (temperature, top_k, top_p, seed, sample index, stop ids, max_tokens) per row."""
    width = max((len(r[5]) for r in rows), default=0) or 1
    stops = [list(r[5]) + [-1] * (width - len(r[5])) for r in rows]
    seeds = [r[3] % 2**64 for r in rows]

    def longs(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    def ints(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=device)

    top_k = [r[1] if 0 < r[1] < allowed else allowed for r in rows]
    return RowParams(
        temperature=torch.tensor([r[0] for r in rows], dtype=torch.float32, device=device),
        top_k=longs(top_k),
        top_p=torch.tensor([r[2] for r in rows], dtype=torch.float32, device=device),
        seed_lo=ints([as_i32(s) for s in seeds]),
        seed_hi=ints([as_i32(s >> 32) for s in seeds]),
        sample_index=ints([as_i32(r[4]) for r in rows]),
        stop_ids=longs([t for row in stops for t in row]).view(len(rows), width),
        max_tokens=longs([r[6] for r in rows]),
        host_top_k=tuple(top_k),
        host_top_p=tuple(r[2] for r in rows),
    )


def gumbel(rows: RowParams, step: int | torch.Tensor, vocab_hash: torch.Tensor) -> torch.Tensor:
    """Gumbel noise [B, V] for `step`, a function of (seed, sample index, step, token id) only.

    step: a Python int, or a one-element int64 device tensor (a CUDA-graph-captured decode step
    reads the step from a buffer, decode_graph.py); both give the same bits."""
    if isinstance(step, torch.Tensor):
        # Steps stay far below 2**31, where as_i32 is the identity.
        key = mix32(step.to(torch.int32).reshape(1).expand_as(rows.seed_lo))
    else:
        key = mix32(torch.full_like(rows.seed_lo, as_i32(step)))
    key = mix32(rows.seed_lo ^ mix32(rows.seed_hi ^ mix32(rows.sample_index ^ key)))
    bits = mix32(mix32(key[:, None] ^ vocab_hash[None, :]) ^ key[:, None])
    # 24 bits to a uniform in (0, 1), exactly representable in float32, never 0 or 1.
    uniform = (_srl(bits, 8).to(torch.float32) + 0.5) * (1.0 / 2**24)
    return -torch.log(-torch.log(uniform))


def vocab_hashes(allowed: int, device: torch.device) -> torch.Tensor:
    """A per-token-id hash, computed once per batch and mixed with each step's row keys."""
    return mix32(torch.arange(allowed, dtype=torch.int32, device=device) ^ as_i32(0x9E3779B9))


def choose(logits: torch.Tensor, rows: RowParams, step: int | torch.Tensor, vocab_hash: torch.Tensor) -> torch.Tensor:
    """One token per row of float32 logits [B, allowed] (vocabulary padding already sliced off)."""
    greedy = rows.temperature == 0
    scaled = logits / torch.where(greedy, 1.0, rows.temperature)[:, None]
    allowed = logits.shape[-1]
    # The filters keep the argmax, so greedy rows go through them unchanged.
    if min(rows.host_top_k) < allowed:
        kmax = min(max(rows.host_top_k), allowed)
        values = torch.topk(scaled, kmax, dim=-1).values
        kth = values.gather(-1, (rows.top_k.clamp(max=kmax) - 1)[:, None])
        kth = torch.where((rows.top_k < allowed)[:, None], kth, -math.inf)
        scaled = scaled.masked_fill(scaled < kth, -math.inf)  # ties with the k-th stay in, as before
    if min(rows.host_top_p) < 1:
        probs = F.softmax(scaled, dim=-1)
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p: drop a token once the mass before it does.
        drop = ((sorted_probs.cumsum(dim=-1) - sorted_probs) >= rows.top_p[:, None]) & (rows.top_p < 1)[:, None]
        dropped = torch.zeros_like(drop).scatter(-1, order, drop)
        scaled = scaled.masked_fill(dropped, -math.inf)
    noise = gumbel(rows, step, vocab_hash).masked_fill(greedy[:, None], 0.0)
    # argmax takes the first maximum: greedy ties go to the lowest id.
    return (scaled + noise).argmax(dim=-1)


def hits_stop(chosen: torch.Tensor, rows: RowParams) -> torch.Tensor:
    """[B] bool: the chosen token is one of the row's stop ids."""
    return (chosen[:, None] == rows.stop_ids).any(dim=-1)
