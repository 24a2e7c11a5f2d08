"""The static decode step's buffers and captured graphs, kept across sample calls (issue 9).

Rebuilding them on every call dominated short calls: a batch-1 sample of 128 tokens paid for a KV
cache allocation, two warm-up steps and a CUDA-graph capture before its first replay. Here each
loaded base model keeps one `Arena` (every buffer the static step reads or writes: K/V slots, row
lengths, the step counter, the last logits, the rows' sampling parameters, per-position outputs)
and the graphs captured over it, keyed by everything a graph bakes in (`StepKey`). A later call of
a known shape only copies its prompts and parameters into the arena and replays.

Shapes. The arena is allocated at the largest (rows, capacity, top-k, stop width) seen so far; a
step of a smaller batch works on views of it ([:rows, :, :capacity]): a view's addresses never
move while the arena lives, so a graph captured over views stays valid for every later call of its
key. An arena that must grow is reallocated, and every graph over the old one is dropped. An arena
above the memory limit (EngineConfig.decode_cache_bytes) is not kept: the call gets a private one,
dropped with its graphs when the call ends (the behaviour before graphs were kept).

Adapters. A captured step bakes in the addresses of the LoRA weights it reads and, for routed
batches, the row segments of each adapter (lora_rows.py): the key names the adapter layout
("base", one adapter, or the segments), so a graph only ever replays for the same layout. A
sampler adapter's weights are loaded once and never rewritten in place (a re-saved folder is a new
adapter, sampler.py), so the same name means the same weights, until the name is evicted:
`forget(name)` drops every graph that reads it before its weights are freed, so no graph outlives
the memory it points at. Binding adapter weights into fixed bank buffers (one graph for any
layout, a per-row adapter index) is the next step for continuous batching; it needs a gathered
LoRA kernel instead of lora_rows' segment slices.

Graphs of one model share one memory pool: only the step's temporaries live there (everything
that outlives a step is an arena buffer), and calls are serialised, so graphs never run at once.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, NamedTuple

import torch

from workers.engine.kv_cache import RowCache
from workers.engine.sampler_rows import RowParams, vocab_hashes

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE

MAX_GRAPHS = 32  # captured steps kept per model (LRU); each costs only its kernel records
CPU_LIMIT = 1 << 30  # the arena kept on the CPU at most, in bytes
CUDA_FRACTION = 0.25  # ... and on CUDA, as a fraction of the device's memory


def cache_limit(setting: int | None, device: torch.device) -> int:
    """The arena bytes kept across calls: the setting, else a quarter of the GPU or CPU_LIMIT."""
    if setting is not None:
        return setting
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * CUDA_FRACTION)
    return CPU_LIMIT


class StepKey(NamedTuple):
    """Everything a captured step bakes in beyond the arena's addresses."""

    rows: int  # the bucket
    capacity: int  # KV slots attended
    topk: int  # top-k logprobs recorded per position
    stops: int  # stop ids per row
    kmax: int  # the top-k filter's width (0: no row filters by top-k)
    top_p: bool  # whether any row filters by top-p
    adapters: tuple[object, ...]  # ("base",), ("one", name) or ("routed", *segments)

    def names(self) -> set[str]:
        if self.adapters[0] == "one":
            return {str(self.adapters[1])}
        if self.adapters[0] == "routed":
            return {str(seg[0]) for seg in self.adapters[1:]}  # type: ignore[index]
        return set()


@dataclass(frozen=True)
class Dims:
    rows: int
    capacity: int
    topk: int
    stops: int

    def covers(self, other: Dims) -> bool:
        return all(getattr(self, f.name) >= getattr(other, f.name) for f in fields(self))

    def union(self, other: Dims) -> Dims:
        return Dims(*(max(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)))


@dataclass(frozen=True)
class Layout:
    """What the arena's buffers hold per row and slot: K/V heads and dims per layer, vocabulary."""

    kv: tuple[tuple[int, int, torch.dtype], ...]  # per layer: (heads, head dim, dtype)
    vocab: int  # the logits' width
    allowed: int  # token ids that may be sampled
    device: torch.device

    def nbytes(self, dims: Dims) -> int:
        kv = sum(2 * dims.rows * h * dims.capacity * d * torch.empty(0, dtype=t).element_size() for h, d, t in self.kv)
        per_row = 4 * self.vocab + 8 * dims.capacity * 3 + 12 * dims.capacity * dims.topk + 8 * dims.stops + 64
        return kv + dims.rows * per_row


