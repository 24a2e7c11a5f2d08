"""Batched decoding: many sample requests, each with its own prompt, parameters and adapter, in one
decode batch over one KV cache (kv_cache.py), tokens chosen per row on the device (sampler_rows.py).

Each request's prompt is prefilled once (its extras are scored from that same prefill, as in
sampling.py) and copied into num_samples rows of the batch cache. Decode steps then run every live
row through the model together; rows are grouped by adapter, and a pass routes each group through
its own LoRA (lora_rows.py), so base weights are read once per step for all adapters.

The host looks at the batch only every SYNC_EVERY steps: it reads which rows stopped (stop ids and
budgets are found on the device), checks stop strings on the tokens generated since (detokenizing
is off the per-step path), and drops finished rows from the batch. A stop found late only cuts the
row: tokens after it are discarded and nothing before it depended on them (the noise of a position
is a function of the row's seed, sample index and step alone).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from app.domain.ops import SampleOp
from app.domain.results import SampledSequence, SampleResult
from workers.engine import decode_graph
from workers.engine.base_models import LoadedModel
from workers.engine.decode_graph import GraphMode
from workers.engine.decode_state import DecodeStates
from workers.engine.kv_cache import RowCache
from workers.engine.logits import _cache_kwarg, decoder_hidden, project
from workers.engine.lora_rows import RowRouter, routed
from workers.engine.prompt_scoring import PromptScores, score_prompt, topk_table
from workers.engine.sampler_rows import build_rows, choose, hits_stop, vocab_hashes

SYNC_EVERY = 8  # decode steps between host looks at the batch (stop strings, finished rows)
# Rows of one decode batch at most: 32 requests of 64 samples would otherwise need 2,048 rows of
# KV cache and [rows, vocabulary] float32 logits (1.2 GB) at once.
MAX_ROWS = 256

# (adapter name, first row, end row) of a batch, rows grouped by adapter.
Segments = list[tuple[str, int, int]]


@dataclass(frozen=True)
class SampleJob:
    """One validated request: its op, its token budget (resolve_max_tokens) and its adapter."""

    op: SampleOp
    max_tokens: int
    adapter: str | None


@dataclass
class _Request:
    job: SampleJob
    seed: int
    scores: PromptScores
    first_rows: int = 0  # its first row in the batch
    ends: list[int] = field(default_factory=list)  # per sample: index of its last token, -1 if none yet
    reasons: list[Literal["stop", "length"]] = field(default_factory=list)
    sequences: list[SampledSequence | None] = field(default_factory=list)


@dataclass(frozen=True)
class SampleRequest:
    """What TorchEngine.sample_many takes: a sample op on a base model, with a saved adapter or not."""

    base_model: str
    adapter: Path | None
    op: SampleOp


def adapter_chunks(adapters: Sequence[Path | None], indices: Sequence[int], limit: int) -> list[list[int]]:
    """Split `indices` (in order) into runs naming at most `limit` distinct adapters each, so that
    loading one chunk's adapters never evicts another adapter of the same chunk from the LRU."""
    chunks: list[list[int]] = []
    seen: set[str] = set()
    for adapter, index in zip(adapters, indices, strict=True):
        key = "" if adapter is None else str(Path(adapter).resolve())
        if not chunks or (key not in seen and len(seen) >= limit):
            chunks.append([])
            seen = set()
        seen.add(key)
        chunks[-1].append(index)
    return chunks


