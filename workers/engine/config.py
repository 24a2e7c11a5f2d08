"""EngineConfig: the engine's settings as plain values (built by workers/__main__.py from Settings),
so the engine never reads app.config or the environment."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

CheckpointingPolicy = Literal["auto", "on", "off"]
KernelPolicy = Literal["auto", "liger", "torch"]
BatchRunsPolicy = Literal["auto", "on", "off"]
AutocastPolicy = Literal["auto", "on", "off"]
LoraKernelPolicy = Literal["auto", "fused", "peft"]


def on_by_policy(policy: str, device: torch.device, cuda: bool = True) -> bool:
    """An auto/on/off switch: "auto" is `cuda` on a CUDA device and the opposite elsewhere."""
    if policy == "auto":
        return cuda == (device.type == "cuda")
    return policy == "on"


@dataclass(frozen=True)
class EngineConfig:
    """micro_batch_tokens: padded tokens (rows x longest row) per micro-batch of a forward_backward;
    None is "auto": on CUDA derived from free device memory and the model's activation size per
    token, on CPU a fixed CPU_MICRO_BATCH_TOKENS (microbatch.py). A smaller budget is learned after
    an out-of-memory error either way.

    activation_checkpointing: "auto" recomputes each decoder layer's activations in backward only
    on CUDA, and only when the budget without it would be tiny (below the op's longest sequence or
    MIN_USEFUL_TOKENS); "on" / "off" force it.

    kernels: "auto" patches Liger-Kernel's fused RMSNorm / SwiGLU / RoPE into a model loaded on
    CUDA when the package is installed and knows the model type (kernels.py); "liger" requires it;
    "torch" keeps the model's own modules.

    batch_runs: whether forward_backward_many gives ops of different runs on one base model one
    pass (multi_run.py): "auto" on CUDA only (engine.batches_runs says why), "on" / "off" force it.

    batch_samples: whether the runner claims several queued samples at once and decodes them in
    one batch (TorchEngine.sample_many): "auto" on CUDA only, like batch_runs (on the CPU a replay
    of one sample reproduces the served result bit for bit only if it ran alone); "on" / "off".

    decode_graphs: whether a batched decode (decode.py) runs the static-shape step of
    decode_graph.py, captured in CUDA graphs on CUDA: "auto" on CUDA only; "on" forces it (on the
    CPU the static step runs uncaptured, as the tests do); "off" keeps decode.py's own step.

    decode_cache_bytes: the most memory the static decode step's buffers may keep between sample
    calls, per base model (decode_state.py); a call that needs more gets buffers of its own, freed
    when it ends. None: a quarter of the GPU's memory on CUDA, 1 GiB on the CPU; 0 keeps nothing.

    autocast: forward_backward under torch.autocast in the base weights' dtype, so the LoRA
    matmuls (float32 weights) run on the tensor cores in bf16 instead of in float32; weights,
    gradients and AdamW stay float32. "auto": on CUDA with bf16/fp16 base weights; "off" keeps
    float32 LoRA arithmetic (bench/engine_ablation.py prices it).

    lora_kernel: how a LoRA linear layer computes when one adapter is active. "fused": one autograd
    node per layer with a hand-written backward (lora_fused.py); "peft": PEFT's own Linear.forward.
    "auto" is fused. Multi-run (routed) passes always take the fused node.

    deterministic: PyTorch's deterministic algorithms (determinism.py). "auto": on for the CPU (free
    there), off on CUDA, where they cost 5-25% of a training step and could not make a GPU replay
    bitwise (docs/reliability.md, "GPU replay"); "on" / "off" force it. Process-wide: the first
    engine to load a model sets it.
    """

    micro_batch_tokens: int | None = None
    activation_checkpointing: CheckpointingPolicy = "auto"
    kernels: KernelPolicy = "auto"
    batch_runs: BatchRunsPolicy = "auto"
    autocast: AutocastPolicy = "auto"
    batch_samples: BatchRunsPolicy = "auto"
    decode_graphs: BatchRunsPolicy = "auto"
    lora_kernel: LoraKernelPolicy = "auto"
    deterministic: BatchRunsPolicy = "auto"
    decode_cache_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < 1:
            raise ValueError(f"micro_batch_tokens must be >= 1 or auto, got {self.micro_batch_tokens}")
        if self.activation_checkpointing not in ("auto", "on", "off"):
            raise ValueError(f"activation_checkpointing must be auto, on or off, got {self.activation_checkpointing!r}")
        if self.batch_runs not in ("auto", "on", "off"):
            raise ValueError(f"batch_runs must be auto, on or off, got {self.batch_runs!r}")
        if self.batch_samples not in ("auto", "on", "off"):
            raise ValueError(f"batch_samples must be auto, on or off, got {self.batch_samples!r}")
        if self.decode_graphs not in ("auto", "on", "off"):
            raise ValueError(f"decode_graphs must be auto, on or off, got {self.decode_graphs!r}")
        if self.autocast not in ("auto", "on", "off"):
            raise ValueError(f"autocast must be auto, on or off, got {self.autocast!r}")
        if self.lora_kernel not in ("auto", "fused", "peft"):
            raise ValueError(f"lora_kernel must be auto, fused or peft, got {self.lora_kernel!r}")
        if self.deterministic not in ("auto", "on", "off"):
            raise ValueError(f"deterministic must be auto, on or off, got {self.deterministic!r}")
        if self.decode_cache_bytes is not None and self.decode_cache_bytes < 0:
            raise ValueError(f"decode_cache_bytes must be >= 0 or auto, got {self.decode_cache_bytes}")
        if self.kernels not in ("auto", "liger", "torch"):
            raise ValueError(f"kernels must be auto, liger or torch, got {self.kernels!r}")
