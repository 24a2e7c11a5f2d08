"""A worker over several GPUs of one host (`tuft worker --gpus 0,1`; docs/architecture.md, "Several
GPUs per worker").

The worker process is rank 0 and stays the only one that talks to the database, Celery and the
lease table; it starts ranks 1..N-1 as engine-only processes (workers/engine/data_parallel.py) and
hands the runner a DataParallelEngine in place of a TorchEngine, over base models replicated on every
GPU or sharded across them (`worker_shard`, `--shard`: workers/engine/sharded.py). With one GPU, or
on the CPU, none of this runs: the worker is exactly the single-process one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.domain.models import ModelSpec
    from workers.engine import EngineConfig


def parse_gpus(text: str | Sequence[int] | None) -> list[int] | None:
    """ "0,1,3" (the CLI) or [0, 1, 3] (the config file) -> [0, 1, 3]; None or empty -> None.
    Refuses duplicates and negative indices (two ranks on one GPU would only slow each other)."""
    if text is None:
        return None
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            gpus = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"--gpus takes GPU indices separated by commas, e.g. 0,1; got {text!r}") from None
    else:
        gpus = [int(g) for g in text]
    if not gpus:
        return None
    if len(set(gpus)) != len(gpus) or min(gpus) < 0:
        raise ValueError(f"GPU indices must be distinct and >= 0, got {gpus}")
    return gpus


def pin_gpus(gpus: Sequence[int]) -> None:
    """Before torch is imported: the process sees exactly its GPUs, so rank r is cuda:r (the ranks
    it spawns inherit the variable)."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)


# worker_shard "auto" shards a base model whose bf16 weights exceed this share of one GPU's memory:
# the rest must hold the activations of a useful micro-batch, the LoRA state and the allocator's
# slack (Qwen3-14B, 29.5 GB, stays whole on an 80 GB card; Qwen3-32B, 65.5 GB, is sharded).
SHARD_ABOVE_FRACTION = 0.5


def weight_bytes_bf16(spec: ModelSpec) -> int:
    """The bf16 size of a model's weights, read from its safetensors headers (no tensor is read);
    0 for the built-in tiny model and for a model without safetensors files."""
    import json

    from app.domain.hf_cache import resolve_model_path
    from app.domain.models import BUILTIN_TINY_PATH

    if spec.model_path == BUILTIN_TINY_PATH:
        return 0
    total = 0
    for file in Path(resolve_model_path(spec.model_path)).glob("*.safetensors"):
        with file.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for dim in entry["shape"]:
                    count *= int(dim)
                total += 2 * count
    return total


def resolve_shard(policy: str, models: list[ModelSpec], device_bytes: int) -> bool:
    """worker_shard: "fsdp" -> True, "replicate" -> False, "auto" -> True when the largest served
    model's bf16 weights exceed SHARD_ABOVE_FRACTION of one device's memory."""
    if policy not in ("auto", "replicate", "fsdp"):
        raise ValueError(f"worker_shard must be auto, replicate or fsdp, got {policy!r}")
    if policy != "auto":
        return policy == "fsdp"
    largest = max((weight_bytes_bf16(spec) for spec in models), default=0)
    return largest > SHARD_ABOVE_FRACTION * device_bytes


def make_engine(
    models: list[ModelSpec],
    device: str,
    cache_dir: Path,
    config: EngineConfig,
    ranks: int,
    timeout_s: float | None = None,
    shard: str = "auto",
) -> Any:
    """A TorchEngine for one rank; with ranks > 1 (on CUDA) the multi-rank engine over `ranks`
    GPUs, its followers started and joined before this returns, the base models replicated (data
    parallel) or sharded with FSDP2 as `shard` (worker_shard) says."""
    import logging

    from workers.engine import TorchEngine

    if ranks <= 1:
        return TorchEngine(models, device=device, cache_dir=cache_dir, config=config)
    import torch

    from workers.engine.data_parallel import DEFAULT_TIMEOUT_SECONDS, EngineArgs, launch

    device_bytes = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else 0
    sharded = resolve_shard(shard, models, device_bytes) if device == "cuda" or shard != "auto" else False
    logging.getLogger("tuft.worker").info(
        "worker_shard %s: base models %s over %d ranks", shard, "sharded (FSDP2)" if sharded else "replicated", ranks
    )
    args = EngineArgs(models, device=device, cache_dir=cache_dir, config=config, shard=sharded)
    return launch(args, ranks, DEFAULT_TIMEOUT_SECONDS if timeout_s is None else timeout_s)
