"""Which weights of a causal LM get LoRA, derived from the loaded model rather than from a fixed list
of module names.

A fixed list (`q_proj`, `gate_proj`...) silently skipped every layer named otherwise: phi3's fused
`qkv_proj`/`gate_up_proj`, gpt2's `c_attn`/`c_fc`, gpt_neox's `query_key_value`, and the experts of
every MoE model, which transformers 5 stores as fused 3-D parameters (`experts.gate_up_proj` of
shape [experts, 2 x intermediate, hidden]) rather than as nn.Linear modules. So we walk the decoder:
every nn.Linear (or GPT-2 style Conv1D) under an attention block is an attention target, under an
MLP/MoE block an MLP target, and every 3-D parameter under an MLP block is an expert weight that
PEFT wraps with `target_parameters` (its ParamWrapper: one LoRA pair per expert, trained like the
others). MoE routers are left frozen, as Tinker does (LoRA on a router changes which experts run).

What cannot be covered this way (a requested group with no weight LoRA can wrap, or a weight of the
group that is neither a linear layer nor an expert tensor) is refused with the reason: a run that
trained only part of what it asked for would look fine and learn less. `coverage_table()` runs this
over every causal-LM architecture of the installed transformers on the meta device (no memory, a few
seconds); its refusals are written to `app/domain/lora_coverage.py`, where the API reads them
without torch to refuse such a create_model with HTTP 400 before any worker is involved.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field

import torch
import transformers
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from app.domain.ops import LoraConfig
from workers.engine.errors import OpInputError

# Names of the blocks whose weights each flag trains, across the architectures transformers ships
# (self_attn: llama family; attn: gpt2; attention: gpt_neox; block_sparse_moe: older MoE layouts).
ATTN_BLOCKS = frozenset({"self_attn", "attn", "attention", "self_attention"})
MLP_BLOCKS = frozenset(
    {"mlp", "feed_forward", "block_sparse_moe", "ffn", "moe", "experts", "shared_expert", "shared_experts"}
    | {"intermediate", "output"}  # BERT-style layers (their attention's `output` is caught first)
)
# MoE routers (nn.Linear in some architectures): frozen, see the module docstring.
ROUTERS = frozenset({"gate", "router", "shared_expert_gate"})
GROUPS = ("attn", "mlp")
FLAG = {"attn": "train_attn", "mlp": "train_mlp", "unembed": "train_unembed"}


class Uncoverable(OpInputError):
    """The model has weights a requested LoRA group cannot cover (the message says which and why)."""


@dataclass
class Survey:
    """The decoder's trainable weights by group: module paths for linear layers, parameter paths
    for fused expert tensors, and paths of weights LoRA cannot wrap."""

    linear: dict[str, list[str]] = field(default_factory=lambda: {g: [] for g in GROUPS})
    experts: list[str] = field(default_factory=list)
    uncovered: dict[str, list[str]] = field(default_factory=lambda: {g: [] for g in GROUPS})
    unembed: str | None = None
    all_modules: list[str] = field(default_factory=list)
    all_params: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Targets:
    """PEFT's `target_modules` and `target_parameters`, as the shortest unambiguous name suffixes."""

    modules: tuple[str, ...]
    parameters: tuple[str, ...]


def _group(path: str, linear: bool) -> str | None:
    """The group of a weight held by the module at `path` (for a linear layer, its parent's path).
    Attention first: BERT-style layers keep their attention's projection in `attention.output`
    and their feed-forward in `output`."""
    parts = path.split(".")
    if any(part in ATTN_BLOCKS for part in parts):
        return "attn"
    if any(part in MLP_BLOCKS for part in parts):
        return "mlp"
    # A linear layer directly in a decoder layer (`layers.3.fc1`: OPT, BART) is its feed-forward.
    return "mlp" if linear and parts[-1].isdigit() else None


def _decoder_prefix(model: nn.Module) -> str:
    """Where the language decoder sits: multimodal models (gemma3) also hold a vision tower,
    whose attention is not the language model's and is not trained."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if isinstance(decoder, nn.Module):
        for name, module in model.named_modules():
            if module is decoder:
                return name
    return ""


def survey(model: nn.Module) -> Survey:
    found = Survey()
    out = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
    prefix = _decoder_prefix(model)
    for path, wrapped in model.named_modules():
        # Once a run's adapter is injected, PEFT has replaced each target with a wrapper holding
        # the original as `base_layer` (and its lora_A/lora_B): see the model as it was before.
        if ".base_layer" in path or ".lora_" in path:
            continue
        module = wrapped.get_base_layer() if isinstance(wrapped, BaseTunerLayer) else wrapped
        found.all_modules.append(path)
        found.all_params += [f"{path}.{p}" for p, _ in module.named_parameters(recurse=False)]
        if out is not None and (wrapped is out or module is out):
            found.unembed = path
            continue
        if prefix and not (path == prefix or path.startswith(prefix + ".")):
            continue
        parent, _, leaf = path.rpartition(".")
        if leaf in ROUTERS:
            continue
        if isinstance(module, nn.Linear | Conv1D):
            group = _group(parent, linear=True)
            if group is not None:
                found.linear[group].append(path)
            continue
        group = _group(path, linear=False)
        if group is None:
            continue
        for name, param in module.named_parameters(recurse=False):
            # Biases and norms (1-D, or per-expert biases named *_bias) stay frozen as in every LoRA.
            if param.ndim < 2 or name.endswith("bias"):
                continue
            if group == "mlp" and param.ndim == 3:
                found.experts.append(f"{path}.{name}")
            else:
                found.uncovered[group].append(f"{path}.{name}")
    return found


def problems(found: Survey, lora: LoraConfig) -> list[str]:
    """Why `lora` cannot be applied as asked (empty if it can)."""
    wanted = [g for g in GROUPS if getattr(lora, FLAG[g])]
    out: list[str] = []
    for g in wanted:
        weights = found.linear[g] + (found.experts if g == "mlp" else [])
        if found.uncovered[g]:
            names = ", ".join(sorted({".".join(p.split(".")[-2:]) for p in found.uncovered[g]}))
            out.append(
                f"{FLAG[g]}: its weights {names} are neither linear layers nor per-expert tensors, "
                "so LoRA cannot cover them"
            )
        elif not weights:
            out.append(f"{FLAG[g]}: the model has no {'attention' if g == 'attn' else 'MLP'} layers LoRA can wrap")
    if lora.train_unembed and found.unembed is None:
        out.append("train_unembed: the model has no output embedding")
    return out


def _shortest_suffixes(chosen: list[str], universe: list[str]) -> tuple[str, ...]:
    """PEFT matches a target by name suffix: name each chosen path by its shortest suffix that
    matches no path outside `chosen` (gpt2 has both attn.c_proj and mlp.c_proj)."""
    chosen_set = set(chosen)
    counts: dict[str, int] = {}
    hits: dict[str, int] = {}
    for path in universe:
        parts = path.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            counts[suffix] = counts.get(suffix, 0) + 1
            if path in chosen_set:
                hits[suffix] = hits.get(suffix, 0) + 1
    names: set[str] = set()
    for path in chosen:
        parts = path.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if hits.get(suffix) == counts[suffix]:
                names.add(suffix)
                break
    return tuple(sorted(names))


def lora_targets(model: nn.Module, lora: LoraConfig) -> Targets:
    """The PEFT targets for `lora` on `model`; Uncoverable if it cannot be covered as asked."""
    if not (lora.train_attn or lora.train_mlp or lora.train_unembed):
        raise OpInputError("LoRA config trains nothing: set at least one of train_attn, train_mlp, train_unembed")
    found = survey(model)
    reasons = problems(found, lora)
    if reasons:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise Uncoverable(f"{model_type} cannot be trained with this LoRA config: " + "; ".join(reasons))
    modules: list[str] = []
    parameters: list[str] = []
    if lora.train_attn:
        modules += found.linear["attn"]
    if lora.train_mlp:
        modules += found.linear["mlp"]
        parameters += found.experts
    if lora.train_unembed and found.unembed is not None:
        modules.append(found.unembed)
    return Targets(
        modules=_shortest_suffixes(modules, found.all_modules),
        parameters=_shortest_suffixes(parameters, found.all_params),
    )


def coverage_table(model_types: list[str]) -> dict[str, dict[str, str]]:
    """model_type -> {flag: reason} for every flag that architecture refuses, built from each
    type's default config on the meta device. Types whose default config cannot build a model
    are left out (the worker decides for those when it loads one)."""
    table: dict[str, dict[str, str]] = {}
    for model_type in model_types:
        try:
            with warnings.catch_warnings(), _quiet_transformers():
                warnings.simplefilter("ignore")
                config = AutoConfig.for_model(model_type)
                with torch.device("meta"):
                    model = AutoModelForCausalLM.from_config(config)
        except Exception:  # a default config that does not build is not our verdict
            continue
        found = survey(model)
        refused: dict[str, str] = {}
        for flag in FLAG.values():
            reasons = problems(found, LoraConfig(**{f: f == flag for f in FLAG.values()}))
            if reasons:
                refused[flag] = reasons[0].split(": ", 1)[1]
        if refused:
            table[model_type] = refused
    return table


class _quiet_transformers:
    """Building 200 default configs logs a warning per config; they say nothing about coverage."""

    def __enter__(self) -> None:
        self._level = logging.getLogger("transformers").level
        logging.getLogger("transformers").setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("transformers").setLevel(self._level)


def render_table(table: dict[str, dict[str, str]]) -> str:
    """app/domain/lora_coverage.py's text for `table` (regenerate it after upgrading transformers:
    `python -m workers.engine.lora_targets`; tests/engine/test_architectures.py checks it)."""
    lines = [
        "# ruff: noqa: E501  (generated: one reason per line reads better than wrapped strings)",
        '"""Architectures whose layers LoRA cannot cover, by config.json `model_type` and flag.',
        "",
        "Generated by `python -m workers.engine.lora_targets` (workers/engine/lora_targets.py) from every",
        f"causal-LM architecture of transformers {transformers.__version__}; do not edit by hand. The API",
        "reads it (no torch there) to refuse such a create_model with HTTP 400; an architecture missing",
        'here is decided by the worker when it loads the model."""',
        "",
        f'TRANSFORMERS_VERSION = "{transformers.__version__}"',
        "",
        "REFUSED: dict[str, dict[str, str]] = {",
    ]
    for model_type, flags in sorted(table.items()):
        lines.append(f"    {json.dumps(model_type)}: {{")
        lines += [f"        {json.dumps(flag)}: {json.dumps(reason)}," for flag, reason in sorted(flags.items())]
        lines.append("    },")
    lines.append("}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from pathlib import Path

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = Path(__file__).resolve().parents[2] / "app" / "domain" / "lora_coverage.py"
    out.write_text(render_table(coverage_table(sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))))
