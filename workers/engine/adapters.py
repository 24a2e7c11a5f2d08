"""LoRA adapters on a shared base model: many runs, one PeftModel, one active adapter at a time.

Every adapter is addressed by its *PEFT key* (e.g. `base_model.model.model.layers.0.self_attn.q_proj
.lora_A.weight`): the parameter's name with the adapter name removed, which is also the key PEFT
writes in `adapter_model.safetensors`. So saving, loading and comparing adapters never depend on
the internal adapter name.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Mapping
from typing import cast

import peft
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import PreTrainedModel

from app.domain.ops import LoraConfig
from workers.engine.determinism import cpu_generator, isolated_rng
from workers.engine.errors import OpInputError
from workers.engine.lora_rows import install_forwards
from workers.engine.lora_targets import lora_targets

# Tinker fixes LoRA alpha at 32 for every rank (its "LoRA Without Regret" analysis): with the
# alpha/r scaling, the update's effective learning rate is then roughly rank-independent, so
# users can change rank without retuning the LR. Checkpoints written with it load anywhere PEFT does.
LORA_ALPHA = 32


def adapter_name_for(prefix: str, key: str) -> str:
    """A PEFT-safe adapter name: run ids contain ':' and '.', which PEFT would split module paths on."""
    return f"{prefix}_{hashlib.sha1(key.encode()).hexdigest()[:16]}"


def peft_config_for(lora: LoraConfig, model: nn.Module) -> peft.LoraConfig:
    """The PEFT config of a run: its rank, and targets derived from `model` (lora_targets.py);
    OpInputError (Uncoverable) if the model cannot be covered as `lora` asks."""
    if lora.rank < 1:
        raise OpInputError(f"LoRA rank must be >= 1, got {lora.rank}")
    targets = lora_targets(model, lora)
    return peft.LoraConfig(
        r=lora.rank,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,  # dropout would draw from an RNG on every forward and break replay
        target_modules=list(targets.modules),
        # Fused MoE experts (3-D tensors), wrapped by PEFT's ParamWrapper; None keeps adapter
        # configs of dense models exactly as before.
        target_parameters=list(targets.parameters) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


class AdapterHost:
    """Owns the PeftModel wrapping one base model and the adapters injected into it."""

    def __init__(self, model: PreTrainedModel, fused: bool = False) -> None:
        self.model = model  # the HF causal LM; PEFT injects its LoRA layers into it in place
        self._peft: peft.PeftModel | None = None
        self._fused = fused  # single-adapter passes through lora_fused.py (EngineConfig.lora_kernel)
        # activate()'s fast switch: what PEFT's set_adapter last established, the LoRA layers and
        # each adapter's parameters; all forgotten whenever adapters are added or removed.
        self._active: tuple[str, bool] | None = None
        self._layers: list[BaseTunerLayer] | None = None
        self._own_params: dict[str, list[nn.Parameter]] = {}

    def _forget(self) -> None:
        self._active, self._layers, self._own_params = None, None, {}

    def names(self) -> list[str]:
        return [] if self._peft is None else list(self._peft.peft_config)

    def has(self, name: str) -> bool:
        return name in self.names()

    def add(self, name: str, config: peft.LoraConfig, seed: int) -> None:
        """Inject a fresh adapter, initialised from `seed` alone (LoRA B = 0, so it starts as a no-op)."""
        # LoRA on a tied lm_head is fine for us: the delta lives only in the output path and we never
        # merge adapters into the (shared, frozen) base weights, which is what PEFT warns about.
        with warnings.catch_warnings(), isolated_rng(seed, self.model.device):
            warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
            # PEFT reads a transformers attribute that transformers 5 renamed; harmless noise.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            # GPT-2 style Conv1D targets: PEFT notices the transposed weight and sets
            # fan_in_fan_out itself for those layers only, which is what we want.
            warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
            if self._peft is None:
                self._peft = peft.get_peft_model(self.model, config, adapter_name=name)
            else:
                self._peft.add_adapter(name, config)
        self._forget()
        # New LoRA layers may have appeared: give them the routed/fused forward (lora_rows.py).
        install_forwards(self.model, self._fused)
        self._reinit(name, seed)

    def _reinit(self, name: str, seed: int) -> None:
        """Draw LoRA A from our own CPU generator, as PEFT's default (kaiming-uniform with a=sqrt(5),
        i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))) would, but independently of device and PEFT version."""
        gen = cpu_generator(seed)
        with torch.no_grad():
            for key, param in self.params(name).items():
                if ".lora_A." in key:
                    bound = 1.0 / math.sqrt(param.shape[1])
                    draw = torch.rand(param.shape, generator=gen, dtype=torch.float32) * (2 * bound) - bound
                    param.copy_(draw)
                else:
                    param.zero_()

    def remove(self, name: str) -> None:
        if self._peft is None or name not in self._peft.peft_config:
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
            self._peft.delete_adapter(name)
        self._forget()

    def params(self, name: str) -> dict[str, nn.Parameter]:
        """The adapter's parameters by PEFT key, in sorted key order (the optimizer's order)."""
        if self._peft is None:
            return {}
        found: dict[str, nn.Parameter] = {}
        for full_name, param in self._peft.named_parameters():
            parts = full_name.split(".")
            if name in parts:
                found[".".join(p for p in parts if p != name)] = param
        return dict(sorted(found.items()))

    def activate(self, name: str | None, trainable: bool = False) -> None:
        """Route forwards through adapter `name`, or through the bare base model when None.

        Only the active adapter's parameters can receive gradients (PEFT flips requires_grad on
        switch), so interleaved runs never leak gradients into each other.
        """
        if self._peft is None:
            if name is not None:
                raise KeyError(name)
            return
        tuner = cast(peft.LoraModel, self._peft.base_model)
        if name is None:
            tuner.disable_adapter_layers()
            self._active = None
            return
        if self._active is None or name not in self._peft.peft_config:
            tuner.enable_adapter_layers()
            self._peft.set_adapter(name, inference_mode=not trainable)
        elif self._active != (name, trainable):
            self._switch(self._active[0], name, trainable)
        self._active = (name, trainable)

    def _switch(self, previous: str, name: str, trainable: bool) -> None:
        """PEFT's set_adapter from a known state, touching only the two adapters concerned.

        PEFT walks every module several times and every adapter of every layer (issue 11: with
        32 resident runs that was 70 ms of a 150 ms forward_backward of the tiny model on the
        CPU, growing with each run a worker holds). With dropout 0 and no auxiliary modules, its
        whole effect is: each LoRA layer's active adapter, the previous adapter frozen and the new
        one trainable unless sampling (tests/engine/test_adapter_switch.py compares the two)."""
        assert self._peft is not None
        if previous != name:
            for param in self._params_of(previous):
                param.requires_grad_(False)
            for layer in self._tuner_layers():
                layer._active_adapter = [name]
            cast(peft.LoraModel, self._peft.base_model).active_adapter = name
        for param in self._params_of(name):
            param.requires_grad_(trainable)

    def _tuner_layers(self) -> list[BaseTunerLayer]:
        if self._layers is None:
            self._layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
        return self._layers

    def _params_of(self, name: str) -> list[nn.Parameter]:
        if name not in self._own_params:
            self._own_params[name] = list(self.params(name).values())
        return self._own_params[name]

    def state(self, name: str) -> dict[str, torch.Tensor]:
        """A detached CPU copy of the adapter's weights, by PEFT key."""
        return {key: p.detach().to("cpu", copy=True) for key, p in self.params(name).items()}

    def check_state(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Raise OpInputError unless `tensors` has exactly the adapter's keys and shapes."""
        params = self.params(name)
        missing = sorted(set(params) - set(tensors))
        unexpected = sorted(set(tensors) - set(params))
        if missing or unexpected:
            raise OpInputError(
                "checkpoint does not match the run's LoRA targets: "
                f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
            )
        for key, param in params.items():
            if tuple(tensors[key].shape) != tuple(param.shape):
                raise OpInputError(
                    f"checkpoint tensor {key} has shape {list(tensors[key].shape)}, the run expects "
                    f"{list(param.shape)} (LoRA rank mismatch?)"
                )

    def load_state(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy `tensors` (PEFT keys) into the adapter; all-or-nothing, checked before any write."""
        self.check_state(name, tensors)
        params = self.params(name)
        with torch.no_grad():
            for key, param in params.items():
                param.copy_(tensors[key].to(device=param.device, dtype=param.dtype))
