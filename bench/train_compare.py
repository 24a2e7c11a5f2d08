"""Training throughput side by side, in one process on one GPU: a naive HF + PEFT loop (what a
researcher writes in an afternoon) and the TuFT engine, on random-weight Qwen3 shapes.

    python bench/train_compare.py --shape qwen3-0.6b --ops 8x1024 --largest 16384,32768,65536
    python bench/train_compare.py --shape qwen3-8b --ops 2x1024,8x1024 --out bench/results/x.json

For each op shape (sequences x tokens) it prints tokens/s, MFU and peak GPU memory of both, then
the largest single op each one completes from `--largest` (total tokens, as 1024-token sequences,
plus one single sequence of `--longest` tokens). MFU counts 4 * N * tokens model FLOPs (forward
2N, backward through the activations 2N; LoRA adds no weight-gradient matmuls of the base) over
the card's dense bf16 peak (989 TFLOP/s for an H100 SXM), with N the base model's parameters
without the input embedding. Throughput does not depend on the weight values, so the models are
random and built directly on the GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, Qwen3Config, Qwen3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.domain.models import ModelSpec
from app.domain.ops import Datum, ForwardBackwardOp, LoraConfig
from app.domain.tensors import Array
from workers.engine import EngineConfig, TorchEngine, build_tiny_tokenizer
from workers.engine.errors import OutOfMemory

# The naive loop raises torch's error; the engine translates it into its own at its boundary.
OOM = (torch.OutOfMemoryError, OutOfMemory)

# Public Qwen3 configs: hidden, layers, heads, kv heads, intermediate, tied embeddings.
SHAPES = {
    "qwen3-0.6b": (1024, 28, 16, 8, 3072, True),
    "qwen3-4b": (2560, 36, 32, 8, 9728, True),
    "qwen3-8b": (4096, 36, 32, 8, 12288, False),
}
PEAK_TFLOPS = 989.0  # H100 SXM dense bf16
VOCAB = 151_936


def config_for(shape: str) -> Qwen3Config:
    hidden, layers, heads, kv, inter, tied = SHAPES[shape]
    return Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=128,
        intermediate_size=inter,
        max_position_embeddings=65536,
        tie_word_embeddings=tied,
    )


def build_model(shape: str) -> Qwen3ForCausalLM:
    """Random bf16 weights, built on the GPU (minutes faster than on the CPU for 8B)."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Qwen3ForCausalLM(config_for(shape))
    finally:
        torch.set_default_dtype(previous)
    return model


def params_without_embedding(model: torch.nn.Module) -> int:
    embed = model.get_input_embeddings().weight  # type: ignore[operator]
    total = sum(p.numel() for p in model.parameters())
    tied = model.get_output_embeddings().weight is embed  # type: ignore[operator]
    # A tied unembedding still costs its matmul: count it once.
    return total if tied else total - embed.numel()


def batch(n: int, seq: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 150_000, (n, seq + 1), generator=gen)


def clear() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def timed(fn: Callable[[], Any], repeat: int) -> float:
    fn()  # warm-up (allocator, kernels)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def fits(fn: Callable[[], Any]) -> bool:
    try:
        fn()
        torch.cuda.synchronize()
        return True
    except OOM:
        return False
    finally:
        clear()


# ---- the naive loop ------------------------------------------------------------------------


def naive_step(model: torch.nn.Module, ids: torch.Tensor) -> None:
    """model(ids), float logits, cross-entropy, backward: the loop from any tutorial."""
    ids = ids.cuda()
    logits = model(input_ids=ids[:, :-1]).logits.float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    model.zero_grad(set_to_none=True)


def naive_model(shape: str, rank: int) -> torch.nn.Module:
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model

    base = build_model(shape)
    return get_peft_model(base, PeftLora(r=rank, lora_alpha=rank, target_modules="all-linear"))


# ---- the TuFT engine -----------------------------------------------------------------------


def engine_op(n: int, seq: int, seed: int = 0) -> ForwardBackwardOp:
    ids = batch(n, seq, seed)
    data = tuple(
        Datum(
            tokens=tuple(row[:-1].tolist()),
            loss_fn_inputs={"target_tokens": Array.from_list(row[1:].tolist(), "int64")},
        )
        for row in ids
    )
    return ForwardBackwardOp(data=data, loss_fn="cross_entropy")


