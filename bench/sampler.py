"""The sampler (issue 9) in process: B requests of one prompt length, each asking for N new tokens
through a rank-r LoRA sampler adapter, decoded by

- hf_generate: HF `generate` on a PEFT model (do_sample, the whole batch in one call);
- tuft_loop: the previous TuFT sampler, one request after another (sampling.sample);
- tuft_batched: TorchEngine.sample_many, all B requests in one batch (decode.py).

Prints tokens/s (B x N / wall time) for each, per batch size, and the batched/HF ratio.

    python bench/sampler.py --device cuda --shape qwen3-0.6b --batches 1,8,32,64
    python bench/sampler.py --device cpu --batches 1,8 --new 16    # the built-in tiny model

Each mode runs once to warm up, then --repeat times; the best time is kept. tuft_loop is skipped
above --loop-max requests (it is linear in B).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.domain.models import BUILTIN_TINY_MODEL, builtin_tiny_spec
from app.domain.ops import LoraConfig, SampleOp, SamplingParams
from workers.engine import TorchEngine, build_tiny_model
from workers.engine.adapters import peft_config_for
from workers.engine.decode import SampleRequest
from workers.engine.sampling import sample as loop_sample


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _best(fn: Callable[[], Any], device: str, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--shape", default="qwen3-0.6b", help="cuda only: a bench/train_compare.py shape")
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--loop-max", type=int, default=8)
    p.add_argument("--out", default="")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp())
    if args.device == "cuda":
        from bench.train_compare import build_model, make_engine

        engine = make_engine(args.shape, work, args.rank)
        base = args.shape
        hf_model: Any = build_model(args.shape)
    else:
        engine = TorchEngine([builtin_tiny_spec()], device="cpu", cache_dir=work / "cache")
        base = BUILTIN_TINY_MODEL
        engine.create_run("bench", base, LoraConfig(rank=args.rank, seed=0))
        hf_model = build_tiny_model()
    adapter = work / "adapter"
    adapter.mkdir()
    engine.save_run("bench", adapter, with_optimizer=False)
    import peft

    hf_peft = peft.get_peft_model(hf_model, peft_config_for(LoraConfig(rank=args.rank, seed=0), hf_model))
    hf_peft.eval()
    rows: list[dict[str, Any]] = []
    for b in (int(x) for x in args.batches.split(",")):
        row = _measure(args, engine, base, adapter, hf_peft, b)
        rows.append(row)
        print(
            f"batch {b:3d}: hf_generate {row['hf_generate']:9.1f} tok/s  tuft_batched {row['tuft_batched']:9.1f} tok/s"
            + (f"  tuft_loop {row['tuft_loop']:9.1f} tok/s" if "tuft_loop" in row else "")
            + f"  batched/hf {row['batched_over_hf']:.2f}",
            flush=True,
        )
    shape = base if args.device == "cuda" else "tiny"
    report = {"device": args.device, "shape": shape, "rank": args.rank, "rows": rows}
    if args.device == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


def _measure(
    args: argparse.Namespace, engine: TorchEngine, base: str, adapter: Path, hf_peft: Any, b: int
) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(b)
    prompts = torch.randint(0, 150_000, (b, args.prompt), generator=gen)
    params = [SamplingParams(max_tokens=args.new, seed=i, stop_at_eos=False) for i in range(b)]
    ops = [SampleOp(prompt=tuple(prompts[i].tolist()), params=params[i]) for i in range(b)]
    requests = [SampleRequest(base, adapter, op) for op in ops]
    tokens = b * args.new
    row: dict[str, Any] = {"batch": b, "prompt": args.prompt, "new": args.new}

    def hf() -> None:
        ids = prompts.to(args.device)
        with torch.no_grad():
            hf_peft.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.new,
                min_new_tokens=args.new,
                do_sample=True,
                top_k=0,
                pad_token_id=0,
            )

    def batched() -> None:
        results = engine.sample_many(requests)
        assert all(not isinstance(r, Exception) for r in results), results

    def loop() -> None:
        slot = engine._slots[base]
        slot.host.activate(engine._sampler_adapter(slot, base, adapter))
        for op in ops:
            loop_sample(slot.loaded, op, args.new)

    row["hf_generate"] = tokens / _best(hf, args.device, args.repeat)
    row["tuft_batched"] = tokens / _best(batched, args.device, args.repeat)
    if b <= args.loop_max:
        row["tuft_loop"] = tokens / _best(loop, args.device, args.repeat)
    row["batched_over_hf"] = row["tuft_batched"] / row["hf_generate"]
    return row


if __name__ == "__main__":
    main()
