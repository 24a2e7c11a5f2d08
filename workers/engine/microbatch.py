"""Running a forward_backward as micro-batches under a token budget, and surviving out-of-memory.

Why splitting changes nothing but float rounding: every loss is a *sum* over tokens (losses.py,
rl_losses.py), the per-datum quantities (GSPO's sequence ratio, the ratio metrics) are computed
within one datum, and a datum never straddles two micro-batches. So the op's loss, per-datum
outputs and metrics are assembled from its micro-batches' without any rescaling, and its gradient
is the sum of theirs. Only the order of float additions depends on the split: gradients agree within
float32 rounding on CPU and bf16 tolerance on GPU, and for one budget the result is deterministic.

The budget counts padded tokens (rows x longest row). Datums are sorted by length, longest first,
so a micro-batch holds sequences of similar length (little padding) and an out-of-memory error, if
any, comes from the first and largest micro-batch before much work is lost. Outputs are written by
datum index, so the caller sees them in the op's order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel

from workers.engine.config import EngineConfig
from workers.engine.errors import OutOfMemory, is_out_of_memory
from workers.engine.memory import activation_checkpointing, free_bytes, release_cached, token_costs, tokens_that_fit

log = logging.getLogger("tuft.engine")

# The budget of micro_batch_tokens=auto on the CPU (no device memory to ask).
CPU_MICRO_BATCH_TOKENS = 8192
# Under "auto", checkpointing starts once a budget without it would be below this many tokens (or
# below the op's longest sequence): micro-batches that small waste more than the recompute costs.
MIN_USEFUL_TOKENS = 2048


def plan(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Datum indices grouped into micro-batches of at most `budget` padded tokens, longest first.
    A sequence longer than the budget forms a micro-batch on its own (sequences are never cut)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Sorted longest first: the group's first datum sets its padded width.
        if current and lengths[current[0]] * (len(current) + 1) > budget:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


@dataclass(frozen=True)
class Report:
    """How the last forward_backward on a model ran (bench/engine_throughput.py prints it)."""

    budget_tokens: int
    checkpointing: bool
    micro_batches: int
    oom_retries: int


class _GradStash:
    """Sets the op's trainable parameters' accumulated .grad aside, so the op accumulates into
    fresh gradients that can be dropped whole (an OOM mid-backward leaves some layers' gradients
    added, others not) without copying anything."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self._params = params
        self._saved = [p.grad for p in params]
        for p in params:
            p.grad = None

    def restore(self) -> None:
        for p, saved in zip(self._params, self._saved, strict=True):
            p.grad = saved

    def commit(self) -> None:
        """Earlier gradients + this op's, in place into the earlier tensors."""
        for p, saved in zip(self._params, self._saved, strict=True):
            if saved is not None and p.grad is not None:
                p.grad = saved.add_(p.grad)
            elif saved is not None:
                p.grad = saved


@dataclass
class MicroBatcher:
    """Per loaded model: picks each op's budget and checkpointing, runs its micro-batches, and
    remembers the budget that worked after an out-of-memory error (for as long as the model stays
    loaded), so later ops start there instead of failing again."""

    model: PreTrainedModel
    device: torch.device
    config: EngineConfig
    # Largest budget known to work, by mode ("forward", "full", "checkpointed").
    caps: dict[str, int] = field(default_factory=dict)
    last: Report | None = None

    def run(
        self,
        lengths: Sequence[int],
        step: Callable[[list[int]], None],
        forward_only: bool,
        budget: int | None = None,
    ) -> Report:
        """Call `step(group)` for every micro-batch; `step` writes its outputs by datum index and,
        unless forward_only, backpropagates. On an OOM the op's gradients are dropped and the whole
        op runs again under half the budget (so its result is that of a clean run at that budget);
        a single sequence that does not fit raises OutOfMemory. Any other error leaves the
        gradients as they were before the op.

        `budget` forces the first attempt's budget (a replay reproducing an op's split); None
        derives it from the configuration, the device's memory and what worked before."""
        checkpointing = self._checkpointing(lengths, forward_only)
        if budget is None:
            budget = self._budget(forward_only, checkpointing)
        retries = 0
        halved = False
        params = [] if forward_only else [p for p in self.model.parameters() if p.requires_grad]
        while True:
            groups = plan(lengths, budget)
            failed: list[int] = []
            stash = _GradStash(params)
            oom = ""
            try:
                with activation_checkpointing(self.model, checkpointing and not forward_only):
                    for group in groups:
                        failed = group
                        step(group)
            except BaseException as exc:
                stash.restore()
                if not is_out_of_memory(exc):
                    raise
                oom = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            else:
                stash.commit()
                if halved:
                    self.caps[self._mode(forward_only, checkpointing)] = budget
                self.last = Report(budget, checkpointing, len(groups), retries)
                return self.last
            # Out of the except block: its traceback no longer pins the failed micro-batch's tensors.
            release_cached(self.device)
            retries += 1
            padded = len(failed) * lengths[failed[0]]
            if len(failed) > 1:
                budget = max(1, min(budget, padded) // 2)
                halved = True
                log.warning("out of memory in a micro-batch of %d tokens (%s); retrying at %d", padded, oom, budget)
                continue
            if not checkpointing and not forward_only and self._auto_checkpointing():
                # Remember that sequences this long need checkpointing on this device.
                self.caps["full"] = min(self.caps.get("full", padded), max(1, padded - 1))
                checkpointing, halved = True, False
                budget = self._budget(forward_only, checkpointing)
                log.warning("out of memory on a %d-token sequence (%s); retrying with checkpointing", padded, oom)
                continue
            raise OutOfMemory(
                f"datum {failed[0]} ({padded} tokens) does not fit in {self.device.type} memory even alone"
                f"{' with activation checkpointing' if checkpointing and not forward_only else ''}; "
                f"nothing of the op was applied ({oom})"
            )

    def _auto_checkpointing(self) -> bool:
        return self.config.activation_checkpointing == "auto" and self.device.type == "cuda"

    @staticmethod
    def _mode(forward_only: bool, checkpointing: bool) -> str:
        return "forward" if forward_only else "checkpointed" if checkpointing else "full"

    def _checkpointing(self, lengths: Sequence[int], forward_only: bool) -> bool:
        policy = self.config.activation_checkpointing
        if forward_only or policy == "off":
            return False
        if policy == "on":
            return True
        if not self._auto_checkpointing():
            return False
        # Judged on what memory allows, whatever micro_batch_tokens says.
        without = self._memory_budget(False, False)
        return without is not None and without < max(MIN_USEFUL_TOKENS, max(lengths))

    def _budget(self, forward_only: bool, checkpointing: bool) -> int:
        budget = self.config.micro_batch_tokens
        if budget is None:
            budget = self._memory_budget(forward_only, checkpointing) or CPU_MICRO_BATCH_TOKENS
        cap = self.caps.get(self._mode(forward_only, checkpointing))
        return budget if cap is None else min(budget, cap)

    def _memory_budget(self, forward_only: bool, checkpointing: bool) -> int | None:
        """Tokens that fit in the device's free memory (capped by what worked); None on the CPU."""
        free = free_bytes(self.device)
        if free is None:
            return None
        costs = token_costs(self.model)
        per_token = costs.forward if forward_only else costs.checkpointed if checkpointing else costs.full
        budget = tokens_that_fit(free, per_token)
        cap = self.caps.get(self._mode(forward_only, checkpointing))
        return budget if cap is None else min(budget, cap)
