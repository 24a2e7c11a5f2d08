"""save_run / load_run: standard PEFT folders, exact resume of weights and optimizer."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict

from app.domain.models import ModelSpec, builtin_tiny_spec
from app.domain.ops import AdamParams, LoraConfig, OptimStepOp
from tests.engine.helpers import TINY, datum, fb, lora, ref_tol, same_grads
from workers.engine import OpInputError, TorchEngine, build_tiny_model, read_checkpoint_config
from workers.engine.checkpoint import PEFT_KEY_MAPPING

SEQS = ([101, 57, 12, 7, 102, 55, 66], [9, 8, 7, 6, 5])
ADAM = OptimStepOp(adam=AdamParams(learning_rate=5e-3, weight_decay=0.01, grad_clip_norm=10.0))


def _train(engine: TorchEngine, run: str, steps: int) -> None:
    for i in range(steps):
        engine.forward_backward(run, fb(datum(SEQS[i % 2]), datum(SEQS[(i + 1) % 2])))
        engine.optim_step(run, ADAM)


def _folder(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


@pytest.mark.filterwarnings("ignore:.*tie_word_embeddings.*", "ignore:.*is_gradient_checkpointing.*")
def test_saved_adapter_loads_in_plain_peft_with_same_logits(engine: TorchEngine, tmp_path: Path) -> None:
    engine.create_run("ck:peft", TINY, lora(rank=4))
    _train(engine, "ck:peft", 3)
    dest = _folder(tmp_path, "peft")
    size = engine.save_run("ck:peft", dest, with_optimizer=False)
    names = sorted(p.name for p in dest.iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors", "tuft_run.json"]
    assert size == sum(p.stat().st_size for p in dest.iterdir())
    config = json.loads((dest / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 32 and config["peft_type"] == "LORA"

    # The file names the unembedding LoRA as Tinker does (model.unembed_tokens); PEFT's own name for
    # it is lm_head, which the mapping restores (docs/downloads.md).
    model = PeftModel.from_pretrained(build_tiny_model(), str(dest), key_mapping=PEFT_KEY_MAPPING)
    # PEFT would also copy the (frozen, 9.7M-parameter) base lm_head; our adapters never carry it.
    peft_keys = get_peft_model_state_dict(model, save_embedding_layers=False)
    assert set(peft_keys) == set(engine.adapter_state("ck:peft"))
    seq = SEQS[0]
    with torch.no_grad():
        logits = model(torch.tensor([seq[:-1]])).logits[0].float()
    reference = torch.log_softmax(logits, -1).gather(-1, torch.tensor(seq[1:]).unsqueeze(-1)).squeeze(-1)
    ours = engine.forward_backward("ck:peft", fb(datum(seq), forward_only=True)).outputs[0]["logprobs"]
    torch.testing.assert_close(torch.tensor(ours.tolist()), reference, atol=ref_tol(1e-5), rtol=1e-5)
    # Trained, so the adapter really matters here.
    base = torch.log_softmax(build_tiny_model()(torch.tensor([seq[:-1]])).logits[0].float(), -1)
    assert not torch.allclose(base.gather(-1, torch.tensor(seq[1:]).unsqueeze(-1)).squeeze(-1), reference)


def test_resume_with_optimizer_is_bitwise_identical(make_engine: Callable[[], TorchEngine], tmp_path: Path) -> None:
    first = make_engine()
    first.create_run("ck:orig", TINY, lora(seed=11))
    _train(first, "ck:orig", 3)
    dest = _folder(tmp_path, "resume")
    first.save_run("ck:orig", dest, with_optimizer=True)
    assert (dest / "optimizer.safetensors").is_file()
    _train(first, "ck:orig", 3)

    second = make_engine()
    second.create_run("ck:resumed", TINY, lora(seed=99))  # the seed is irrelevant once loaded
    second.load_run("ck:resumed", dest, with_optimizer=True)
    assert second.optimizer_steps("ck:resumed") == 3
    _train(second, "ck:resumed", 3)
    assert second.state_digest("ck:resumed") == first.state_digest("ck:orig")
    assert second.optimizer_steps("ck:resumed") == 6


def test_load_weights_only_resets_optimizer(engine: TorchEngine, tmp_path: Path) -> None:
    engine.create_run("ck:w", TINY, lora(seed=3))
    _train(engine, "ck:w", 2)
    dest = _folder(tmp_path, "weights")
    engine.save_run("ck:w", dest, with_optimizer=True)
    engine.create_run("ck:w2", TINY, lora(seed=4))
    engine.forward_backward("ck:w2", fb(datum(SEQS[0])))  # pending gradients are discarded by a load
    engine.load_run("ck:w2", dest, with_optimizer=False)
    saved, loaded = engine.adapter_state("ck:w"), engine.adapter_state("ck:w2")
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert engine.optimizer_steps("ck:w2") == 0
    assert all(g is None for g in engine.adapter_grads("ck:w2").values())
    # A fresh optimizer: same as a new run given the same weights (its first step is plain sign-Adam).
    engine.create_run("ck:w3", TINY, lora(seed=5))
    engine.load_run("ck:w3", dest, with_optimizer=False)
    _train(engine, "ck:w2", 1)
    _train(engine, "ck:w3", 1)
    assert engine.state_digest("ck:w2") == engine.state_digest("ck:w3")


def test_read_checkpoint_config(engine: TorchEngine, tmp_path: Path) -> None:
    config = LoraConfig(rank=6, seed=12, train_mlp=False)
    engine.create_run("ck:cfg", TINY, config)
    dest = _folder(tmp_path, "cfg")
    engine.save_run("ck:cfg", dest, with_optimizer=False)
    assert read_checkpoint_config(dest) == (TINY, config)
    assert TorchEngine.read_checkpoint_config(dest) == (TINY, config)


def test_load_errors_leave_the_run_untouched(cache_dir: Path, tmp_path: Path) -> None:
    other = ModelSpec(model_name="other-tiny", model_path="builtin:tiny-qwen3")
    engine = TorchEngine([builtin_tiny_spec(), other], cache_dir=cache_dir)
    engine.create_run("src", TINY, lora(rank=8))
    _train(engine, "src", 1)
    no_opt = _folder(tmp_path, "no-opt")
    engine.save_run("src", no_opt, with_optimizer=False)

    engine.create_run("dst", TINY, lora(rank=8, seed=2))
    _train(engine, "dst", 1)
    engine.forward_backward("dst", fb(datum(SEQS[1])))
    digest, grads = engine.state_digest("dst"), engine.adapter_grads("dst")

    engine.create_run("rank4", TINY, lora(rank=4))
    rank4 = _folder(tmp_path, "rank4")
    engine.save_run("rank4", rank4, with_optimizer=True)
    engine.create_run("attn", TINY, lora(rank=8, train_mlp=False))
    attn = _folder(tmp_path, "attn")
    engine.save_run("attn", attn, with_optimizer=True)
    engine.create_run("other", "other-tiny", lora(rank=8))
    other_base = _folder(tmp_path, "other")
    engine.save_run("other", other_base, with_optimizer=True)
    broken = tmp_path / "broken"
    shutil.copytree(no_opt, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    missing = _folder(tmp_path, "empty")

    cases = [
        (no_opt, True, "no optimizer state"),
        (rank4, False, "does not match"),
        (attn, False, "does not match"),
        (other_base, False, "base model"),
        (broken, False, "cannot read"),
        (missing, False, "not a TuFT checkpoint"),
    ]
    for src, with_optimizer, message in cases:
        with pytest.raises(OpInputError, match=message):
            engine.load_run("dst", src, with_optimizer=with_optimizer)
        assert engine.state_digest("dst") == digest
        after = engine.adapter_grads("dst")
        assert same_grads(grads, after)
