"""A decode step of fixed shapes, replayed from a CUDA graph on CUDA (issue 9: decode at the speed of
the GPU's memory, not of Python launching hundreds of small kernels per step).

decode.py's own step is shaped by the live rows: finished rows leave the batch and attention spans
the longest row so far, so every step has new shapes and must be launched op by op from Python.
Here a batch's rows are padded to a bucket (BUCKETS) and its KV cache to a round capacity, and one
step reads and writes only buffers that outlive it: it chooses each row's token from the last
logits (sampler_rows.choose, the step counter read from a device tensor), records the token, its
logprob and top-k at the row's output slot, finds stop ids and spent budgets, runs the decoder over
the RowCache with attention over every slot (the mask, built on the device from the row lengths,
hides the slots past each row) and advances the lengths and the step counter in place. Nothing in
it waits on the host, so on CUDA it is captured once in a torch.cuda.CUDAGraph and replayed.

Finished rows keep running (their outputs past their end are cut on the host, as in decode.py)
until the live rows fall to half the bucket or less; the batch then moves to a smaller bucket and
the step is captured again. Padding rows decode greedily from an empty cache and write their
outputs to the spare output row decode.py allocates; no op mixes rows, so they change nothing in
real rows. A graph also bakes in the LoRA routing segments and the adapters' weights (lora_rows.py),
so it lives for one batch and one row layout only.

On the CPU the same step runs without capture (the tests compare it with decode.py's own step). If
capture fails, the batch goes on with the same step uncaptured: a capture bug never fails a sample.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from workers.engine.logits import _cache_kwarg, project
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


def _taken(t: torch.Tensor, index: torch.Tensor, rows: int, fill: float | int) -> torch.Tensor:
    out = t.new_full((rows, *t.shape[1:]), fill)
    out[: index.shape[0]] = t.index_select(0, index)
    return out


def padded_rows(rows: RowParams, index: torch.Tensor, size: int, allowed: int, budget: int) -> RowParams:
    """rows[index], then padding rows up to `size`: greedy, no filter, no stop id."""
    keep = index.tolist()
    pad = size - len(keep)
    return RowParams(
        temperature=_taken(rows.temperature, index, size, 0.0),
        top_k=_taken(rows.top_k, index, size, allowed),
        top_p=_taken(rows.top_p, index, size, 1.0),
        seed_lo=_taken(rows.seed_lo, index, size, 0),
        seed_hi=_taken(rows.seed_hi, index, size, 0),
        sample_index=_taken(rows.sample_index, index, size, 0),
        stop_ids=_taken(rows.stop_ids, index, size, -1),
        max_tokens=_taken(rows.max_tokens, index, size, budget),
        host_top_k=tuple(rows.host_top_k[i] for i in keep) + (allowed,) * pad,
        host_top_p=tuple(rows.host_top_p[i] for i in keep) + (1.0,) * pad,
    )


class StaticRun:
    """Runs a _Decoder's batch (its RowCache already padded to a bucket) with the static step."""

    def __init__(self, dec: _Decoder, capture: bool) -> None:
        self.dec = dec
        device = dec.lm.device
        self.capture = capture and device.type == "cuda"
        self.step = torch.zeros(1, dtype=torch.int64, device=device)  # the step counter, on the device
        total = len(dec.owner)
        size = dec.cache.keys[0].shape[0]
        index = torch.arange(total, device=device)
        self.rows = padded_rows(dec.rows, index, size, dec.allowed, dec.budget)
        self.logits = _taken(dec.logits, index, size, 0.0)
        dec.logits = dec.logits[:0]  # copied: the first logits of a large batch are not small
        # Batch position -> output row; padding rows write to the spare row `total`.
        self.positions = list(range(total))
        self.row_id = _taken(index, index, size, total)
        dec.cache.full_width()
        self.dtype = next(dec.lm.model.parameters()).dtype
        self.graph: torch.cuda.CUDAGraph | None = None
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.warm = 0  # eager steps run at the current shapes

    def run(self, sync_every: int) -> None:
        dec = self.dec
        for step in range(dec.budget):
            self._advance()
            if (step + 1) % sync_every == 0 or step + 1 == dec.budget:
                keep = dec.settle(step)
                if not keep:
                    return
                dec.live = [dec.live[p] for p in keep]
                left = dec.budget - step - 1
                size = self.row_id.shape[0]
                if len(dec.live) <= size // 2 and (not self.capture or left >= MIN_GRAPH_STEPS):
                    self._compact(bucket(len(dec.live)))
        self.graph = None

    def _advance(self) -> None:
        if not self.capture:
            self._step()
            return
        if self.graph is None and self.warm >= WARMUP_STEPS:
            self.graph = self._captured()
        if self.graph is not None:
            self.graph.replay()
            return
        # Warm-up steps are real steps, run on a side stream as torch.cuda.graphs asks.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.warm += 1

    def _captured(self) -> torch.cuda.CUDAGraph | None:
        """The step captured in a CUDA graph (capture records and runs nothing); None, and no more
        capturing for this batch, when capture fails."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                self._step()
        except Exception:
            log.warning("capturing the decode step failed; this batch decodes without CUDA graphs", exc_info=True)
            self.capture = False
            torch.cuda.synchronize()
            return None
        return graph

    def _compact(self, size: int) -> None:
        """Move the live rows to the first positions of a batch of `size` rows."""
        dec = self.dec
        where = {row: pos for pos, row in enumerate(self.positions)}
        index = torch.tensor([where[row] for row in dec.live], dtype=torch.int64, device=self.step.device)
        self.graph = None  # its buffers are replaced below
        dec.cache.take(index, size)
        self.rows = padded_rows(self.rows, index, size, dec.allowed, dec.budget)
        self.logits = _taken(self.logits, index, size, 0.0)
        self.row_id = _taken(self.row_id, index, size, len(dec.owner))
        self.positions = list(dec.live)
        self.warm = 0

    def _step(self) -> None:
        """One decode step over the static buffers; no host sync, no shape that depends on data."""
        dec, rows, step, row_id = self.dec, self.rows, self.step, self.row_id
        logits = self.logits
        chosen = choose(logits[:, : dec.allowed], rows, step, dec.vocab_hash)
        logprobs = F.log_softmax(logits, dim=-1)
        at = (row_id, step.expand(row_id.shape[0]))
        dec.tokens.index_put_(at, chosen)
        dec.logprobs.index_put_(at, logprobs.gather(-1, chosen[:, None])[:, 0])
        if dec.topk:
            top = torch.topk(logprobs, dec.topk, dim=-1)
            dec.top_ids.index_put_(at, top.indices)
            dec.top_lps.index_put_(at, top.values)
        stop = hits_stop(chosen, rows)
        spent = rows.max_tokens <= step + 1
        before = dec.stopped_at.index_select(0, row_id)
        fresh = (before < 0) & (stop | spent)
        dec.stopped_at.index_put_((row_id,), torch.where(fresh, step, before))
        by_length = dec.by_length.index_select(0, row_id)
        dec.by_length.index_put_((row_id,), torch.where(fresh, spent & ~stop, by_length))

        model, cache = dec.lm.model, dec.cache
        mask = cache.step_mask(cache.capacity, self.dtype, dec.eager)
        masks: torch.Tensor | dict[str, torch.Tensor] = mask
        if dec.window:
            masks = {
                "full_attention": mask,
                "sliding_attention": cache.step_mask(cache.capacity, self.dtype, dec.eager, dec.window),
            }
        decoder = model.get_decoder()
        # Padding rows ride with the last live row's adapter (routing needs every row covered).
        positions = self.positions + [self.positions[-1]] * (row_id.shape[0] - len(self.positions))
        with dec.routed(positions):
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
