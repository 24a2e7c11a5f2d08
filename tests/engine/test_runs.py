"""create_run / drop_run: deterministic adapter init, idempotency, validation."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from app.domain.ops import LoraConfig
from tests.engine.helpers import TINY, datum, fb, lora, same_grads
from workers.engine import OpInputError, TorchEngine


def test_same_seed_same_adapter_different_seed_different(engine: TorchEngine) -> None:
    engine.create_run("s:train:a", TINY, lora(seed=7))
    engine.create_run("s:train:b", TINY, lora(seed=7))
    engine.create_run("s:train:c", TINY, lora(seed=8))
    a, b, c = (engine.adapter_state(r) for r in ("s:train:a", "s:train:b", "s:train:c"))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    lora_a_keys = [k for k in a if ".lora_A." in k]
    assert lora_a_keys and all(not torch.equal(a[k], c[k]) for k in lora_a_keys)
    # LoRA B starts at zero, so a new adapter does not change the model.
    assert all(torch.count_nonzero(a[k]) == 0 for k in a if ".lora_B." in k)
    assert engine.state_digest("s:train:a") == engine.state_digest("s:train:b")


def test_same_seed_same_adapter_across_engines(make_engine: Callable[[], TorchEngine]) -> None:
    torch.manual_seed(0)
    first = make_engine()
    first.create_run("x", TINY, lora(seed=None))
    torch.manual_seed(1)  # the global RNG must not matter
    second = make_engine()
    second.create_run("y", TINY, LoraConfig(rank=8, seed=0))  # seed None means 0
    assert first.state_digest("x") == second.state_digest("y")


def test_targets_follow_config(engine: TorchEngine) -> None:
    engine.create_run("t:mlp", TINY, lora(train_attn=False, train_mlp=True, train_unembed=False))
    keys = engine.adapter_state("t:mlp").keys()
    modules = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in keys}
    assert modules == {"gate_proj", "up_proj", "down_proj"}
    engine.create_run("t:all", TINY, lora(rank=4))
    state = engine.adapter_state("t:all")
    modules = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in state}
    assert modules == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}
    assert state["base_model.model.lm_head.lora_A.weight"].shape == (4, 64)
    assert state["base_model.model.lm_head.lora_B.weight"].shape == (151_936, 4)


def test_create_is_idempotent_and_rejects_conflicts(engine: TorchEngine) -> None:
    engine.create_run("idem", TINY, lora(seed=3))
    engine.forward_backward("idem", fb(datum([1, 2, 3])))
    digest, grads = engine.state_digest("idem"), engine.adapter_grads("idem")
    engine.create_run("idem", TINY, lora(seed=3))  # same config: no-op, keeps grads
    assert engine.state_digest("idem") == digest
    after = engine.adapter_grads("idem")
    assert same_grads(grads, after)
    with pytest.raises(OpInputError):
        engine.create_run("idem", TINY, lora(seed=4))


@pytest.mark.parametrize(
    ("config", "base", "message"),
    [
        (LoraConfig(rank=0), TINY, "rank"),
        (LoraConfig(rank=-1), TINY, "rank"),
        (LoraConfig(rank=129), TINY, "max_lora_rank"),
        (LoraConfig(train_attn=False, train_mlp=False, train_unembed=False), TINY, "trains nothing"),
        (LoraConfig(), "no/such-model", "unknown base model"),
    ],
)
def test_bad_create_raises_user_error(engine: TorchEngine, config: LoraConfig, base: str, message: str) -> None:
    with pytest.raises(OpInputError, match=message):
        engine.create_run("bad", base, config)
    assert not engine.has_run("bad")


def test_drop_run(engine: TorchEngine) -> None:
    engine.create_run("drop:1", TINY, lora())
    engine.create_run("drop:2", TINY, lora(seed=2))
    keep = engine.state_digest("drop:2")
    assert engine.has_run("drop:1")
    engine.drop_run("drop:1")
    assert not engine.has_run("drop:1")
    engine.drop_run("drop:1")  # dropping twice is fine
    with pytest.raises(KeyError):
        engine.forward_backward("drop:1", fb(datum([1, 2, 3])))
    assert engine.state_digest("drop:2") == keep
    # The id can be reused: a fresh adapter, same init as before.
    engine.create_run("drop:1", TINY, lora())
    engine.create_run("drop:3", TINY, lora())
    assert engine.state_digest("drop:1") == engine.state_digest("drop:3")


def test_constructor_is_lazy_and_vocab_size_needs_no_model(make_engine: Callable[[], TorchEngine]) -> None:
    engine = make_engine()
    assert engine._slots == {}
    assert engine.vocab_size(TINY) == 151_936
    assert engine._slots == {}
    with pytest.raises(OpInputError):
        engine.vocab_size("nope")
