"""Many runs, one GPU (issue 8 item 4): R runs on one base model, each sending the same-shaped
forward_backward + optim_step, run one run at a time and together (forward_backward_many), in one
process, side by side. Prints aggregate tokens/s of each and their ratio, and checks that every
run's loss is the same either way (within bf16 tolerance on a GPU).

    python bench/multi_run.py --shape qwen3-0.6b --runs 8 --op 8x512
    python bench/multi_run.py --device cpu --runs 4 --op 2x32     # the built-in tiny model

Both modes run on the same engine and the same runs, alternating (alone, together, alone, ...),
so drift in clocks or memory hits both.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.domain.models import BUILTIN_TINY_MODEL, builtin_tiny_spec
from app.domain.ops import AdamParams, LoraConfig, OptimStepOp
from bench.train_compare import PEAK_TFLOPS, build_model, clear, engine_op, make_engine, params_without_embedding
from workers.engine import EngineConfig, TorchEngine


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--shape", default="qwen3-0.6b")
    p.add_argument("--runs", type=int, default=8)
    p.add_argument("--op", default="8x512", help="each run's op: sequences x tokens")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of each mode")
    p.add_argument("--out", default="")
    args = p.parse_args()
    n, seq = (int(x) for x in args.op.lower().split("x"))
    config = EngineConfig(batch_runs="on")
    if args.device == "cuda":
        n_params = params_without_embedding(build_model(args.shape))
        clear()
        engine = make_engine(args.shape, Path(tempfile.mkdtemp()), args.rank, config)
        base = args.shape
    else:
        engine = TorchEngine([builtin_tiny_spec()], device="cpu", cache_dir=Path(tempfile.mkdtemp()), config=config)
        base, n_params = BUILTIN_TINY_MODEL, 0
    runs = [f"run{k}" for k in range(args.runs)]
    for k, run in enumerate(runs):
        engine.create_run(run, base, LoraConfig(rank=args.rank, seed=k))
    assert engine.vocab_size(base) > 150_000  # engine_op draws ids below 150,000
    ops = {run: engine_op(n, seq, seed=k) for k, run in enumerate(runs)}
    step = OptimStepOp(adam=AdamParams(learning_rate=1e-4))

    def alone() -> list[float]:
        losses = []
        for run in runs:
            losses.append(engine.forward_backward(run, ops[run]).metrics["loss:sum"])
            engine.optim_step(run, step)
        return losses

    def together() -> list[float]:
        results = engine.forward_backward_many([(run, ops[run]) for run in runs])
        for run in runs:
            engine.optim_step(run, step)
        return [r.metrics["loss:sum"] for r in results]  # type: ignore[union-attr]

    tokens = args.runs * n * seq
    times: dict[str, list[float]] = {"alone": [], "together": []}
    alone(), together()  # warm-up (allocator, kernels); both modes see the same state drift
    sync(args.device)
    for _ in range(args.rounds):
        for name, fn in (("alone", alone), ("together", together)):
            start = time.perf_counter()
            fn()
            sync(args.device)
            times[name].append(time.perf_counter() - start)
    # Same weights for both: compare one more forward of each mode without stepping.
    check_alone = [engine.forward_backward(run, ops[run]).metrics["loss:sum"] for run in runs]
    check_together = [r.metrics["loss:sum"] for r in engine.forward_backward_many([(r, ops[r]) for r in runs])]
    worst = max(abs(a - b) / max(abs(a), 1e-9) for a, b in zip(check_alone, check_together, strict=True))
    row: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"}
    row.update(shape=base, runs=args.runs, op=args.op, rank=args.rank, rounds=args.rounds)
    for name, values in times.items():
        best = min(values)
        row[f"{name}_tokens_per_s"] = round(tokens / best)
        if n_params:
            row[f"{name}_mfu"] = round(4 * n_params * tokens / best / (PEAK_TFLOPS * 1e12), 4)
    row["together_over_alone"] = round(min(times["alone"]) / min(times["together"]), 3)
    row["loss_max_rel_diff"] = worst
    if args.device == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
