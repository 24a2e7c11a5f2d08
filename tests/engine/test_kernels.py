"""Fused GPU kernels (workers/engine/kernels.py) are an optional path: the model's own modules are
the fallback everywhere and the reference the fused ones are checked against on a GPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from app.domain.models import builtin_tiny_spec
from app.domain.ops import AdamParams, OptimStepOp
from tests.engine.helpers import DEVICE, ON_GPU, TINY, datum, fb, lora, ref_tol
from workers.engine import EngineConfig, TorchEngine
from workers.engine.kernels import apply_fused_kernels

HAVE_LIGER = importlib.util.find_spec("liger_kernel") is not None


def _patched(model: torch.nn.Module) -> list[str]:
    """Modules whose forward was replaced on the instance (how Liger patches a loaded model)."""
    return [name for name, m in model.named_modules() if "forward" in vars(m)]


def test_the_cpu_and_the_torch_policy_keep_the_models_own_modules(cache_dir: Path) -> None:
    engine = TorchEngine([builtin_tiny_spec()], device="cpu", cache_dir=cache_dir)
    engine.create_run("k", TINY, lora())
    model = engine._slots[TINY].loaded.model
    before = _patched(model)
    # On the CPU nothing is patched whatever the policy (Liger's kernels are Triton, CUDA only).
    for policy in ("auto", "liger", "torch"):
        assert apply_fused_kernels(model, torch.device("cpu"), policy) is False  # type: ignore[arg-type]
    assert _patched(model) == before
    if torch.cuda.is_available():
        assert apply_fused_kernels(model, torch.device("cuda"), "torch") is False


@pytest.mark.skipif(not ON_GPU or not HAVE_LIGER, reason="fused kernels run on CUDA with liger-kernel installed")
def test_fused_kernels_train_like_the_models_own_modules(cache_dir: Path) -> None:
    """The same run with Liger's kernels and with the model's modules: logprobs, loss and
    gradients agree within bf16 precision. Compared on one step: after several Adam steps at a
    large learning rate bf16 rounding differences grow (Adam's first steps are about sign(g),
    which flips for near-zero gradients), which says nothing about the kernels."""
    engines = {
        policy: TorchEngine(
            [builtin_tiny_spec()], device=DEVICE, cache_dir=cache_dir, config=EngineConfig(kernels=policy)
        )
        for policy in ("torch", "liger")
    }
    data = [datum([5 + (i * 7 + j * 3) % 200 for j in range(12 + i)]) for i in range(4)]
    results = {}
    for policy, engine in engines.items():
        engine.create_run("k", TINY, lora(rank=8, seed=2))
        # One step first, so LoRA B is non-zero and its path is exercised too.
        engine.forward_backward("k", fb(*data))
        engine.optim_step("k", OptimStepOp(adam=AdamParams(learning_rate=1e-3)))
        out = engine.forward_backward("k", fb(*data))
        results[policy] = (out, engine.adapter_grads("k"))
    model = engines["liger"]._slots[TINY].loaded.model
    assert "forward" in vars(model.model.norm)  # Liger binds its forward on the instance
    (fused, fused_g), (plain, plain_g) = results["liger"], results["torch"]
    assert fused.metrics["loss:sum"] == pytest.approx(plain.metrics["loss:sum"], rel=1e-2)
    for a, b in zip(fused.outputs, plain.outputs, strict=True):
        lp_a = torch.frombuffer(bytearray(a["logprobs"].data), dtype=torch.float32)
        lp_b = torch.frombuffer(bytearray(b["logprobs"].data), dtype=torch.float32)
        assert torch.allclose(lp_a, lp_b, atol=ref_tol(1e-5))
    for key, g in plain_g.items():
        assert g is not None and fused_g[key] is not None, key
        cosine = torch.nn.functional.cosine_similarity(g.flatten().double(), fused_g[key].flatten().double(), dim=0)
        assert cosine > 0.98, (key, float(cosine))
