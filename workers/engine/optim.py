"""optim_step: one AdamW update of a run's adapter with the hyperparameters carried by the op.

Tinker sends the full AdamParams with every optim_step (a schedule is the client's business), so the
optimizer's param group is overwritten before each step rather than fixed at creation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from app.domain.ops import AdamParams
from workers.engine.errors import OpInputError


def new_optimizer(params: Sequence[nn.Parameter]) -> torch.optim.AdamW:
    # Placeholder hyperparameters: every step sets its own (see module docstring).
    return torch.optim.AdamW(list(params), lr=0.0, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)


def validate_adam(adam: AdamParams) -> None:
    def check(name: str, value: float, ok: bool, rule: str) -> None:
        if not math.isfinite(value) or not ok:
            raise OpInputError(f"adam {name} must be finite and {rule}, got {value}")

    check("learning_rate", adam.learning_rate, adam.learning_rate >= 0, ">= 0")
    check("beta1", adam.beta1, 0 <= adam.beta1 < 1, "in [0, 1)")
    check("beta2", adam.beta2, 0 <= adam.beta2 < 1, "in [0, 1)")
    check("eps", adam.eps, adam.eps >= 0, ">= 0")
    check("weight_decay", adam.weight_decay, adam.weight_decay >= 0, ">= 0")
    check("grad_clip_norm", adam.grad_clip_norm, adam.grad_clip_norm >= 0, ">= 0 (0 disables clipping)")


def adam_step(optimizer: torch.optim.AdamW, params: Sequence[nn.Parameter], adam: AdamParams) -> float:
    """Clip (if asked), step, zero the gradients; return the gradient norm before clipping.

    A parameter without a gradient (no forward_backward since the last step) is skipped by AdamW,
    exactly as torch does; its moments stay as they were.
    """
    with_grad = [p for p in params if p.grad is not None]
    norm = 0.0
    if with_grad:
        total = torch.nn.utils.get_total_norm([p.grad for p in with_grad if p.grad is not None])
        norm = float(total)
        if adam.grad_clip_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(with_grad, adam.grad_clip_norm, total)
    for group in optimizer.param_groups:
        group["lr"] = adam.learning_rate
        group["betas"] = (adam.beta1, adam.beta2)
        group["eps"] = adam.eps
        group["weight_decay"] = adam.weight_decay
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm
