"""Every architecture a config can name: LoRA covers attention, MLP and experts, or is refused.

Each architecture is a tiny random model built from its transformers config (2 layers, hidden 32),
saved to a folder with the Qwen tokenizer and served as a ModelSpec, as an operator's model would be.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from app.domain.architectures import lora_refusal
from app.domain.lora_coverage import REFUSED, TRANSFORMERS_VERSION
from app.domain.models import ModelSpec
from app.domain.ops import AdamParams, LoraConfig, OptimStepOp, SampleOp, SamplingParams
from tests.engine.helpers import DEVICE, datum, fb
from workers.engine import TorchEngine
from workers.engine.errors import OpInputError
from workers.engine.lora_targets import coverage_table
from workers.engine.tiny import build_tiny_tokenizer

VOCAB = 512  # tokens past the Qwen tokenizer's first 512 ids are never used here
SEQ = [101, 57, 12, 7, 102, 55, 66, 3]

LLAMA_LIKE = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}
QKV = ("q_proj", "k_proj", "v_proj", "o_proj")
GATED = ("gate_proj", "up_proj", "down_proj")
MOE = {**LLAMA_LIKE, "num_experts_per_tok": 2}

# model_type -> (config overrides, attention targets, MLP targets, fused expert tensors)
ARCHS: dict[str, tuple[dict[str, Any], tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "llama": (LLAMA_LIKE, QKV, GATED, ()),
    "mistral": (LLAMA_LIKE, QKV, GATED, ()),
    "qwen2": (LLAMA_LIKE, QKV, GATED, ()),
    "qwen3": ({**LLAMA_LIKE, "head_dim": 8}, QKV, GATED, ()),
    "gemma": ({**LLAMA_LIKE, "head_dim": 8}, QKV, GATED, ()),
    "gemma2": ({**LLAMA_LIKE, "head_dim": 8}, QKV, GATED, ()),
    "gemma3_text": ({**LLAMA_LIKE, "head_dim": 8, "sliding_window": 16}, QKV, GATED, ()),
    "olmo2": (LLAMA_LIKE, QKV, GATED, ()),
    "granite": (LLAMA_LIKE, QKV, GATED, ()),
    "phi3": (LLAMA_LIKE, ("qkv_proj", "o_proj"), ("gate_up_proj", "down_proj"), ()),
    "gpt2": ({"n_embd": 32, "n_head": 4, "n_positions": 64}, ("c_attn", "c_proj"), ("c_fc", "c_proj"), ()),
    "gpt_neox": (
        {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4},
        ("query_key_value", "dense"),
        ("dense_h_to_4h", "dense_4h_to_h"),
        (),
    ),
    "mixtral": ({**MOE, "num_local_experts": 4}, QKV, (), ("gate_up_proj", "down_proj")),
    "qwen3_moe": (
        {**MOE, "head_dim": 8, "num_experts": 4, "moe_intermediate_size": 32},
        QKV,
        (),
        ("gate_up_proj", "down_proj"),
    ),
}


def _config(model_type: str, overrides: dict[str, Any]) -> Any:
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type} causal LM")
    layers = "n_layer" if model_type == "gpt2" else "num_hidden_layers"
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, **{layers: 2}, **overrides)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if hasattr(config, name):
            setattr(config, name, 3)  # the defaults point past our 512-token vocabulary
    return config


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[dict[str, Path]]:
    """Model folders, built on first use: a model type's folder is only made if a test needs it."""
    root = tmp_path_factory.mktemp("archs")
    made: dict[str, Path] = {}

    class Lazy(dict[str, Path]):
        def __missing__(self, model_type: str) -> Path:
            config = _config(model_type, ARCHS[model_type][0])
            torch.manual_seed(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = AutoModelForCausalLM.from_config(config)
                folder = root / model_type
                model.save_pretrained(folder)
                build_tiny_tokenizer(cache_dir).save_pretrained(folder)
            made[model_type] = folder
            return folder

    yield Lazy()


def _engine(folder: Path, cache_dir: Path, name: str) -> TorchEngine:
    spec = ModelSpec(model_name=name, model_path=str(folder), max_model_len=64)
    return TorchEngine([spec], device=DEVICE, cache_dir=cache_dir)


def _targets(engine: TorchEngine, run_id: str) -> tuple[set[str], set[str]]:
    """(`block.module` of every module with a LoRA pair, fused expert tensors with one)."""
    modules = set()
    for key in engine.adapter_state(run_id):
        path = key.split(".lora_")[0].replace(".base_layer", "")
        modules.add(".".join(path.split(".")[-2:]))
    params = engine._runs[run_id].peft_config.target_parameters or []
    return modules, {p.rsplit(".", 1)[-1] for p in params}


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_architecture_trains_samples_and_round_trips(
    model_type: str, folders: dict[str, Path], cache_dir: Path, tmp_path: Path
) -> None:
    _, attn, mlp, experts = ARCHS[model_type]
    engine = _engine(folders[model_type], cache_dir, model_type)
    attn_block = {"gpt2": "attn", "gpt_neox": "attention"}.get(model_type, "self_attn")
    mlp_modules = {f"mlp.{n}" for n in mlp} | ({"mlp.experts"} if experts else set())

    # Which weights each flag covers: every attention projection (fused or not), every MLP
    # projection including each expert's, the output embedding; nothing else.
    for flags, want_modules, want_experts in [
        ({"train_mlp": False, "train_unembed": False}, {f"{attn_block}.{n}" for n in attn}, set()),
        ({"train_attn": False, "train_unembed": False}, mlp_modules, set(experts)),
        ({"train_attn": False, "train_mlp": False}, {"model.lm_head"}, set()),
    ]:
        run_id = f"{model_type}:{'-'.join(sorted(flags))}"
        engine.create_run(run_id, model_type, LoraConfig(rank=4, seed=1, **flags))
        assert _targets(engine, run_id) == (want_modules, want_experts)
        engine.drop_run(run_id)

    # Everything at once: loss goes down on a memorised sequence.
    engine.create_run("all", model_type, LoraConfig(rank=4, seed=1))
    step = OptimStepOp(adam=AdamParams(learning_rate=1e-2))
    losses = []
    for _ in range(4):
        losses.append(engine.forward_backward("all", fb(datum(SEQ))).metrics["loss:sum"])
        engine.optim_step("all", step)
    final = engine.forward_backward("all", fb(datum(SEQ), forward_only=True)).metrics["loss:sum"]
    assert final < 0.8 * losses[0], (losses, final)
    grads_seen = engine.adapter_state("all")
    assert all(t.abs().sum() > 0 for k, t in grads_seen.items() if ".lora_B." in k), "a LoRA B never trained"

    # Save, sample from the saved adapter, and load it back into a fresh run.
    dest = tmp_path / "ck"
    dest.mkdir()
    engine.save_run("all", dest, with_optimizer=True)
    greedy = SamplingParams(max_tokens=4, temperature=0.0, stop_at_eos=False)
    out = engine.sample(model_type, dest, SampleOp(prompt=tuple(SEQ[:2]), params=greedy)).sequences[0]
    assert len(out.tokens) == 4 and all(0 <= t < VOCAB for t in out.tokens)
    engine.create_run("again", model_type, LoraConfig(rank=4, seed=2))
    engine.load_run("again", dest, with_optimizer=True)
    assert engine.state_digest("again") == engine.state_digest("all")
    again = engine.forward_backward("again", fb(datum(SEQ), forward_only=True)).metrics["loss:sum"]
    assert again == pytest.approx(final, abs=1e-5)


def test_uncoverable_architecture_is_refused_with_the_reason(cache_dir: Path, tmp_path: Path) -> None:
    """mamba has no attention: train_attn is refused, by the engine and by the API's table alike."""
    if "mamba" not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        pytest.skip(f"transformers {transformers.__version__} has no mamba causal LM")
    config = AutoConfig.for_model("mamba", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "mamba")
    build_tiny_tokenizer(cache_dir).save_pretrained(tmp_path / "mamba")
    engine = _engine(tmp_path / "mamba", cache_dir, "mamba")
    with pytest.raises(OpInputError, match="train_attn: the model has no attention layers LoRA can wrap"):
        engine.create_run("m", "mamba", LoraConfig(rank=4, train_mlp=False, train_unembed=False))
    assert not engine.has_run("m")
    # The output embedding alone is a linear layer it can train.
    engine.create_run("u", "mamba", LoraConfig(rank=4, train_attn=False, train_mlp=False))
    assert {k.split(".lora_")[0] for k in engine.adapter_state("u")} == {"base_model.model.lm_head"}

    message = lora_refusal("m", "mamba", LoraConfig(rank=4))
    assert message is not None
    assert message.startswith("m (mamba) cannot be trained with this LoRA config: train_attn: the model has no")
    assert lora_refusal("m", "mamba", LoraConfig(rank=4, train_attn=False, train_mlp=False)) is None
    assert lora_refusal("m", "llama", LoraConfig(rank=4)) is None


def test_api_table_matches_the_engine() -> None:
    """app/domain/lora_coverage.py is what the engine derives with this transformers (regenerate it
    with `python -m workers.engine.lora_targets` after an upgrade). Checked on the refused types and
    the tested ones; the whole set takes a minute, too long for every run."""
    if transformers.__version__ != TRANSFORMERS_VERSION:
        pytest.skip(f"table made with transformers {TRANSFORMERS_VERSION}, installed {transformers.__version__}")
    types = sorted(set(REFUSED) | {t for t in ARCHS if t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES})
    assert coverage_table(types) == REFUSED
