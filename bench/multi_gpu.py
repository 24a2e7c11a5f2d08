"""forward_backward tokens/s of one worker over several GPUs (workers/engine/data_parallel.py, the
base model replicated or sharded with FSDP2: workers/engine/sharded.py) against one GPU, on a
Qwen3-shaped model with random weights.

On a machine with several GPUs, issue 13's targets:

    python bench/multi_gpu.py --shape qwen3-8b --ranks 2 --batch 16 --seq 1024              # >= 1.8x one GPU
    python bench/multi_gpu.py --shape qwen3-32b --shard fsdp --skip-one --ranks 2 --batch 16 --seq 1024
                                                   # 16 k tokens per op on 2 x 80 GB (add --checkpointing on if needed)

Smoke checks of the same code on the CPU (gloo; the speed means nothing there). qwen3-mini is the
tiny model's width with untied embeddings, like the large Qwen3 models:

    python bench/multi_gpu.py --shape tiny --device cpu --ranks 2 --batch 4 --seq 32 --repeat 1
    python bench/multi_gpu.py --shape qwen3-mini --shard fsdp --device cpu --ranks 2 --batch 4 --seq 32 --repeat 1

The one-GPU baseline runs first, in this process on cuda:0, and is freed before the ranks start, so
both see the same free memory (--skip-one leaves it out: a 32B model does not fit one GPU). Prints
one JSON line: tokens/s of each, the speed-up, optim_step time, peak memory of rank 0 and, sharded,
the bytes of base weights rank 0 holds against the whole model's.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_throughput import SHAPES, make_model

from app.domain.models import ModelSpec, builtin_tiny_spec
from app.domain.ops import AdamParams, Datum, ForwardBackwardOp, LoraConfig, OptimStepOp
from app.domain.tensors import Array
from workers.engine import DeviceFatal, EngineConfig, OutOfMemory, TorchEngine
from workers.engine.data_parallel import EngineArgs, launch
from workers.engine.sharded import ShardedEngine

# Into engine_throughput's own table, which make_model reads.
SHAPES.update({"qwen3-32b": (5120, 64, 64, 8, 25600), "qwen3-mini": (64, 2, 4, 2, 128)})


def make_op(batch: int, seq_len: int, vocab: int) -> ForwardBackwardOp:
    gen = torch.Generator().manual_seed(0)
    data = []
    for _ in range(batch):
        toks = torch.randint(0, vocab, (seq_len + 1,), generator=gen).tolist()
        data.append(
            Datum(tokens=tuple(toks[:-1]), loss_fn_inputs={"target_tokens": Array.from_list(toks[1:], "int64")})
        )
    return ForwardBackwardOp(data=tuple(data), loss_fn="cross_entropy")


def measure(engine: Any, name: str, op: ForwardBackwardOp, repeat: int, rank: int) -> dict[str, float]:
    """tokens/s of forward_backward (after one warm-up op) and the time of an optim_step."""
    engine.create_run("bench", name, LoraConfig(rank=rank, seed=0))
    step = OptimStepOp(adam=AdamParams(learning_rate=1e-5))
    engine.forward_backward("bench", op)
    engine.optim_step("bench", step)
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        engine.forward_backward("bench", op)
    sync()
    fb_s = (time.perf_counter() - start) / repeat
    start = time.perf_counter()
    engine.optim_step("bench", step)
    sync()
    tokens = sum(len(d.tokens) for d in op.data)
    return {"tokens_per_s": tokens / fb_s, "forward_backward_s": fb_s, "optim_step_s": time.perf_counter() - start}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="qwen3-8b", choices=["tiny", *sorted(SHAPES)])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--ranks", type=int, default=2, help="processes (GPUs) of the data-parallel engine")
    p.add_argument("--batch", type=int, default=16, help="datums per forward_backward")
    p.add_argument("--seq", type=int, default=1024, help="tokens per datum")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--micro-batch-tokens", default="auto")
    p.add_argument("--shard", default="replicate", choices=["replicate", "fsdp"], help="base model on the ranks")
    p.add_argument("--skip-one", action="store_true", help="no one-device baseline")
    p.add_argument("--checkpointing", default="auto", choices=["auto", "on", "off"], help="activation checkpointing")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="tuft-multi-gpu-") as tmp:
        work = Path(tmp)
        if args.shape == "tiny":
            spec = builtin_tiny_spec()
        else:
            max_len = max(8192, args.seq)
            make_model(args.shape, work / "model", work / "cache", args.device, max_len)
            spec = ModelSpec(model_name=args.shape, model_path=str(work / "model"), max_model_len=max_len)
        tokens = None if args.micro_batch_tokens == "auto" else int(args.micro_batch_tokens)
        config = EngineConfig(micro_batch_tokens=tokens, activation_checkpointing=args.checkpointing)
        op = make_op(args.batch, args.seq, 150_000)
        result: dict[str, Any] = {"shape": args.shape, "ranks": args.ranks, "batch": args.batch, "seq": args.seq}
        result["shard"] = args.shard
        result["device"] = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
        if args.skip_one:
            result["one"] = "skipped"
        else:
            one = TorchEngine([spec], device=args.device, cache_dir=work / "cache", config=config)
            try:
                result["one"] = measure(one, spec.model_name, op, args.repeat, args.rank)
            except OutOfMemory as exc:
                result["one"] = f"out of memory on one device ({exc}); a model this size needs --shard fsdp"
            del one
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        shard = args.shard == "fsdp"
        engine_args = EngineArgs([spec], device=args.device, cache_dir=work / "cache", config=config, shard=shard)
        dp = launch(engine_args, args.ranks)
        try:
            result["parallel"] = measure(dp, spec.model_name, op, args.repeat, args.rank)
            if isinstance(dp.engine, ShardedEngine):
                local, whole = dp.engine.shard_bytes(spec.model_name)
                result["rank0_base_gib"], result["whole_base_gib"] = local / 2**30, whole / 2**30
        except (OutOfMemory, DeviceFatal) as exc:
            held = "a shard of the base model" if shard else "the whole base model (try --shard fsdp)"
            result["parallel"] = f"{type(exc).__name__} on a rank ({exc}); every rank holds {held}"
        finally:
            dp.close()
        if isinstance(result["one"], dict) and isinstance(result["parallel"], dict):
            result["speedup"] = result["parallel"]["tokens_per_s"] / result["one"]["tokens_per_s"]
        if args.device == "cuda":
            result["rank0_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print(json.dumps(result))


if __name__ == "__main__":
    main()
