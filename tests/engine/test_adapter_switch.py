"""AdapterHost.activate switches adapters without PEFT's set_adapter once it knows the state
(issue 11: PEFT's walk over every module and adapter grew with the runs a worker holds). Its
result must be exactly PEFT's: the same active adapter on every LoRA layer and the same
parameters trainable, after any sequence of switches, trainable or not, with the base-model path
(None), a multi-run pass (RowRouter.batch) and adapters added and removed in between."""

from __future__ import annotations

import random

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from app.domain.ops import LoraConfig
from workers.engine.adapters import AdapterHost, peft_config_for
from workers.engine.lora_rows import RowRouter
from workers.engine.tiny import build_tiny_model


def _state(host: AdapterHost) -> tuple[list[object], dict[str, bool]]:
    layers = [m for m in host.model.modules() if isinstance(m, BaseTunerLayer)]
    active = [list(m.active_adapters) for m in layers] + [[m.disable_adapters for m in layers]]
    grads = {n: p.requires_grad for n, p in host.model.named_parameters()}
    return active, grads


def _host() -> AdapterHost:
    torch.manual_seed(0)
    model = build_tiny_model(dtype=torch.float32, device=torch.device("cpu"))
    model.requires_grad_(False)
    return AdapterHost(model, fused=True)


def test_fast_switches_equal_pefts_set_adapter() -> None:
    fast, full = _host(), _host()
    config = peft_config_for(LoraConfig(rank=4), fast.model)
    names = [f"a{i}" for i in range(5)]
    for host in (fast, full):
        for i, name in enumerate(names):
            host.add(name, config, seed=i)
    rng = random.Random(0)
    steps: list[tuple[str, object]] = []
    for _ in range(60):
        roll = rng.random()
        if roll < 0.08:
            steps.append(("base", None))
        elif roll < 0.16:
            steps.append(("batch", tuple(rng.sample(names, 2))))
        elif roll < 0.2:
            steps.append(("add", f"n{len(steps)}"))
        elif roll < 0.24 and len(names) > 3:
            steps.append(("remove", names.pop(rng.randrange(len(names)))))
        else:
            steps.append(("activate", (rng.choice(names), rng.random() < 0.6)))
        if steps[-1][0] == "add":
            names.append(str(steps[-1][1]))
    for kind, arg in steps:
        for host, is_fast in ((fast, True), (full, False)):
            if kind == "base":
                host.activate(None)
            elif kind == "batch":
                with RowRouter(host.model).batch(list(arg)):  # type: ignore[arg-type]
                    pass
            elif kind == "add":
                host.add(str(arg), config, seed=7)
            elif kind == "remove":
                host.remove(str(arg))
            else:
                name, trainable = arg  # type: ignore[misc]
                if is_fast:
                    host.activate(name, trainable=trainable)
                else:
                    host._active = None  # PEFT's own set_adapter every time
                    host.activate(name, trainable=trainable)
        assert _state(fast) == _state(full), f"after {kind} {arg}"
    # The fast path really ran: most steps were switches between known states.
    assert sum(1 for kind, _ in steps if kind == "activate") > 30
