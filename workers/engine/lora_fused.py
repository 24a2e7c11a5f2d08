"""A LoRA linear layer as one autograd node: y = x W^T (+ bias) + scaling * (x A^T) B^T, row segment
by row segment, each segment with its own adapter (issue 8: faster than the naive loop).

PEFT's Linear runs the base layer, casts the activations to the float32 LoRA weights, applies
dropout, two float32 matmuls, scales the [tokens, out] product and adds it back: five to seven
autograd nodes and as many [tokens, width] elementwise kernels per layer, forward and backward. On a
Qwen3-0.6B step that elementwise work cost more GPU time than every matrix product together
(docs/performance.md, "What each change buys"), and every extra node is CPU time on the launch path.

Here the whole layer is one autograd.Function: the small A and B weights are cast to the compute
dtype instead of the activations, the second matmul accumulates into the base output inside the
GEMM (addmm_), and the scaling rides on the GEMMs' alpha or on the float32 cast of the weight
gradients, never on a kernel of its own. Backward is written out by hand:
grad_x = g W + (scaling * g B) A, grad_B = g^T (scaling * x A^T), grad_A = (scaling * g B)^T x, and
nothing is computed for a frozen or non-trainable tensor. It saves x (which the base layer would
save anyway) and the rank-sized intermediate, not the float32 copy of x that PEFT keeps.

Compute dtype of the LoRA matmuls: the autocast dtype while autocast is on (bf16 on a GPU, the
tensor cores), else the LoRA weights' own dtype (float32), so "autocast off" keeps PEFT's float32
LoRA arithmetic. The base matmul always runs in the base weights' dtype. Gradients of A and B are
returned in their own dtype (float32), so AdamW and checkpoints are unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

# (lora_A weight [r, in], lora_B weight [out, r], scaling, first row, end row) along the flattened
# [tokens, in] input.
Piece = tuple[torch.Tensor, torch.Tensor, float, int, int]


def lora_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pieces: Sequence[Piece]
) -> torch.Tensor:
    """x [..., in] -> [..., out] in the base weight's dtype; `pieces` index rows of x.reshape(-1, in)."""
    lora_dtype = _lora_dtype(x, pieces)
    spans = tuple((start, end) for _, _, _, start, end in pieces)
    scalings = tuple(float(scaling) for _, _, scaling, _, _ in pieces)
    weights = [t for a, b, _, _, _ in pieces for t in (a, b)]
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in weights))
    if not needs_grad:
        out, _, _ = _forward(x, weight, bias, spans, scalings, lora_dtype, weights)
        return out
    result: torch.Tensor = _FusedLora.apply(x, weight, bias, spans, scalings, lora_dtype, *weights)
    return result


def _lora_dtype(x: torch.Tensor, pieces: Sequence[Piece]) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return pieces[0][0].dtype if pieces else x.dtype


def _forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    spans: tuple[tuple[int, int], ...],
    scalings: tuple[float, ...],
    lora_dtype: torch.dtype,
    weights: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The output, each piece's unscaled intermediate x A^T [rows, r], and A and B in lora_dtype.

    Kernel launches are what a small model's step is made of (it is CPU-bound on an H100), so the
    scaling rides on the GEMMs' alpha instead of separate multiplies."""
    with torch.autocast(x.device.type, enabled=False):
        x2 = x.reshape(-1, x.shape[-1]).to(weight.dtype)
        out = F.linear(x2, weight, bias)
        xl = x2 if lora_dtype == x2.dtype else x2.to(lora_dtype)
        lows, cast = [], []
        for i, ((start, end), scaling) in enumerate(zip(spans, scalings, strict=True)):
            a, b = weights[2 * i].to(lora_dtype), weights[2 * i + 1].to(lora_dtype)
            low = F.linear(xl[start:end], a)
            if lora_dtype == out.dtype:
                out[start:end].addmm_(low, b.t(), alpha=scaling)
            else:
                out[start:end] += F.linear(low, b).mul_(scaling).to(out.dtype)
            lows.append(low)
            cast += [a, b]
    return out.reshape(*x.shape[:-1], out.shape[-1]), lows, cast


def _scaled(product: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """scaling * product in `dtype` (the LoRA weights', float32), in one kernel."""
    return torch.mul(product, scaling, out=torch.empty_like(product, dtype=dtype))


class _FusedLora(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        spans: tuple[tuple[int, int], ...],
        scalings: tuple[float, ...],
        lora_dtype: torch.dtype,
        *weights: torch.Tensor,
    ) -> torch.Tensor:
        out, lows, cast = _forward(x, weight, bias, spans, scalings, lora_dtype, weights)
        ctx.spans, ctx.scalings, ctx.lora_dtype = spans, scalings, lora_dtype
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.weight_dtypes = [t.dtype for t in weights]
        ctx.save_for_backward(x, weight, *lows, *cast)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, *rest = ctx.saved_tensors
        n = len(ctx.spans)
        lows, cast = rest[:n], rest[n:]
        needs = ctx.needs_input_grad
        lora_dtype = ctx.lora_dtype
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out.reshape(-1, grad_out.shape[-1]).to(weight.dtype)
            gl = g if lora_dtype == g.dtype else g.to(lora_dtype)
            grad_x = g @ weight if needs[0] else None
            x2: torch.Tensor | None = None
            grads: list[torch.Tensor | None] = []
            for i, ((start, end), scaling) in enumerate(zip(ctx.spans, ctx.scalings, strict=True)):
                a, b = cast[2 * i], cast[2 * i + 1]
                a_dtype, b_dtype = ctx.weight_dtypes[2 * i], ctx.weight_dtypes[2 * i + 1]
                need_a, need_b = needs[6 + 2 * i], needs[7 + 2 * i]
                g_rows = gl[start:end]
                grad_b = _scaled(g_rows.t() @ lows[i], scaling, b_dtype) if need_b else None
                grad_a = None
                if need_a or grad_x is not None:
                    g_low = g_rows @ b  # unscaled: the scaling rides on the products below
                    if need_a:
                        if x2 is None:
                            x2 = x.reshape(-1, x.shape[-1]).to(weight.dtype).to(lora_dtype)
                        grad_a = _scaled(g_low.t() @ x2[start:end], scaling, a_dtype)
                    if grad_x is not None:
                        if lora_dtype == grad_x.dtype:
                            grad_x[start:end].addmm_(g_low, a, alpha=scaling)
                        else:
                            grad_x[start:end] += (g_low @ a).mul_(scaling).to(grad_x.dtype)
                grads += [grad_a, grad_b]
        if grad_x is not None:
            grad_x = grad_x.reshape(ctx.x_shape).to(ctx.x_dtype)
        return (grad_x, None, None, None, None, None, *grads)