def decode_batch(
    lm: LoadedModel,
    jobs: Sequence[SampleJob],
    activate: Callable[[str | None], None],
    router: RowRouter | None,
    graphs: GraphMode = "off",
    states: DecodeStates | None = None,
) -> list[SampleResult]:
    """Run `jobs` as one batch; results in the order of `jobs`.

    activate(name): make PEFT route whole passes through adapter `name` (None: the base model); the
    prefills use it. router: routes the decode's rows through their own adapters (lora_rows.py);
    None when the jobs all use one adapter, which is then activated for the whole decode.
    graphs: "off" decodes with steps shaped to the live rows (below); "eager" / "capture" with the
    static-shape step of decode_graph.py, run as it is or captured in CUDA graphs.
    states: the model's static-step buffers and graphs kept across calls (decode_state.py); None:
    the static step allocates its own for this call.
    """
    order = sorted(range(len(jobs)), key=lambda i: (jobs[i].adapter is not None, jobs[i].adapter or ""))
    requests: dict[int, _Request] = {}
    prefills: list[tuple[DynamicCache, int]] = []
    first_logits: list[torch.Tensor] = []
    model = lm.model
    with torch.no_grad():
        for i in order:
            job = jobs[i]
            seed = job.op.params.seed if job.op.params.seed is not None else secrets.randbits(63)
            activate(job.adapter)
            cache = DynamicCache(config=model.config)
            prompt = torch.tensor([job.op.prompt], dtype=torch.int64, device=lm.device)
            hidden = decoder_hidden(model, prompt, cache=cache)[0]  # [P, H]
            request = _Request(job, seed, score_prompt(lm, job.op, hidden, seed))
            requests[i] = request
            n = job.op.num_samples
            request.ends = [-1] * n
            request.reasons = ["length"] * n
            request.sequences = [None] * n
            if job.max_tokens > 0:
                request.first_rows = sum(k for _, k in prefills)
                prefills.append((cache, n))
                first_logits.append(project(model, hidden[-1:]).expand(n, -1))
        live = [requests[i] for i in order if jobs[i].max_tokens > 0]
        if live and row_cache_fits(model):
            for lo, hi in _row_chunks([r.job.op.num_samples for r in live]):
                activate(live[lo].job.adapter)
                logits = torch.cat(first_logits[lo:hi])
                decoder = _Decoder(
                    lm, live[lo:hi], prefills[lo:hi], logits, router is not None, graphs=graphs, states=states
                )
                for k in range(lo, hi):  # copied into the batch cache: free the prompt's own
                    prefills[k] = (DynamicCache(config=model.config), 0)
                    first_logits[k] = first_logits[k][:0]
                # No adapter is PEFT-active inside router.batch: the routing hooks add every row's own.
                with router.batch([]) if router is not None else nullcontext():
                    decoder.run()
                decoder.collect()
        else:
            # Architectures the row cache is not known to fit decode request by request through
            # HF's own cache: the same per-row choice and noise, so the same tokens for a seed.
            for request, prefill, logits in zip(live, prefills, first_logits, strict=True):
                activate(request.job.adapter)
                decoder = _Decoder(lm, [request], [prefill], logits, False, own=prefill[0])
                decoder.run()
                decoder.collect()
    return [_result(requests[i]) for i in range(len(jobs))]


def _row_chunks(rows: list[int]) -> list[tuple[int, int]]:
    """Consecutive requests with at most MAX_ROWS rows together (a request alone may exceed it)."""
    chunks: list[tuple[int, int]] = []
    lo, total = 0, 0
    for i, n in enumerate(rows):
        if i > lo and total + n > MAX_ROWS:
            chunks.append((lo, i))
            lo, total = i, 0
        total += n
    chunks.append((lo, len(rows)))
    return chunks


# Decoders whose attention layers call cache.update(key, value, layer_idx) with position ids and a
# ready mask mapping, as kv_cache.RowCache expects (checked against HF's own decode in tests).
ROW_CACHE_MODELS = frozenset({"qwen3", "qwen2", "llama", "mistral", "qwen3_moe", "mixtral", "olmo2", "granite", "phi3"})


def row_cache_fits(model: PreTrainedModel) -> bool:
    config = model.config
    attention = getattr(config, "_attn_implementation", None)
    sliding = bool(getattr(config, "sliding_window", None)) and config.model_type not in _MASK_MAPPING_MODELS
    return config.model_type in ROW_CACHE_MODELS and attention in ("sdpa", "eager", None) and not sliding


# Models whose decoder takes a mask per layer type ({"full_attention": ..., "sliding_attention": ...}).
_MASK_MAPPING_MODELS = frozenset({"qwen3", "qwen2", "qwen3_moe"})


