"""forward_backward for several runs of one base model in one pass (issue 8 item 4).

The runs' datums are concatenated into one batch and micro-batched together, each row through its
own run's adapter (lora_rows.py); results are split back per op. A run's loss is a sum over its own
tokens and its adapter touches only its own rows, so each run's gradient is what it would be alone,
up to the float rounding of the shared matmuls (exactly the same arithmetic on the CPU only when
the batch shapes match; the worker batches runs on CUDA only, engine.py says why).

What cannot share a pass runs alone, in the caller: ops with different losses, configs or
forward_only, adapters the router cannot route (fused MoE experts), and any batch in which one op
fails (a non-finite loss): the batch's gradients are rolled back whole (MicroBatcher) and each op
runs again by itself, so one run's bad op never fails another's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedModel

from app.domain.results import ForwardBackwardResult
from workers.engine.lora_rows import RowRouter
from workers.engine.losses import PreparedBatch, assemble, run_datums
from workers.engine.microbatch import MicroBatcher


@dataclass(frozen=True)
class RunBatch:
    adapter: str
    batch: PreparedBatch


def shareable(items: Sequence[RunBatch]) -> bool:
    """Whether these ops can go through one pass: distinct runs, one loss and one config."""
    first = items[0].batch
    return len({item.adapter for item in items}) == len(items) and all(
        item.batch.loss_fn == first.loss_fn and item.batch.config == first.config for item in items
    )


def run_together(
    model: PreTrainedModel,
    router: RowRouter,
    batcher: MicroBatcher,
    items: Sequence[RunBatch],
    forward_only: bool,
) -> list[ForwardBackwardResult]:
    """One pass over every item's datums; raises what run_loss raises, with no gradient applied."""
    combined = PreparedBatch(
        loss_fn=items[0].batch.loss_fn,
        config=items[0].batch.config,
        data=[datum for item in items for datum in item.batch.data],
    )
    adapter_of = [item.adapter for item in items for _ in item.batch.data]
    with router.batch([item.adapter for item in items]):
        per = run_datums(model, combined, forward_only, batcher, None, adapter_of)
    results, start = [], 0
    for item in items:
        end = start + len(item.batch.data)
        results.append(assemble(combined.loss_fn, per, range(start, end)))
        start = end
    return results
