"""Engine throughput on a Qwen3-shaped model with random weights (throughput does not depend on
the weight values). Run on a GPU machine:

    python bench/engine_throughput.py --shape qwen3-0.6b --device cuda

Prints tokens/s of forward_backward, the time of an optim_step, and decode tokens/s of sample.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from app.domain.models import ModelSpec
from app.domain.ops import AdamParams, Datum, ForwardBackwardOp, LoraConfig, OptimStepOp, SampleOp, SamplingParams
from app.domain.tensors import Array
from workers.engine import TorchEngine, build_tiny_tokenizer

# Public Qwen3 configs (hidden, layers, heads, kv heads, intermediate).
SHAPES = {
    "qwen3-0.6b": (1024, 28, 16, 8, 3072),
    "qwen3-4b": (2560, 36, 32, 8, 9728),
    "qwen3-8b": (4096, 36, 32, 8, 12288),
}


def make_model(shape: str, folder: Path, cache: Path) -> None:
    hidden, layers, heads, kv, inter = SHAPES[shape]
    config = Qwen3Config(
        vocab_size=151_936,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=128,
        intermediate_size=inter,
        max_position_embeddings=8192,
        tie_word_embeddings=shape == "qwen3-0.6b",
        torch_dtype="bfloat16",
    )
    with torch.device("cpu"):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
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
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--rank", type=int, default=32)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp())
    make_model(args.shape, work / "model", work / "cache")
    spec = ModelSpec(model_name=args.shape, model_path=str(work / "model"), max_model_len=8192)
    engine = TorchEngine([spec], device=args.device, cache_dir=work / "cache")
    engine.create_run("r", args.shape, LoraConfig(rank=args.rank, seed=0))
    gen = torch.Generator().manual_seed(0)
    data = []
    for _ in range(args.batch):
        toks = torch.randint(0, 150_000, (args.seq_len + 1,), generator=gen).tolist()
        data.append(
            Datum(tokens=tuple(toks[:-1]), loss_fn_inputs={"target_tokens": Array.from_list(toks[1:], "int64")})
        )
    op = ForwardBackwardOp(data=tuple(data), loss_fn="cross_entropy")
    fb = timed(lambda: engine.forward_backward("r", op), 3)
    opt = timed(lambda: engine.optim_step("r", OptimStepOp(adam=AdamParams(learning_rate=1e-5))), 3)
    sample = SampleOp(
        prompt=tuple(range(1000, 1128)), num_samples=8, params=SamplingParams(max_tokens=128, temperature=1.0, seed=1)
    )
    samp = timed(lambda: engine.sample(args.shape, None, sample), 1)
    tokens = args.batch * args.seq_len
    result = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "shape": args.shape,
        "rank": args.rank,
        "fwd_bwd_tokens": tokens,
        "fwd_bwd_seconds": round(fb, 4),
        "fwd_bwd_tokens_per_s": round(tokens / fb),
        "optim_step_seconds": round(opt, 4),
        "sample_8x128_seconds": round(samp, 3),
        "sample_decode_tokens_per_s": round(8 * 128 / samp),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