class _Decoder:
    def __init__(
        self,
        lm: LoadedModel,
        requests: list[_Request],
        prefills: list[tuple[DynamicCache, int]],
        logits: torch.Tensor,
        route: bool,
        own: DynamicCache | None = None,
        graphs: GraphMode = "off",
        states: DecodeStates | None = None,
    ) -> None:
        """own: decode one request's rows in its own prefill cache (HF's) instead of a RowCache.
        graphs: decode with decode_graph.py's static step ("eager" / "capture") or not ("off"), over
        `states` (decode_state.py)."""
        self.lm, self.requests, self.route, self.logits = lm, requests, route, logits
        device = lm.device
        self.allowed = min(lm.vocab_size, len(lm.tokenizer))
        # Every row: (request, sample index), in batch order.
        self.owner = [(r, s) for r in requests for s in range(r.job.op.num_samples)]
        self.budget = max(r.job.max_tokens for r in requests)
        capacity = max(len(r.job.op.prompt) for r in requests) + self.budget
        total = len(self.owner)
        self.graphs = decode_graph.mode_for(graphs, self.budget) if own is None else "off"
        self.cache = RowCache(capacity, device)
        self.own = own
        if own is not None:
            own.batch_repeat_interleave(prefills[0][1])
        elif self.graphs == "off":  # (the static step loads the prefills into its own buffers)
            self.cache.fill(prefills)
        self.rows = build_rows(
            [
                (
                    r.job.op.params.temperature,
                    r.job.op.params.top_k,
                    r.job.op.params.top_p,
                    r.seed,
                    s,
                    _stop_ids(lm, r.job.op),
                    r.job.max_tokens,
                )
                for r, s in self.owner
            ],
            self.allowed,
            device,
        )
        self.vocab_hash = vocab_hashes(self.allowed, device)
        self.topk = min(max(r.job.op.topk_sample_logprobs for r in requests), lm.vocab_size)
        # Per row; the static step writes per batch position in its own buffers and copies here.
        slots = total
        self.tokens = torch.zeros(slots, self.budget, dtype=torch.int64, device=device)
        self.logprobs = torch.zeros(slots, self.budget, dtype=torch.float32, device=device)
        self.top_ids = torch.zeros(slots, self.budget, self.topk, dtype=torch.int64, device=device)
        self.top_lps = torch.zeros(slots, self.budget, self.topk, dtype=torch.float32, device=device)
        # Step at which a row hit a stop id (-1: not yet) or used its budget, found on the device.
        self.stopped_at = torch.full((slots,), -1, dtype=torch.int64, device=device)
        self.by_length = torch.zeros(slots, dtype=torch.bool, device=device)
        self.live = list(range(total))  # batch position -> row id
        self.live_index = torch.arange(total, device=device)
        self.checked = [0] * total  # next position whose stop strings are unchecked
        eager = getattr(lm.model.config, "_attn_implementation", None) == "eager"
        self.eager = eager
        self.window = getattr(lm.model.config, "sliding_window", None)
        self.dtype = next(lm.model.parameters()).dtype
        self.static: decode_graph.StaticRun | None = None
        if self.graphs != "off":
            # The static step's shapes: rows padded to a bucket, slots to a round capacity.
            capture = self.graphs == "capture"
            self.static = decode_graph.StaticRun(self, prefills, decode_graph.round_capacity(capacity), capture, states)

    def run(self) -> None:
        if self.static is not None:
            self.static.run(SYNC_EVERY)
            return
        for step in range(self.budget):
            chosen = self._choose(step)
            if (step + 1) % SYNC_EVERY == 0 or step + 1 == self.budget:
                kept = self._sync(step)
                if kept is None:
                    return
                if len(kept) < len(chosen):
                    chosen = chosen.index_select(0, kept)
            self._forward(chosen)

    def _choose(self, step: int) -> torch.Tensor:
        logits, rows, live = self.logits, self.rows, self.live_index
        chosen = choose(logits[:, : self.allowed], rows, step, self.vocab_hash)
        logprobs = F.log_softmax(logits, dim=-1)
        self.tokens[live, step] = chosen
        self.logprobs[live, step] = logprobs.gather(-1, chosen[:, None])[:, 0]
        if self.topk:
            top = torch.topk(logprobs, self.topk, dim=-1)
            self.top_ids[live, step] = top.indices
            self.top_lps[live, step] = top.values
        stop = hits_stop(chosen, rows)
        spent = rows.max_tokens <= step + 1
        fresh = (self.stopped_at[live] < 0) & (stop | spent)
        self.stopped_at[live] = torch.where(fresh, step, self.stopped_at[live])
        self.by_length[live] = torch.where(fresh, spent & ~stop, self.by_length[live])
        return chosen

    def _sync(self, step: int) -> torch.Tensor | None:
        """Settle finished rows on the host and drop them from the batch: the batch positions kept,
        None when no row is left."""
        keep = self.settle(step)
        if not keep:
            return None
        index = torch.tensor(keep, dtype=torch.int64, device=self.lm.device)
        if len(keep) < len(self.live):
            if self.own is not None:
                self.own.batch_select_indices(index)
            else:
                self.cache.keep(index)
            self.rows = self.rows.select(index)
            self.live = [self.live[p] for p in keep]
            self.live_index = self.live_index.index_select(0, index)
        return index

    def settle(self, step: int) -> list[int]:
        """Settle the rows of self.live that finished by `step` (stop ids, budgets, stop strings):
        the indices into self.live of the rows still running."""
        stopped = self.stopped_at.tolist()
        by_length = self.by_length.tolist()
        keep: list[int] = []
        for pos, row in enumerate(self.live):
            request, sample = self.owner[row]
            last = stopped[row] if stopped[row] >= 0 else step
            hit = self._stop_string(row, request, last)
            if hit is not None:
                request.ends[sample], request.reasons[sample] = hit, "stop"
            elif stopped[row] >= 0:
                request.ends[sample] = stopped[row]
                request.reasons[sample] = "length" if by_length[row] else "stop"
            else:
                keep.append(pos)
        return keep

    def _stop_string(self, row: int, request: _Request, last: int) -> int | None:
        """The first position in [checked, last] at which a stop string completes, if any."""
        strings = request.job.op.params.stop_strings
        if not strings or self.checked[row] > last:
            return None
        window = 4 * max(len(s) for s in strings) + 4  # as sampling._StopCheck: 4 bytes a character
        lo = max(0, self.checked[row] - window)
        tokens = self.tokens[row, lo : last + 1].tolist()
        decode = self.lm.tokenizer.decode
        for pos in range(self.checked[row], last + 1):
            tail = decode(tokens[max(0, pos + 1 - window) - lo : pos + 1 - lo], skip_special_tokens=False)
            if any(s in tail for s in strings):
                return pos
        self.checked[row] = last + 1
        return None

    def _forward(self, chosen: torch.Tensor) -> None:
        model, cache = self.lm.model, self.cache
        if self.own is not None:
            self.logits = project(model, decoder_hidden(model, chosen[:, None], cache=self.own)[:, -1])
            return
        width = cache.begin_step()
        dtype = next(model.parameters()).dtype
        mask = cache.step_mask(width, dtype, self.eager)
        # A ready 4-D mask is used as it is by HF's mask builders; a model with sliding-window
        # layers gets a mapping per layer type instead (row_cache_fits admits only those reading one).
        masks: torch.Tensor | dict[str, torch.Tensor] = mask
        if self.window:
            sliding = cache.step_mask(width, dtype, self.eager, self.window)
            masks = {"full_attention": mask, "sliding_attention": sliding}
        decoder = model.get_decoder()
        kwargs = {_cache_kwarg(decoder): cache}
        with self._routed():
            out = decoder(
                input_ids=chosen[:, None],
                position_ids=cache.lengths[:, None],
                attention_mask=masks,
                use_cache=True,
                **kwargs,
            )
            self.logits = project(model, out.last_hidden_state[:, -1])
        cache.advance()

    def _routed(self) -> AbstractContextManager[None]:
        return self.routed(self.live)

    def routed(self, positions: Sequence[int]) -> AbstractContextManager[None]:
        """Route batch position p through the adapter of row positions[p] (when routing)."""
        return routed(self.segments(positions)) if self.route else nullcontext()

    def segments(self, positions: Sequence[int]) -> Segments:
        """(adapter, first position, end position) runs of the rows at `positions`; [] unless routing."""
        segments: Segments = []
        if not self.route:
            return segments
        for pos, row in enumerate(positions):
            name = self.owner[row][0].job.adapter
            assert name is not None  # routed batches hold adapter rows only (Sampler._sample_chunk)
            if segments and segments[-1][0] == name:
                segments[-1] = (name, segments[-1][1], pos + 1)
            else:
                segments.append((name, pos, pos + 1))
        return segments

    def collect(self) -> None:
        """Copy the rows' outputs to the host (once) and cut each at its end."""
        tokens, logprobs = self.tokens.tolist(), self.logprobs.tolist()
        top_ids, top_lps = self.top_ids.tolist(), self.top_lps.tolist()
        for row, (request, sample) in enumerate(self.owner):
            n = request.ends[sample] + 1
            k = min(request.job.op.topk_sample_logprobs, self.lm.vocab_size)
            topk = None
            if k:
                topk = topk_table([r[:k] for r in top_ids[row][:n]], [r[:k] for r in top_lps[row][:n]], k)
            request.sequences[sample] = SampledSequence(
                tokens=tuple(tokens[row][:n]),
                logprobs=tuple(logprobs[row][:n]),
                stop_reason=request.reasons[sample],
                topk_logprobs=topk,
            )


def _stop_ids(lm: LoadedModel, op: SampleOp) -> tuple[int, ...]:
    ids = set(op.params.stop_tokens) | (set(lm.eos_token_ids) if op.params.stop_at_eos else set())
    return tuple(sorted(ids))


def _result(request: _Request) -> SampleResult:
    k = request.job.op.topk_sample_logprobs
    empty = SampledSequence(
        tokens=(), logprobs=(), stop_reason="length", topk_logprobs=topk_table([], [], k) if k else None
    )
    scores = request.scores
    return SampleResult(
        sequences=tuple(seq if seq is not None else empty for seq in request.sequences),
        prompt_logprobs=scores.logprobs,
        topk_prompt_logprobs=scores.topk,
        target_prompt_logprobs=scores.target,
        prompt_alt_tokens=scores.alt_tokens,
    )
