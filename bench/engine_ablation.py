"""Where the engine's forward_backward time goes, on one GPU: each switch measured alone and
stacked, beside the naive loop, in one process (bench/train_compare.py builds the models).

    python bench/engine_ablation.py --shape qwen3-0.6b --op 8x1024 --profile

Variants (cumulative, in this order): the engine with an explicit attention mask (as before);
the engine as configured; without deterministic kernels;
with Liger's RMSNorm / SwiGLU / RoPE kernels patched into the model; with TF32 for the float32 LoRA
matmuls; under bf16 autocast; (--compile) with each decoder layer compiled.
`--profile` prints the top CUDA kernels of the naive loop and of the last variant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train_compare import (
    OOM,
    PEAK_TFLOPS,
    batch,
    build_model,
    clear,
    engine_op,
    make_engine,
    naive_model,
    naive_step,
    params_without_embedding,
    timed,
)
from workers.engine import EngineConfig
from workers.engine.kernels import apply_fused_kernels


def profile(fn: Any, label: str, rows: int = 25, cpu: bool = False) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(f"\n==== profile: {label}")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=70))
    if cpu:  # where the host's time goes, when the step is launch-bound
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=70))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="qwen3-0.6b")
    p.add_argument("--op", default="8x1024", help="op shapes, e.g. 8x1024,4x4096")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--quick", action="store_true", help="skip the masked and TF32 variants")
    p.add_argument(
        "--shipped", action="store_true", help="the naive loop, the engine as shipped, and with PEFT's LoRA forward"
    )
    p.add_argument("--compile", action="store_true", help="also torch.compile each decoder layer")
    p.add_argument("--out", default="")
    args = p.parse_args()
    shapes = [tuple(int(x) for x in item.lower().split("x")) for item in args.op.split(",")]
    rows: list[dict[str, Any]] = []
    n_params = params_without_embedding(build_model(args.shape))
    clear()

    def record(variant: str, op_name: str, tokens: int, seconds: float | None) -> None:
        row: dict[str, Any] = {"shape": args.shape, "op": op_name, "variant": variant}
        if seconds is None:
            row["oom"] = True
        else:
            tps = tokens / seconds
            row.update(
                tokens_per_s=round(tps),
                mfu=round(4 * n_params * tps / (PEAK_TFLOPS * 1e12), 4),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
            )
        row["device"] = torch.cuda.get_device_name(0)
        rows.append(row)
        print(json.dumps(row), flush=True)

    def measure(variant: str, make_fn: Any) -> None:
        for n, seq in shapes:
            fn = make_fn(n, seq)
            clear()
            try:
                record(variant, f"{n}x{seq}", n * seq, timed(fn, args.repeat))
            except OOM:
                clear()
                record(variant, f"{n}x{seq}", n * seq, None)

    if not args.skip_naive:
        model = naive_model(args.shape, args.rank)
        measure("naive", lambda n, seq: lambda ids=batch(n, seq): naive_step(model, ids))
        if args.profile:
            ids = batch(*shapes[0])
            profile(lambda: naive_step(model, ids), "naive")
        del model
        clear()

    import tempfile

    if args.shipped:
        # The engine as it ships (EngineConfig's defaults: fused kernels, bf16 autocast, the fused
        # LoRA node, PyTorch's default kernels on CUDA), then with deterministic kernels (what
        # engine_deterministic: on costs); the same two with PEFT's LoRA forward (lora_kernel=peft).
        work = Path(tempfile.mkdtemp())  # the model folder is written once, loaded by both engines

        def shipped_variant(kernel: str) -> None:
            shipped = make_engine(args.shape, work, args.rank, EngineConfig(lora_kernel=kernel))  # type: ignore[arg-type]
            ops = {shape: engine_op(*shape) for shape in shapes}
            name = "engine-shipped" if kernel == "fused" else "engine-shipped-peft"
            torch.use_deterministic_algorithms(False)
            measure(name, lambda n, seq: lambda: shipped.forward_backward("bench", ops[(n, seq)]))
            if args.profile:
                profile(lambda: shipped.forward_backward("bench", ops[shapes[0]]), name, cpu=True)
            torch.use_deterministic_algorithms(True, warn_only=True)
            measure(name + "-deterministic", lambda n, seq: lambda: shipped.forward_backward("bench", ops[(n, seq)]))
            torch.use_deterministic_algorithms(False)

        for kernel in ("fused", "peft"):
            shipped_variant(kernel)
            clear()
        if args.out:
            with open(args.out, "a") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
        return

    # Torch kernels first; Liger's are patched in below, as kernels="auto" does when installed.
    engine = make_engine(args.shape, Path(tempfile.mkdtemp()), args.rank, EngineConfig(kernels="torch", autocast="off"))
    ops = {shape: engine_op(*shape) for shape in shapes}

    def step(n: int, seq: int) -> Any:
        return lambda: engine.forward_backward("bench", ops[(n, seq)])

    import workers.engine.losses as losses

    unmasked = losses.decoder_hidden
    # What the engine did before: an explicit (all-ones here) attention mask.
    losses.decoder_hidden = lambda model, ids, mask=None, cache=None: unmasked(  # type: ignore[assignment]
        model, ids, torch.ones_like(ids)
    )
    if not args.quick:
        measure("engine-masked", step)
    losses.decoder_hidden = unmasked
    measure("engine", step)
    print("report", engine.micro_batch_report(args.shape), flush=True)
    torch.use_deterministic_algorithms(False)
    measure("engine-nondeterministic", step)
    if apply_fused_kernels(engine._slots[args.shape].loaded.model, torch.device("cuda"), "auto"):
        measure("engine-nondet-liger", step)
    else:
        print("no liger-kernel: the liger variants are the torch ones")
    if not args.quick:
        torch.backends.cuda.matmul.allow_tf32 = True
        measure("engine-nondet-liger-tf32", step)

    def autocast_step(n: int, seq: int) -> Any:
        def run() -> Any:
            # The float32 LoRA matmuls in bf16 (weights, optimizer and gradients stay float32).
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return engine.forward_backward("bench", ops[(n, seq)])

        return run

    measure("engine-nondet-liger-autocast", autocast_step)
    if args.compile:
        try:
            decoder = engine._slots[args.shape].loaded.model.get_decoder()
            for layer in decoder.layers:
                layer.compile(dynamic=True)
            measure("engine-nondet-liger-autocast-compile", autocast_step)
        except Exception as exc:  # an experiment: report, don't lose the rows above
            print("compile failed:", type(exc).__name__, str(exc)[:500], flush=True)
    step = autocast_step
    if args.profile:
        profile(step(*shapes[0]), "engine (last variant)")
    if args.out:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
