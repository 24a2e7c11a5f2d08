"""Fused GPU kernels for the decoder (Liger-Kernel's RMSNorm, SwiGLU and rotary embedding), an
optional path: the model's own modules are the fallback and the reference they are tested against.

Why these and not Liger's fused linear cross-entropy: TuFT must return every token's logprob and
supports losses whose gradient per token depends on the logprobs themselves (PPO, GSPO...), so the
vocabulary projection runs chunked with recompute instead (logits.py); it never materialises the
[tokens, vocab] matrix either. The fused norm/activation/rotary kernels cut the memory traffic and
the kernel launches of every layer, which is where a small model's step goes
(bench/engine_ablation.py).
"""

from __future__ import annotations

import logging

import torch
from transformers import PreTrainedModel

from workers.engine.config import KernelPolicy

log = logging.getLogger("tuft.engine")


def apply_fused_kernels(model: PreTrainedModel, device: torch.device, policy: KernelPolicy) -> bool:
    """Patch `model` in place with Liger's kernels where the policy and the device allow; True if
    patched. "auto": on CUDA when liger-kernel is installed and knows the model type; "liger": the
    same but a missing package is an error; "torch": never."""
    if policy == "torch" or device.type != "cuda":
        return False
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance
    except ImportError:
        if policy == "liger":
            raise RuntimeError(
                "engine_kernels is 'liger' but liger-kernel is not installed (pip install 'tuft[gpu]')"
            ) from None
        return False
    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        log.info("no fused kernels for model type %r; using the model's own modules", model_type)
        return False
    _apply_liger_kernel_to_instance(
        model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )
    log.info("fused kernels (liger-kernel) applied to a %s model", model_type)
    return True
