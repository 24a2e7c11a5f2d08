"""A decode step of fixed shapes, replayed from a CUDA graph on CUDA (issue 9: decode at the speed of
the GPU's memory, not of Python launching hundreds of small kernels per step).

decode.py's own step is shaped by the live rows: finished rows leave the batch and attention spans
the longest row so far, so every step has new shapes and must be launched op by op from Python.
Here a batch's rows are padded to a bucket (BUCKETS) and its KV cache to a round capacity, and one
step reads and writes only buffers that outlive it: it chooses each row's token from the last
logits (sampler_rows.choose, the step counter read from a device tensor), records the token, its
logprob and top-k at the row's batch position, finds stop ids and spent budgets, runs the decoder over
the RowCache with attention over every slot (the mask, built on the device from the row lengths,
hides the slots past each row) and advances the lengths and the step counter in place. Nothing in
it waits on the host, so on CUDA it is captured once in a torch.cuda.CUDAGraph and replayed.

Finished rows keep running (their outputs past their end are cut on the host, as in decode.py)
until the live rows fall to half the bucket or less; the live rows then move to the first rows of
the same buffers and the batch steps at a smaller bucket (another graph). Padding rows decode
greedily from an empty cache; no op mixes rows, so they change nothing in real rows. The step
writes its outputs per batch position; every SYNC_EVERY steps the host copies the new columns to
the decoder's per-row outputs (decode.py reads those to settle rows and build results).

The buffers and the captured graphs outlive the call (decode_state.py): a later call of the same
shape and adapter layout loads its prompts and parameters into the same buffers and replays the
graphs it finds, without allocating, warming up or capturing.

On the CPU the same step runs without capture (the tests compare it with decode.py's own step). If
capture fails, the batch goes on with the same step uncaptured: a capture bug never fails a sample.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

from workers.engine.decode_state import DecodeStates, Dims, Layout, StepKey, filter_width, stop_width
from workers.engine.logits import _cache_kwarg, project
from workers.engine.lora_rows import routed
from workers.engine.sampler_rows import RowParams, choose, hits_stop

if TYPE_CHECKING:
    from workers.engine.decode import _Decoder

log = logging.getLogger("tuft.engine")

# "off": decode.py's dynamic step; "eager": the static step run op by op; "capture": the static
# step captured in CUDA graphs (CUDA only).
GraphMode = Literal["off", "eager", "capture"]

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CAPACITY_ROUND = 128  # KV slots are allocated in multiples of this
# A graph pays for its warm-up and capture only over enough replays: shorter decodes (and the
# steps left after a late compaction) run uncaptured.
MIN_GRAPH_STEPS = 16
WARMUP_STEPS = 2  # eager steps on a side stream before each capture (lazy inits, kernel autotuning)


def mode_for(graphs: GraphMode, budget: int) -> GraphMode:
    """The mode a batch of `budget` steps decodes with: on CUDA a short batch is not worth a graph,
    and decode.py's dynamic step is the faster uncaptured one there."""
    if graphs == "capture" and budget < MIN_GRAPH_STEPS:
        return "off"
    return graphs


def bucket(rows: int) -> int:
    """The padded batch size for `rows` rows (past the largest bucket: a multiple of it)."""
    for size in BUCKETS:
        if rows <= size:
            return size
    return math.ceil(rows / BUCKETS[-1]) * BUCKETS[-1]


def round_capacity(slots: int) -> int:
    return math.ceil(slots / CAPACITY_ROUND) * CAPACITY_ROUND


def _padded(dst: torch.Tensor, src: torch.Tensor, fill: float | int) -> None:
    """dst[:len(src)] = src, the rest of dst = fill (dst's trailing dims may be wider: filled too)."""
    dst.fill_(fill)
    if src.dim() > 1:
        dst[: src.shape[0], : src.shape[1]] = src
    else:
        dst[: src.shape[0]] = src


def _load_rows(dst: RowParams, src: RowParams, allowed: int, budget: int) -> None:
    """Copy a call's rows into the arena's views; padding rows: greedy, no filter, no stop id."""
    _padded(dst.temperature, src.temperature, 0.0)
    _padded(dst.top_k, src.top_k, allowed)
    _padded(dst.top_p, src.top_p, 1.0)
    _padded(dst.seed_lo, src.seed_lo, 0)
    _padded(dst.seed_hi, src.seed_hi, 0)
    _padded(dst.sample_index, src.sample_index, 0)
    _padded(dst.stop_ids, src.stop_ids, -1)
    _padded(dst.max_tokens, src.max_tokens, budget)


def _moved(t: torch.Tensor, index: torch.Tensor, rows: int, fill: float | int) -> None:
    """Move t's rows at `index` to its first rows (in place) and fill the rows after them up to `rows`."""
    n = index.shape[0]
    t[:n] = t.index_select(0, index)
    t[n:rows] = fill