def save_model_folder(model: PreTrainedModel, folder: Path, cache: Path) -> None:
    """A folder that a `supported_models` entry (or a ModelSpec) can point at: the weights, their
    config and the real Qwen BPE tokenizer (built offline)."""
    model.save_pretrained(folder)
    build_tiny_tokenizer(cache).save_pretrained(folder)


def make_engine(shape: str, work: Path, rank: int, config: EngineConfig | None = None) -> TorchEngine:
    folder = work / shape
    if not folder.exists():
        model = build_model(shape)
        save_model_folder(model, folder, work / "cache")
        del model
        clear()
    spec = ModelSpec(model_name=shape, model_path=str(folder), max_model_len=65536)
    engine = TorchEngine([spec], device="cuda", cache_dir=work / "cache", config=config)
    engine.create_run("bench", shape, LoraConfig(rank=rank, seed=0))
    return engine


def parse_ops(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        n, seq = item.lower().split("x")
        out.append((int(n), int(seq)))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    p.add_argument("--ops", default="8x1024", help="op shapes to time, e.g. 8x1024,16x1024")
    p.add_argument("--largest", default="", help="total tokens to try as one op, e.g. 16384,65536")
    p.add_argument("--longest", type=int, default=0, help="one single sequence of this many tokens")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--out", default="")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp())
    rows: list[dict[str, Any]] = []
    largest = [int(x) for x in args.largest.split(",") if x]

    def record(**row: Any) -> None:
        row.update(shape=args.shape, rank=args.rank, device=torch.cuda.get_device_name(0))
        rows.append(row)
        print(json.dumps(row), flush=True)

    n_params = params_without_embedding(build_model(args.shape))
    clear()

    def mfu(tokens_per_s: float) -> float:
        return round(4 * n_params * tokens_per_s / (PEAK_TFLOPS * 1e12), 4)

    if not args.skip_naive:
        model = naive_model(args.shape, args.rank)
        for n, seq in parse_ops(args.ops):
            ids = batch(n, seq)
            clear()
            try:
                t = timed(lambda ids=ids: naive_step(model, ids), args.repeat)
            except OOM:
                clear()
                record(system="naive", op=f"{n}x{seq}", oom=True)
                continue
            record(
                system="naive",
                op=f"{n}x{seq}",
                tokens_per_s=round(n * seq / t),
                mfu=mfu(n * seq / t),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
            )
        for total in largest:
            ok = fits(lambda total=total: naive_step(model, batch(total // 1024, 1024)))
            record(system="naive", largest_try=f"{total // 1024}x1024", fits=ok)
        if args.longest:
            ok = fits(lambda: naive_step(model, batch(1, args.longest)))
            record(system="naive", largest_try=f"1x{args.longest}", fits=ok)
        del model
        clear()

    engine = make_engine(args.shape, work, args.rank)
    for n, seq in parse_ops(args.ops):
        op = engine_op(n, seq)
        clear()
        try:
            t = timed(lambda op=op: engine.forward_backward("bench", op), args.repeat)
        except OOM:
            clear()
            record(system="tuft-engine", op=f"{n}x{seq}", oom=True)
            continue
        record(
            system="tuft-engine",
            op=f"{n}x{seq}",
            tokens_per_s=round(n * seq / t),
            mfu=mfu(n * seq / t),
            peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
        )
    for total in largest:
        op = engine_op(total // 1024, 1024)
        start = time.perf_counter()
        ok = fits(lambda op=op: engine.forward_backward("bench", op))
        record(
            system="tuft-engine",
            largest_try=f"{total // 1024}x1024",
            fits=ok,
            seconds=round(time.perf_counter() - start, 2),
        )
    if args.longest:
        op = engine_op(1, args.longest)
        start = time.perf_counter()
        ok = fits(lambda: engine.forward_backward("bench", op))
        record(
            system="tuft-engine",
            largest_try=f"1x{args.longest}",
            fits=ok,
            seconds=round(time.perf_counter() - start, 2),
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
