"""Exported adapters in Tinker's format: tinker-cookbook merges them, PEFT loads them, and folders of
earlier TuFT versions (PEFT's `lm_head` names) still load.

The cookbook tests run its own code (`tinker_cookbook.weights.build_hf_model`, default strategy),
unmodified; they skip when the cookbook or its imports (the `tinker` SDK, `pyrage`) are missing.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, PreTrainedModel, Qwen3ForCausalLM

from app.domain.models import ModelSpec
from app.domain.ops import AdamParams, LoraConfig, OptimStepOp, SampleOp, SamplingParams
from tests.engine.helpers import datum, fb, lora, ref_tol
from workers.engine import OpInputError, TorchEngine, build_tiny_model, build_tiny_tokenizer
from workers.engine.checkpoint import PEFT_KEY_MAPPING, read_adapter_weights
from workers.engine.tiny import tiny_config

SEQ = [101, 57, 12, 7, 102, 55, 66]
TINKER_PREFIX = "base_model.model.model.unembed_tokens."
TINKER_UNEMBED = {
    "base_model.model.model.unembed_tokens.lora_A.weight",
    "base_model.model.model.unembed_tokens.lora_B.weight",
}
PEFT_UNEMBED = {"base_model.model.lm_head.lora_A.weight", "base_model.model.lm_head.lora_B.weight"}
# PEFT warns that LoRA on a tied lm_head cannot be merged (we never merge through PEFT) and reads a
# transformers attribute that transformers 5 renamed.
pytestmark = pytest.mark.filterwarnings("ignore:.*tie_word_embeddings.*", "ignore:.*is_gradient_checkpointing.*")


def _untied_tiny() -> Qwen3ForCausalLM:
    """The built-in tiny model with an output embedding of its own (as Qwen3-8B and larger have)."""
    config = tiny_config()
    config.tie_word_embeddings = False
    model = Qwen3ForCausalLM(config)
    tied = build_tiny_model().state_dict()
    state = model.state_dict()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for key, value in state.items():
            if key == "lm_head.weight":
                value.copy_(torch.randn(value.shape, generator=gen) * 0.25)
            else:
                value.copy_(tied[key])
    return model


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Path]:
    """Hugging Face folders of a tied and an untied tiny model (what the cookbook merges into)."""
    root = tmp_path_factory.mktemp("bases")
    folders = {"tied": root / "tied", "untied": root / "untied"}
    for kind, model in (("tied", build_tiny_model()), ("untied", _untied_tiny())):
        model.save_pretrained(folders[kind])
        build_tiny_tokenizer(cache_dir).save_pretrained(folders[kind])
    return folders


def _trained(bases: dict[str, Path], cache_dir: Path, kind: str, config: LoraConfig) -> TorchEngine:
    engine = TorchEngine([ModelSpec(model_name=kind, model_path=str(bases[kind]))], cache_dir=cache_dir)
    engine.create_run("r", kind, config)
    for _ in range(3):  # trained, so every LoRA B (zero at creation) is non-zero and matters
        engine.forward_backward("r", fb(datum(SEQ)))
        engine.optim_step("r", OptimStepOp(adam=AdamParams(learning_rate=5e-3)))
    return engine


def _save(engine: TorchEngine, dest: Path) -> Path:
    dest.mkdir()
    engine.save_run("r", dest, with_optimizer=True)
    return dest


def _tuft_logprobs(engine: TorchEngine) -> torch.Tensor:
    return torch.tensor(engine.forward_backward("r", fb(datum(SEQ), forward_only=True)).outputs[0]["logprobs"].tolist())


def _logprobs(model: Any) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([SEQ[:-1]])).logits[0].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(SEQ[1:]).unsqueeze(-1)).squeeze(-1)


def _load(folder: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def _cookbook() -> ModuleType:
    try:
        from tinker_cookbook import weights
    except ImportError as exc:  # its package imports the tinker SDK and pyrage as well
        pytest.skip(f"tinker-cookbook's weights module is not importable here: {exc}")
    return weights


def _merge(bases: dict[str, Path], kind: str, adapter: Path, out: Path) -> Path:
    _cookbook().build_hf_model(base_model=str(bases[kind]), adapter_path=str(adapter), output_path=str(out))
    return out


@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_export_names_the_unembedding_lora_as_tinker_does(
    bases: dict[str, Path], cache_dir: Path, tmp_path: Path, kind: str
) -> None:
    engine = _trained(bases, cache_dir, kind, lora(rank=4))
    folder = _save(engine, tmp_path / "export")
    keys = set(load_file(folder / "adapter_model.safetensors"))
    assert keys >= TINKER_UNEMBED
    assert not keys & PEFT_UNEMBED
    # Every other module keeps PEFT's name, which is also Tinker's (base_model.model.model.layers...).
    assert keys - TINKER_UNEMBED == set(engine.adapter_state("r")) - PEFT_UNEMBED
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 32, "LORA")  # what the merge reads
    # The optimizer file stays TuFT's own, keyed by PEFT names; it round-trips exactly.
    engine.create_run("again", kind, lora(rank=4))
    engine.load_run("again", folder, with_optimizer=True)
    assert engine.state_digest("again") == engine.state_digest("r")


@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_peft_loads_the_export_with_the_key_mapping(
    bases: dict[str, Path], cache_dir: Path, tmp_path: Path, kind: str
) -> None:
    engine = _trained(bases, cache_dir, kind, lora(rank=4))
    folder = _save(engine, tmp_path / "export")
    model = PeftModel.from_pretrained(_load(bases[kind]), str(folder), key_mapping=PEFT_KEY_MAPPING)
    torch.testing.assert_close(_logprobs(model), _tuft_logprobs(engine), atol=ref_tol(1e-5), rtol=1e-5)
    assert not torch.allclose(_logprobs(_load(bases[kind])), _tuft_logprobs(engine), atol=1e-3)


def test_peft_loads_an_export_without_unembedding_lora_as_is(
    bases: dict[str, Path], cache_dir: Path, tmp_path: Path
) -> None:
    engine = _trained(bases, cache_dir, "tied", lora(rank=4, train_unembed=False))
    folder = _save(engine, tmp_path / "export")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no missing or unexpected adapter keys
        model = PeftModel.from_pretrained(_load(bases["tied"]), str(folder))
    torch.testing.assert_close(_logprobs(model), _tuft_logprobs(engine), atol=ref_tol(1e-5), rtol=1e-5)


def test_cookbook_merge_of_an_untied_model_computes_what_tuft_computes(
    bases: dict[str, Path], cache_dir: Path, tmp_path: Path
) -> None:
    engine = _trained(bases, cache_dir, "untied", lora(rank=4))
    folder = _save(engine, tmp_path / "export")
    merged = _load(_merge(bases, "untied", folder, tmp_path / "merged"))
    torch.testing.assert_close(_logprobs(merged), _tuft_logprobs(engine), atol=ref_tol(1e-5), rtol=1e-5)


def test_cookbook_merge_of_a_tied_model_adds_exactly_the_trained_deltas(
    bases: dict[str, Path], cache_dir: Path, tmp_path: Path
) -> None:
    """With tied embeddings the merged model has one matrix for both ends, so the cookbook adds the
    unembedding delta to `model.embed_tokens.weight` (as it does for Tinker's own checkpoints):
    the merged head is exactly TuFT's, but the input embedding moves with it (docs/downloads.md)."""
    engine = _trained(bases, cache_dir, "tied", lora(rank=4))
    folder = _save(engine, tmp_path / "export")
    merged = _load(_merge(bases, "tied", folder, tmp_path / "merged")).state_dict()
    base = _load(bases["tied"]).state_dict()
    state = engine.adapter_state("r")
    scale = 32 / 4
    targets = {key.removesuffix(".lora_A.weight") for key in state if key.endswith(".lora_A.weight")}
    assert len(targets) == 2 * 7 + 1
    for module in targets:
        delta = scale * state[f"{module}.lora_B.weight"] @ state[f"{module}.lora_A.weight"]
        weight = module.removeprefix("base_model.model.") + ".weight"
        if weight == "lm_head.weight":
            weight = "model.embed_tokens.weight"
        torch.testing.assert_close(merged[weight], base[weight] + delta, atol=1e-6, rtol=1e-5)


def test_cookbook_merge_of_a_tied_model_without_unembedding_lora_computes_what_tuft_computes(
    bases: dict[str, Path], cache_dir: Path, tmp_path: Path
) -> None:
    engine = _trained(bases, cache_dir, "tied", lora(rank=4, train_unembed=False))
    folder = _save(engine, tmp_path / "export")
    merged = _load(_merge(bases, "tied", folder, tmp_path / "merged"))
    torch.testing.assert_close(_logprobs(merged), _tuft_logprobs(engine), atol=ref_tol(1e-5), rtol=1e-5)


def test_folders_of_earlier_versions_still_load_and_sample(
    bases: dict[str, Path], cache_dir: Path, tmp_path: Path
) -> None:
    """Format 1 (TuFT before Tinker's names): the unembedding LoRA under PEFT's `lm_head` keys."""
    engine = _trained(bases, cache_dir, "tied", lora(rank=4))
    new = _save(engine, tmp_path / "new")
    old = tmp_path / "old"
    shutil.copytree(new, old)
    save_file(engine.adapter_state("r"), str(old / "adapter_model.safetensors"), metadata={"format": "pt"})
    run_info = json.loads((old / "tuft_run.json").read_text())
    (old / "tuft_run.json").write_text(json.dumps({**run_info, "format": 1}))
    assert set(load_file(old / "adapter_model.safetensors")) >= PEFT_UNEMBED

    engine.create_run("resumed", "tied", lora(rank=4))
    engine.load_run("resumed", old, with_optimizer=True)
    assert engine.state_digest("resumed") == engine.state_digest("r")
    op = SampleOp(prompt=(1, 2, 3), params=SamplingParams(max_tokens=4, seed=3, stop_at_eos=False))
    from_old, from_new = engine.sample("tied", old, op).sequences[0], engine.sample("tied", new, op).sequences[0]
    assert from_old.tokens == from_new.tokens
    assert from_old.logprobs == from_new.logprobs
    base = engine.sample("tied", None, op).sequences[0]
    assert base.logprobs != from_new.logprobs  # the adapter (its unembedding LoRA included) is applied


def test_an_adapter_file_naming_the_unembedding_twice_is_refused(tmp_path: Path) -> None:
    pair = {"lora_A.weight": torch.zeros(2, 64), "lora_B.weight": torch.zeros(10, 2)}
    tensors = {
        f"{prefix}{name}": t.clone()
        for prefix in ("base_model.model.lm_head.", TINKER_PREFIX)
        for name, t in pair.items()
    }
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(OpInputError, match="twice"):
        read_adapter_weights(tmp_path)
