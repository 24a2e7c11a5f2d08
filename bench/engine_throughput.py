"""Engine throughput on a Qwen3-shaped model with random weights (throughput does not depend on
the weight values). Run on a GPU machine:

    python bench/engine_throughput.py --shape qwen3-0.6b --device cuda
    python bench/engine_throughput.py --shape qwen3-8b --batch 64 --seq 1024 --no-sample
    python bench/engine_throughput.py --shape qwen3-8b --ops 64x1024,1x32768 --no-sample

Prints tokens/s of forward_backward, the time of an optim_step, decode tokens/s of sample, the
peak GPU memory, and how forward_backward was split: the micro-batch budget it used (padded tokens,
workers/engine/microbatch.py), whether activation checkpointing was on, and out-of-memory retries.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from app.domain.models import ModelSpec
from app.domain.ops import AdamParams, Datum, ForwardBackwardOp, LoraConfig, OptimStepOp, SampleOp, SamplingParams
from app.domain.tensors import Array
from workers.engine import EngineConfig, OutOfMemory, TorchEngine, build_tiny_tokenizer

# Public Qwen3 configs (hidden, layers, heads, kv heads, intermediate).
SHAPES = {
    "qwen3-0.6b": (1024, 28, 16, 8, 3072),
    "qwen3-4b": (2560, 36, 32, 8, 9728),
    "qwen3-8b": (4096, 36, 32, 8, 12288),
}


def make_model(shape: str, folder: Path, cache: Path, device: str, max_len: int) -> None:
    hidden, layers, heads, kv, inter = SHAPES[shape]
    config = Qwen3Config(
        vocab_size=151_936,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=128,
        intermediate_size=inter,
        max_position_embeddings=max_len,
        tie_word_embeddings=shape == "qwen3-0.6b",
        torch_dtype="bfloat16",
    )
    # Random init on the GPU is far faster than on the CPU (minutes for 8B there).
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(config)
        model.save_pretrained(folder)
    finally:
        torch.set_default_dtype(default)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    build_tiny_tokenizer(cache).save_pretrained(folder)


def timed(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", "--seq-len", dest="seq_len", type=int, default=1024)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--micro-batch-tokens", default="auto", help="padded tokens per micro-batch, or auto")
    p.add_argument("--checkpointing", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--no-sample", action="store_true", help="time forward_backward and optim_step only")
    p.add_argument("--ops", default=None, help="several op shapes on one model, e.g. 64x1024,1x32768 (one line each)")
    args = p.parse_args()
    shapes = [tuple(int(x) for x in op.split("x")) for op in args.ops.split(",")] if args.ops else []
    shapes = shapes or [(args.batch, args.seq_len)]
    work = Path(tempfile.mkdtemp())
    try:
        run_bench(args, shapes, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the model folder: 16 GB for qwen3-8b


def run_bench(args: argparse.Namespace, shapes: list[tuple[int, ...]], work: Path) -> None:
    max_len = max(8192, *(seq for _, seq in shapes))
    make_model(args.shape, work / "model", work / "cache", args.device, max_len)
    spec = ModelSpec(model_name=args.shape, model_path=str(work / "model"), max_model_len=max_len)
    config = EngineConfig(
        micro_batch_tokens=None if args.micro_batch_tokens == "auto" else int(args.micro_batch_tokens),
        activation_checkpointing=args.checkpointing,
    )
    engine = TorchEngine([spec], device=args.device, cache_dir=work / "cache", config=config)
    engine.create_run("r", args.shape, LoraConfig(rank=args.rank, seed=0))
    for batch, seq_len in shapes:
        bench_op(engine, args, batch, seq_len)


def bench_op(engine: TorchEngine, args: argparse.Namespace, batch: int, seq_len: int) -> None:
    gen = torch.Generator().manual_seed(0)
    data = []
    for _ in range(batch):
        toks = torch.randint(0, 150_000, (seq_len + 1,), generator=gen).tolist()
        data.append(
            Datum(tokens=tuple(toks[:-1]), loss_fn_inputs={"target_tokens": Array.from_list(toks[1:], "int64")})
        )
    op = ForwardBackwardOp(data=tuple(data), loss_fn="cross_entropy")
    tokens = batch * seq_len
    cuda = torch.cuda.is_available()
    result: dict[str, object] = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "shape": args.shape,
        "rank": args.rank,
        "batch": batch,
        "seq_len": seq_len,
        "fwd_bwd_tokens": tokens,
    }
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        fb = timed(lambda: engine.forward_backward("r", op), args.repeat)
    except OutOfMemory as exc:
        result["error"] = f"OutOfMemory: {exc}"
        print(json.dumps(result), flush=True)
        return
    report = engine.micro_batch_report(args.shape)
    result.update(
        {
            "fwd_bwd_seconds": round(fb, 4),
            "fwd_bwd_tokens_per_s": round(tokens / fb),
            "micro_batch": asdict(report) if report is not None else None,
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        }
    )
    opt = timed(lambda: engine.optim_step("r", OptimStepOp(adam=AdamParams(learning_rate=1e-5))), 3)
    result["optim_step_seconds"] = round(opt, 4)
    if not args.no_sample:
        sample = SampleOp(
            prompt=tuple(range(1000, 1128)),
            num_samples=8,
            params=SamplingParams(max_tokens=128, temperature=1.0, seed=1),
        )
        samp = timed(lambda: engine.sample(args.shape, None, sample), 1)
        result["sample_8x128_seconds"] = round(samp, 3)
        result["sample_decode_tokens_per_s"] = round(8 * 128 / samp)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
