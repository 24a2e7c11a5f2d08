"""The fused LoRA node (workers/engine/lora_fused.py) computes what PEFT's Linear computes: the same
outputs and the same gradients for x, A and B, alone, by row segments and under autocast; and an
engine using it trains exactly as one using PEFT's own forward (issue 8)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.domain.models import builtin_tiny_spec
from app.domain.ops import AdamParams, OptimStepOp
from tests.engine.helpers import DEVICE, ON_GPU, TINY, datum, fb, lora
from workers.engine import EngineConfig, TorchEngine
from workers.engine.lora_fused import lora_linear


def _reference(x, weight, bias, pieces):
    """Plain autograd ops: the base layer on every row, each piece's delta on its rows."""
    x2 = x.reshape(-1, x.shape[-1])
    out = x2 @ weight.t() + (bias if bias is not None else 0)
    deltas = torch.zeros_like(out)
    for a, b, scaling, start, end in pieces:
        part = (x2[start:end] @ a.t()) @ b.t() * scaling
        deltas = deltas.index_add(0, torch.arange(start, end), part)
    return (out + deltas).reshape(*x.shape[:-1], weight.shape[0])


def _leaves(seed: int, segments: list[tuple[int, int]], bias: bool):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(24, 16, generator=gen, dtype=torch.float64)
    b0 = torch.randn(24, generator=gen, dtype=torch.float64) if bias else None
    pieces = []
    for k, (start, end) in enumerate(segments):
        a = torch.randn(4, 16, generator=gen, dtype=torch.float64, requires_grad=True)
        b = torch.randn(24, 4, generator=gen, dtype=torch.float64, requires_grad=True)
        pieces.append((a, b, 0.5 + k, start, end))
    return x, weight, b0, pieces


@pytest.mark.parametrize(
    ("segments", "bias"),
    [([(0, 15)], False), ([(0, 15)], True), ([(0, 5), (5, 10), (10, 15)], False), ([(0, 10)], False)],
    ids=["one-adapter", "bias", "three-segments", "rows-without-adapter"],
)
def test_outputs_and_gradients_match_plain_autograd(segments, bias) -> None:
    x, weight, b0, pieces = _leaves(0, segments, bias)
    probe = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = lora_linear(x, weight, b0, pieces)
    (got * probe).sum().backward()
    got_grads = [x.grad] + [t.grad for a, b, *_ in pieces for t in (a, b)]
    x2, _, _, pieces2 = _leaves(0, segments, bias)
    want = _reference(x2, weight, b0, pieces2)
    (want * probe).sum().backward()
    want_grads = [x2.grad] + [t.grad for a, b, *_ in pieces2 for t in (a, b)]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_frozen_inputs_and_adapters_get_no_gradient() -> None:
    x, weight, _, pieces = _leaves(2, [(0, 5), (5, 15)], False)
    x.requires_grad_(False)
    a0, b0, *_ = pieces[0]
    a0.requires_grad_(False)
    b0.requires_grad_(False)
    lora_linear(x, weight, None, pieces).sum().backward()
    assert x.grad is None and a0.grad is None and b0.grad is None
    assert pieces[1][0].grad is not None and pieces[1][1].grad is not None
    assert pieces[1][1].grad.abs().sum() > 0


def test_under_autocast_the_lora_matmuls_run_in_the_autocast_dtype() -> None:
    """bf16 activations and base weights with float32 LoRA weights, as on a GPU: the gradients of A
    and B come back float32 and agree with the float64 reference to bf16 precision."""
    x, weight, _, pieces = _leaves(3, [(0, 15)], False)
    xb = x.detach().to(torch.bfloat16).requires_grad_(True)
    wb = weight.to(torch.bfloat16)
    fp = [
        (a.detach().float().requires_grad_(True), b.detach().float().requires_grad_(True), s, lo, hi)
        for a, b, s, lo, hi in pieces
    ]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lora_linear(xb, wb, None, fp)
    assert got.dtype == torch.bfloat16
    got.float().sum().backward()
    assert fp[0][0].grad.dtype == torch.float32 and fp[0][1].grad.dtype == torch.float32
    want = _reference(x, weight, None, pieces)
    want.sum().backward()
    for g, w in (
        (got.detach().double(), want.detach()),
        (fp[0][0].grad.double(), pieces[0][0].grad),
        (fp[0][1].grad.double(), pieces[0][1].grad),
    ):
        assert float((g - w).norm() / w.norm()) < 3e-2, float((g - w).norm() / w.norm())


def _trained(cache_dir: Path, kernel: str) -> tuple[TorchEngine, list[float]]:
    engine = TorchEngine(
        [builtin_tiny_spec()], device=DEVICE, cache_dir=cache_dir, config=EngineConfig(lora_kernel=kernel)
    )
    engine.create_run("r", TINY, lora(rank=4, seed=7))
    losses = []
    for _ in range(4):
        result = engine.forward_backward("r", fb(datum([5, 9, 14, 3, 7, 8, 2]), datum([4, 4, 6, 11])))
        losses.append(result.metrics["loss:sum"])
        engine.optim_step("r", OptimStepOp(adam=AdamParams(learning_rate=0.01)))
    return engine, losses


def test_an_engine_trains_the_same_with_the_fused_node_as_with_peft(tmp_path: Path) -> None:
    fused, fused_losses = _trained(tmp_path / "f", "fused")
    peft, peft_losses = _trained(tmp_path / "p", "peft")
    tol = 2e-2 if ON_GPU else 1e-5
    assert fused_losses[-1] < fused_losses[0]  # it learns
    for got, want in zip(fused_losses, peft_losses, strict=True):
        assert abs(got - want) <= tol * max(1.0, abs(want))
    got_state, want_state = fused.adapter_state("r"), peft.adapter_state("r")
    assert got_state.keys() == want_state.keys()
    for key in want_state:
        torch.testing.assert_close(got_state[key], want_state[key], rtol=tol, atol=tol)
