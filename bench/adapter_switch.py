"""Host time of switching the active LoRA adapter (issue 8/11): PEFT's `set_adapter`, which the
engine used before every training op, against AdapterHost.activate's switch from a known state.

The cost depends on the number of modules and resident adapters, not on the widths, so the model
has a real architecture's layer structure (Qwen3-0.6B: 28 layers, LoRA on all 7 linear targets)
with narrow widths and runs on the CPU:

    python bench/adapter_switch.py --layers 28 --adapters 1,2,8,32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import Qwen3Config, Qwen3ForCausalLM

from app.domain.ops import LoraConfig
from workers.engine.adapters import AdapterHost, peft_config_for


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--adapters", default="1,2,8,32")
    args = p.parse_args()
    cfg = Qwen3Config(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    model = Qwen3ForCausalLM(cfg)
    model.requires_grad_(False)
    host = AdapterHost(model, fused=True)
    config = peft_config_for(LoraConfig(rank=8), model)
    for count in (int(x) for x in args.adapters.split(",")):
        while len(host.names()) < count:
            host.add(f"a{len(host.names())}", config, seed=1)
        names = host.names()
        host.activate(names[0], trainable=True)
        start = time.perf_counter()
        for i in range(20):
            host._active = None  # forget the state: PEFT's set_adapter, as before
            host.activate(names[i % len(names)], trainable=True)
        full = (time.perf_counter() - start) / 20 * 1e3
        start = time.perf_counter()
        for i in range(200):
            host.activate(names[i % len(names)], trainable=True)
        fast = (time.perf_counter() - start) / 200 * 1e3
        print(f"{count:3d} resident adapters: PEFT set_adapter {full:8.2f} ms   switch {fast:7.3f} ms")


if __name__ == "__main__":
    main()