class StaticRun:
    """Runs a _Decoder's batch with the static step, over buffers kept across calls (decode_state.py)."""

    def __init__(
        self,
        dec: _Decoder,
        prefills: list[tuple[Any, int]],
        capacity: int,
        capture: bool,
        states: DecodeStates | None,
    ) -> None:
        self.dec = dec
        device = dec.lm.device
        self.capture = capture and device.type == "cuda"
        total = len(dec.owner)
        first = prefills[0][0].layers
        layout = Layout(
            kv=tuple((layer.keys.shape[1], layer.keys.shape[3], layer.keys.dtype) for layer in first),
            vocab=dec.logits.shape[-1],
            allowed=dec.allowed,
            device=device,
        )
        self.kmax = filter_width(dec.rows.host_top_k, dec.allowed)
        self.top_p = min(dec.rows.host_top_p) < 1
        stops = stop_width(dec.rows.stop_ids.shape[1])
        dims = Dims(bucket(total), capacity, dec.topk, stops)
        # Without a model's states (a caller of decode_batch that keeps none): a private arena.
        self.states = states if states is not None else DecodeStates(0)
        self.arena, kept = self.states.arena_for(layout, dims)
        # Graphs over a private arena die with the call.
        self.graphs: DecodeStates = self.states if kept else DecodeStates(0)
        if self.capture and self.graphs.pool is None:
            self.graphs.pool = torch.cuda.graph_pool_handle()
        self.positions = list(range(total))  # batch position -> output row
        self.synced = 0  # output columns copied to the decoder's rows
        self._use(dims.rows, capacity)
        buf = self.buf
        buf.cache.host_lengths = [0] * dims.rows
        buf.cache.lengths.zero_()
        row = 0
        for cache, n in prefills:
            length = cache.layers[0].keys.shape[2]
            for layer, (k, v) in enumerate(zip(buf.cache.keys, buf.cache.values, strict=True)):
                prompt_k, prompt_v = cache.layers[layer].keys[0], cache.layers[layer].values[0]
                k[row : row + n, :, : prompt_k.shape[1]] = prompt_k
                v[row : row + n, :, : prompt_v.shape[1]] = prompt_v
            buf.cache.lengths[row : row + n] = length
            buf.cache.host_lengths[row : row + n] = [length] * n
            row += n
        _load_rows(buf.params, dec.rows, dec.allowed, dec.budget)
        _padded(buf.logits, dec.logits, 0.0)
        dec.logits = dec.logits[:0]  # copied: the first logits of a large batch are not small
        buf.step.zero_()
        buf.stopped_at.fill_(-1)
        buf.by_length.fill_(False)

    def _use(self, rows: int, capacity: int) -> None:
        """Step over the arena's views for a batch of `rows` rows (after loading or compacting)."""
        dec = self.dec
        segments = dec.segments(self.positions + [self.positions[-1]] * (rows - len(self.positions)))
        adapters: tuple[object, ...]
        if dec.route:
            adapters = ("routed", *segments)
        elif dec.requests[0].job.adapter is None:
            adapters = ("base",)
        else:
            adapters = ("one", dec.requests[0].job.adapter)
        stops = stop_width(dec.rows.stop_ids.shape[1])
        key = StepKey(rows, capacity, dec.topk, stops, self.kmax, self.top_p, adapters)
        self.buf = self.arena.view(key)
        self.segments = segments
        self.warm = 0  # eager steps run at the current key (a capture waits for WARMUP_STEPS)

    def run(self, sync_every: int) -> None:
        dec = self.dec
        for step in range(dec.budget):
            self._advance()
            if (step + 1) % sync_every == 0 or step + 1 == dec.budget:
                self._sync(step + 1)
                keep = dec.settle(step)
                if not keep:
                    return
                dec.live = [dec.live[p] for p in keep]
                left = dec.budget - step - 1
                size = self.buf.key.rows
                if len(dec.live) <= size // 2 and (not self.capture or left >= MIN_GRAPH_STEPS):
                    self._compact(bucket(len(dec.live)))

    def _sync(self, end: int) -> None:
        """Copy the outputs of steps [synced, end) to the decoder's rows (settle and collect read them)."""
        dec, buf, n = self.dec, self.buf, len(self.positions)
        lo, self.synced = self.synced, end
        rows = torch.tensor(self.positions, dtype=torch.int64, device=buf.step.device)
        dec.tokens[rows, lo:end] = buf.tokens[:n, lo:end]
        dec.logprobs[rows, lo:end] = buf.logprobs[:n, lo:end]
        if dec.topk:
            dec.top_ids[rows, lo:end] = buf.top_ids[:n, lo:end]
            dec.top_lps[rows, lo:end] = buf.top_lps[:n, lo:end]
        dec.stopped_at[rows] = buf.stopped_at[:n]
        dec.by_length[rows] = buf.by_length[:n]

    def _advance(self) -> None:
        key = self.buf.key
        entry = self.graphs.graph(key)
        if not self.capture:
            if entry is None:
                self.graphs.keep(key, "eager")  # counted, so the CPU tests see keys reused
            self._step()
            return
        if isinstance(entry, torch.cuda.CUDAGraph):
            entry.replay()
            return
        if self.warm >= WARMUP_STEPS:
            graph = self._captured()
            if graph is not None:
                self.graphs.keep(key, graph)
                graph.replay()  # capture records and runs nothing: this step runs now
                return
        # Warm-up steps are real steps, run on a side stream as torch.cuda.graphs asks.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.warm += 1

    def _captured(self) -> torch.cuda.CUDAGraph | None:
        """The step captured in a CUDA graph; None, and no more capturing in this call, when capture
        fails."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.graphs.pool):
                self._step()
        except Exception:
            log.warning("capturing the decode step failed; this batch decodes without CUDA graphs", exc_info=True)
            self.capture = False
            torch.cuda.synchronize()
            return None
        return graph

    def _compact(self, size: int) -> None:
        """Move the live rows to the first positions of a batch of `size` rows (in the same arena)."""
        dec, buf = self.dec, self.buf
        where = {row: pos for pos, row in enumerate(self.positions)}
        index = torch.tensor([where[row] for row in dec.live], dtype=torch.int64, device=buf.step.device)
        for k, v in zip(buf.cache.keys, buf.cache.values, strict=True):  # layer by layer: small temporaries
            _moved(k, index, size, 0)
            _moved(v, index, size, 0)
        _moved(buf.cache.lengths, index, size, 0)
        host = [buf.cache.host_lengths[i] for i in index.tolist()]
        p = buf.params
        for name, fill in (
            ("temperature", 0.0),
            ("top_k", dec.allowed),
            ("top_p", 1.0),
            ("seed_lo", 0),
            ("seed_hi", 0),
            ("sample_index", 0),
            ("stop_ids", -1),
            ("max_tokens", dec.budget),
        ):
            _moved(getattr(p, name), index, size, fill)
        _moved(buf.logits, index, size, 0.0)
        # Live rows have not stopped on the device (settle keeps only those).
        buf.stopped_at.fill_(-1)
        buf.by_length.fill_(False)
        self.positions = list(dec.live)
        self._use(size, buf.key.capacity)
        self.buf.cache.host_lengths = host + [0] * (size - len(host))

    def _step(self) -> None:
        """One decode step over the arena's views; no host sync, no shape that depends on data."""
        dec, buf = self.dec, self.buf
        rows, step, logits = buf.params, buf.step, buf.logits
        at = (torch.arange(buf.key.rows, device=step.device), step.expand(buf.key.rows))
        chosen = choose(logits[:, : dec.allowed], rows, step, buf.vocab_hash)
        logprobs = F.log_softmax(logits, dim=-1)
        buf.tokens.index_put_(at, chosen)
        buf.logprobs.index_put_(at, logprobs.gather(-1, chosen[:, None])[:, 0])
        if buf.key.topk:
            top = torch.topk(logprobs, buf.key.topk, dim=-1)
            buf.top_ids.index_put_(at, top.indices)
            buf.top_lps.index_put_(at, top.values)
        stop = hits_stop(chosen, rows)
        spent = rows.max_tokens <= step + 1
        fresh = (buf.stopped_at < 0) & (stop | spent)
        buf.stopped_at.copy_(torch.where(fresh, step, buf.stopped_at))
        buf.by_length.copy_(torch.where(fresh, spent & ~stop, buf.by_length))

        model, cache = dec.lm.model, buf.cache
        mask = cache.step_mask(cache.capacity, dec.dtype, dec.eager)
        masks: torch.Tensor | dict[str, torch.Tensor] = mask
        if dec.window:
            masks = {
                "full_attention": mask,
                "sliding_attention": cache.step_mask(cache.capacity, dec.dtype, dec.eager, dec.window),
            }
        decoder = model.get_decoder()
        # Padding rows ride with the last live row's adapter (routing needs every row covered).
        with routed(self.segments) if dec.route else nullcontext():
            out = decoder(
                input_ids=chosen[:, None],
                position_ids=cache.lengths[:, None],
                attention_mask=masks,
                use_cache=True,
                **{_cache_kwarg(decoder): cache},
            )
            logits.copy_(project(model, out.last_hidden_state[:, -1]))
        cache.lengths.add_(1)
        step.add_(1)
