"""Host time per matrix product on a GPU, in the conditions the engine runs them (issue 8: a Qwen3-0.6B
training step is CPU-bound, and its profile shows ~100 us of CPU per aten::mm where the naive loop
spends ~30 us).

Each condition runs in a fresh subprocess (some settings are process-wide or read once), issues N
small bf16 products back to back without synchronising, and reports microseconds of host time per
call (the GPU work per call is a few microseconds, so the host is what is measured):

    python bench/launch_cost.py            # every condition
    python bench/launch_cost.py --only plain,autocast
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONDITIONS = {
    "plain": "torch.mm on bf16 tensors",
    "linear": "F.linear on bf16 tensors",
    "autocast": "F.linear of bf16 x float32 weight under bf16 autocast",
    "workspace": "plain, with CUBLAS_WORKSPACE_CONFIG=:4096:8 set before start",
    "deterministic": "plain, under torch.use_deterministic_algorithms(True)",
    "fused_lora": "workers/engine/lora_fused.lora_linear forward + backward, per product",
    "after_engine": "plain, after a TorchEngine loaded the built-in model on CUDA (and Liger)",
    "grad_mode": "plain, with inputs requiring grad (autograd records the op)",
}


def measure(condition: str, n: int) -> dict[str, object]:
    import torch
    import torch.nn.functional as F

    dev = torch.device("cuda")
    if condition == "deterministic":
        torch.use_deterministic_algorithms(True, warn_only=True)
    if condition == "after_engine":
        import tempfile

        from app.domain.models import BUILTIN_TINY_MODEL, builtin_tiny_spec
        from app.domain.ops import LoraConfig
        from workers.engine import TorchEngine

        engine = TorchEngine([builtin_tiny_spec()], device="cuda", cache_dir=Path(tempfile.mkdtemp()))
        engine.create_run("r", BUILTIN_TINY_MODEL, LoraConfig(rank=8, seed=0))
    x = torch.randn(2048, 1024, device=dev, dtype=torch.bfloat16, requires_grad=condition == "grad_mode")
    w = torch.randn(1024, 1024, device=dev, dtype=torch.bfloat16)
    w32 = w.float()
    a = torch.randn(32, 1024, device=dev, requires_grad=True)
    b = torch.randn(1024, 32, device=dev, requires_grad=True)
    xs = x.detach().requires_grad_(True)
    from workers.engine.lora_fused import lora_linear

    calls = 0

    def once() -> None:
        nonlocal calls
        if condition == "linear":
            F.linear(x, w)
        elif condition == "autocast":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                F.linear(x, w32)
        elif condition == "fused_lora":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = lora_linear(xs, w, None, [(a, b, 2.0, 0, xs.shape[0])])
            out.sum().backward()
            calls += 7  # products in one forward + backward (2 + 5)
            return
        else:
            torch.mm(x, w)
        calls += 1

    for _ in range(50):
        once()
    torch.cuda.synchronize()
    calls = 0
    start = time.perf_counter()
    for _ in range(n):
        once()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return {
        "condition": condition,
        "what": CONDITIONS[condition],
        "host_us_per_product": round(host / calls * 1e6, 1),
        "wall_us_per_product": round(wall / calls * 1e6, 1),
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--only", default=",".join(CONDITIONS))
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--child", default="")
    p.add_argument("--out", default="")
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.n)), flush=True)
        return
    rows = []
    for condition in args.only.split(","):
        env = dict(os.environ)
        env.pop("CUBLAS_WORKSPACE_CONFIG", None)
        if condition == "workspace":
            env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        cmd = [sys.executable, __file__, "--child", condition, "--n", str(args.n)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        row = json.loads(lines[-1]) if lines else {"condition": condition, "error": done.stderr[-500:]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
