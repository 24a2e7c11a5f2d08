"""Probe for the FSDP2 design (docs/architecture.md, "Models larger than one GPU"): is a base model
whose decoder layers are sharded with `fully_shard`, with PEFT's LoRA layers injected *after* the
sharding (as the engine adds a run's adapter long after the model loaded), equal to the unsharded
model? Prints the loss and the largest LoRA-gradient difference against one unsharded process.

    python bench/fsdp_probe.py                      # CPU, gloo, the built-in tiny model
    python bench/fsdp_probe.py --device cuda --ranks 2  # GPUs, NCCL

The probe that chose the design; the engine's sharding is workers/engine/sharded.py (tested in
tests/engine/test_sharded.py). On the CPU (torch 2.13.0+cpu, 2 ranks) the sharded and unsharded
runs gave the same loss and bitwise-equal LoRA gradients.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IDS = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16]]


def work(rank: int, world: int, port: int, device: str, out: str) -> None:
    from app.domain.ops import LoraConfig
    from workers.engine import build_tiny_model
    from workers.engine.adapters import AdapterHost, peft_config_for

    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    where = torch.device(f"cuda:{rank}" if device == "cuda" else "cpu")
    model = build_tiny_model()
    model.to(where)  # type: ignore[arg-type]  # transformers types .to as a wrapped method
    model.requires_grad_(False)  # the frozen base, as under LoRA
    if world > 1:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    host = AdapterHost(model)
    host.add("r", peft_config_for(LoraConfig(rank=4, seed=1, train_unembed=False), model), seed=1)
    host.activate("r", trainable=True)
    # Every rank runs the same rows here: sharded forwards are collectives, so ranks go in lockstep.
    logits = host.model(torch.tensor(IDS, device=where)).logits.float()
    loss = torch.log_softmax(logits, -1)[..., 0].sum()
    loss.backward()
    grads = {k: p.grad.detach().cpu() for k, p in host.params("r").items() if p.grad is not None}
    sharded = type(next(model.model.layers[0].parameters())).__name__
    torch.save({"loss": float(loss.detach()), "grads": grads, "sharded": sharded}, f"{out}/w{world}_r{rank}.pt")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--ranks", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(work, args=(args.ranks, free_port(), args.device, out), nprocs=args.ranks)
        mp.spawn(work, args=(1, free_port(), args.device, out), nprocs=1)
        one = torch.load(f"{out}/w1_r0.pt")
        for rank in range(args.ranks):
            got = torch.load(f"{out}/w{args.ranks}_r{rank}.pt")
            gap = max(float((got["grads"][k] - g).abs().max()) for k, g in one["grads"].items())
            print(
                f"rank {rank}: base weights {got['sharded']}, loss {got['loss']:.6f} (unsharded {one['loss']:.6f}), "
                f"{len(got['grads'])}/{len(one['grads'])} LoRA grads, max |diff| {gap:.3g}"
            )


if __name__ == "__main__":
    main()