class Arena:
    """Every buffer of the static step, at `dims`; views of it serve smaller batches."""

    def __init__(self, layout: Layout, dims: Dims) -> None:
        self.layout, self.dims = layout, dims
        rows, cap, device = dims.rows, dims.capacity, layout.device

        def zeros(*shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            # Zeros, not empty: masked K/V slots are multiplied by a zero weight, and 0 * NaN is NaN.
            return torch.zeros(shape, dtype=dtype, device=device)

        self.keys = [zeros(rows, h, cap, d, dtype=t) for h, d, t in layout.kv]
        self.values = [zeros(rows, h, cap, d, dtype=t) for h, d, t in layout.kv]
        self.lengths = zeros(rows)
        self.step = zeros(1)
        self.logits = zeros(rows, layout.vocab, dtype=torch.float32)
        self.params = RowParams(
            temperature=zeros(rows, dtype=torch.float32),
            top_k=zeros(rows),
            top_p=zeros(rows, dtype=torch.float32),
            seed_lo=zeros(rows, dtype=torch.int32),
            seed_hi=zeros(rows, dtype=torch.int32),
            sample_index=zeros(rows, dtype=torch.int32),
            stop_ids=zeros(rows, dims.stops),
            max_tokens=zeros(rows),
            host_top_k=(),
            host_top_p=(),
        )
        self.tokens = zeros(rows, cap)
        self.logprobs = zeros(rows, cap, dtype=torch.float32)
        self.top_ids = zeros(rows, cap, dims.topk)
        self.top_lps = zeros(rows, cap, dims.topk, dtype=torch.float32)
        self.stopped_at = zeros(rows)
        self.by_length = zeros(rows, dtype=torch.bool)
        self.vocab_hash = vocab_hashes(layout.allowed, device)

    def view(self, key: StepKey) -> Buffers:
        return Buffers(self, key)


class Buffers:
    """The arena's views for one step shape: what a StaticRun reads and writes (decode_graph.py)."""

    def __init__(self, arena: Arena, key: StepKey) -> None:
        rows, cap, allowed = key.rows, key.capacity, arena.layout.allowed
        self.key = key
        self.cache = RowCache(cap, arena.layout.device)
        self.cache.keys = [k[:rows, :, :cap] for k in arena.keys]
        self.cache.values = [v[:rows, :, :cap] for v in arena.values]
        self.cache.lengths = arena.lengths[:rows]
        self.cache.host_lengths = [0] * rows
        self.cache.full_width()
        self.step = arena.step
        self.logits = arena.logits[:rows]
        p = arena.params
        # host_top_k / host_top_p only choose which filters the step runs (sampler_rows.choose):
        # here they are the key's, so every call of the key runs the captured filters.
        self.params = RowParams(
            temperature=p.temperature[:rows],
            top_k=p.top_k[:rows],
            top_p=p.top_p[:rows],
            seed_lo=p.seed_lo[:rows],
            seed_hi=p.seed_hi[:rows],
            sample_index=p.sample_index[:rows],
            stop_ids=p.stop_ids[:rows, : key.stops],
            max_tokens=p.max_tokens[:rows],
            host_top_k=(key.kmax if key.kmax else allowed,),
            host_top_p=(0.5 if key.top_p else 1.0,),
        )
        self.tokens = arena.tokens[:rows, :cap]
        self.logprobs = arena.logprobs[:rows, :cap]
        self.top_ids = arena.top_ids[:rows, :cap, : key.topk]
        self.top_lps = arena.top_lps[:rows, :cap, : key.topk]
        self.stopped_at = arena.stopped_at[:rows]
        self.by_length = arena.by_length[:rows]
        self.vocab_hash = arena.vocab_hash


def filter_width(host_top_k: tuple[int, ...], allowed: int) -> int:
    """The top-k filter's width for a key: 0 when no row filters, else the largest k rounded up to
    a power of two (a wider top-k gives the same k-th value), so nearby k share one graph."""
    real = [k for k in host_top_k if k < allowed]
    if not real:
        return 0
    kmax = max(real)
    rounded = 1 << math.ceil(math.log2(kmax))
    return rounded if rounded < allowed else kmax


def stop_width(width: int) -> int:
    return 1 << math.ceil(math.log2(max(1, width)))


class DecodeStates:
    """One base model's arena and captured steps, kept across calls (see the module docstring)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.arena: Arena | None = None
        self.graphs: OrderedDict[StepKey, object] = OrderedDict()
        self.pool: _POOL_HANDLE | None = None  # shared by this model's graphs
        # Counters for tests and benchmarks: arenas allocated, steps captured (or, uncaptured,
        # first run) per key, and calls that got a private arena.
        self.allocations = 0
        self.builds = 0
        self.private = 0

    def arena_for(self, layout: Layout, dims: Dims) -> tuple[Arena, bool]:
        """An arena covering `dims`, and whether it is kept (False: private to this call)."""
        arena = self.arena
        if arena is not None and arena.layout == layout and arena.dims.covers(dims):
            return arena, True
        grown = dims if arena is None or arena.layout != layout else arena.dims.union(dims)
        for want in (grown, dims):
            if layout.nbytes(want) <= self.limit:
                self.clear()  # the old arena's graphs point at it
                self.arena = Arena(layout, want)
                self.allocations += 1
                return self.arena, True
        self.private += 1
        return Arena(layout, dims), False

    def graph(self, key: StepKey) -> object | None:
        entry = self.graphs.get(key)
        if entry is not None:
            self.graphs.move_to_end(key)
        return entry

    def keep(self, key: StepKey, entry: object) -> None:
        self.builds += 1
        self.graphs[key] = entry
        while len(self.graphs) > MAX_GRAPHS:
            self.graphs.popitem(last=False)

    def forget(self, adapter: str) -> None:
        """Drop every step that reads `adapter`'s weights (before the adapter is removed)."""
        for key in [k for k in self.graphs if adapter in k.names()]:
            del self.graphs[key]

    def clear(self) -> None:
        """Drop the arena and every graph (free_memory, a model unloaded, an arena that grows)."""
        self.graphs.clear()
        self.arena = None
        self.pool = None
