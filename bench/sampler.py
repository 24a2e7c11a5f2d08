"""The sampler (issue 9) in process: B requests of one prompt length, each asking for N new tokens
through a rank-r LoRA sampler adapter, decoded by

- hf_generate: HF `generate` on a PEFT model (do_sample, the whole batch in one call);
- tuft_loop: the previous TuFT sampler, one request after another (sampling.sample);
- tuft_batched: TorchEngine.sample_many, all B requests in one batch, decode.py's own step
  (EngineConfig.decode_graphs="off");
- tuft_graphs: the same batch with the static-shape step of decode_graph.py, replayed from CUDA
  graphs on CUDA (decode_graphs="on"; on the CPU the static step runs uncaptured). Its buffers
  and graphs are kept across calls (decode_state.py): the row also gives the first call's time
  (allocation and capture included) and how many buffers and steps the calls built (1 and the
  number of step shapes when the later calls reused them).

Prints tokens/s (B x N / wall time) for each, per batch size, the batched/HF and graphs/HF ratios,
and on CUDA each TuFT mode's fraction of the weight-read roofline: decode steps per second times
the bytes of the weights (base + LoRA), over the HBM bandwidth (--hbm, 3.35e12 B/s for an H100
SXM). At batch 1 that is the issue's "fraction of the HBM roofline"; KV-cache reads and the prefill
are not counted, so it is a lower bound of the bandwidth used.

    python bench/sampler.py --device cuda --shape qwen3-0.6b --batches 1,8,32,64
    python bench/sampler.py --device cpu --batches 1,8 --new 16    # the built-in tiny model
    python bench/sampler.py --device cuda --modes tuft_graphs --batches 1 --new 512  # one mode

Each mode runs once to warm up, then --repeat times; the best time is kept. tuft_loop is skipped
above --loop-max requests (it is linear in B).
"""

from __future__ import annotations

import argparse
import dataclasses
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
from workers.engine.config import BatchRunsPolicy
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
    p.add_argument("--modes", default="hf_generate,tuft_loop,tuft_batched,tuft_graphs")
    p.add_argument("--hbm", type=float, default=3.35e12, help="HBM bytes/s for the roofline fraction")
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
    weight_bytes = sum(t.numel() * t.element_size() for t in hf_peft.parameters())
    rows: list[dict[str, Any]] = []
    for b in (int(x) for x in args.batches.split(",")):
        row = _measure(args, engine, base, adapter, hf_peft, b)
        if args.device == "cuda":
            for mode in ("tuft_batched", "tuft_graphs", "hf_generate"):
                if mode in row:  # steps/s x weight bytes / bandwidth
                    row[f"{mode}_roofline"] = row[mode] / b * weight_bytes / args.hbm
        rows.append(row)
        print(f"batch {b:3d}: " + "  ".join(_cell(row, mode) for mode in _MODES if mode in row), end="", flush=True)
        for mode in ("tuft_batched", "tuft_graphs"):
            if mode in row and "hf_generate" in row:
                print(f"  {mode.removeprefix('tuft_')}/hf {row[mode] / row['hf_generate']:.2f}", end="")
        print(flush=True)
    shape = base if args.device == "cuda" else "tiny"
    report = {"device": args.device, "shape": shape, "rank": args.rank, "weight_bytes": weight_bytes, "rows": rows}
    if args.device == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


_MODES = ("hf_generate", "tuft_loop", "tuft_batched", "tuft_graphs")


def _cell(row: dict[str, Any], mode: str) -> str:
    roof = row.get(f"{mode}_roofline")
    return f"{mode} {row[mode]:9.1f} tok/s" + (f" ({roof:.0%} roofline)" if roof is not None else "")


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

    def batched(graphs: BatchRunsPolicy) -> Callable[[], None]:
        def run() -> None:
            engine._config = dataclasses.replace(engine._config, decode_graphs=graphs)
            results = engine.sample_many(requests)
            assert all(not isinstance(r, Exception) for r in results), results

        return run

    def loop() -> None:
        slot = engine._slots[base]
        slot.host.activate(engine._sampler.adapter(slot, base, adapter))
        for op in ops:
            loop_sample(slot.loaded, op, args.new)

    modes = args.modes.split(",")
    if "hf_generate" in modes:
        row["hf_generate"] = tokens / _best(hf, args.device, args.repeat)
    if "tuft_loop" in modes and b <= args.loop_max:
        row["tuft_loop"] = tokens / _best(loop, args.device, args.repeat)
    if "tuft_batched" in modes:
        row["tuft_batched"] = tokens / _best(batched("off"), args.device, args.repeat)
    if "tuft_graphs" in modes:
        # The first call builds the static step's buffers and captures its graphs; later calls of
        # the same shape reuse them (decode_state.py): the timed repeats measure those.
        states = engine._slot(base).decode
        states.clear()
        before = (states.allocations, states.builds)
        _sync(args.device)
        start = time.perf_counter()
        batched("on")()
        _sync(args.device)
        row["tuft_graphs_first_call_s"] = time.perf_counter() - start
        row["tuft_graphs"] = tokens / _best(batched("on"), args.device, args.repeat)
        row["graph_buffer_allocations"] = states.allocations - before[0]
        row["graph_steps_built"] = states.builds - before[1]
    for mode in ("tuft_batched", "tuft_graphs"):
        if mode in row and "hf_generate" in row:
            row[f"{mode.removeprefix('tuft_')}_over_hf"] = row[mode] / row["hf_generate"]
    return row


if __name__ == "__main__":
    main()
