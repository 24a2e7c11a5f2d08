"""The on-disk checkpoint format of a run: Tinker's LoRA adapter folder plus TuFT extras.

    adapter_config.json          PEFT LoraConfig (target_modules, r, lora_alpha, ...)
    adapter_model.safetensors    LoRA weights under Tinker's keys (see below; no adapter name inside)
    optimizer.safetensors        (optional) AdamW moments, keyed "<PEFT key>/<state name>"
    tuft_run.json                base model, TuFT LoRA config, optimizer step count

Tinker's keys are PEFT's except for the unembedding (output embedding) LoRA: Tinker writes
`base_model.model.model.unembed_tokens.lora_{A,B}.weight` for every model, where PEFT says
`base_model.model.lm_head...`. tinker-cookbook's merge (`weights.build_hf_model`) maps that name
to `lm_head.weight`, or to `model.embed_tokens.weight` when the embeddings are tied; PEFT's name
fails there for tied models, whose weight files have no `lm_head.weight`. So files carry Tinker's
name and the engine keeps PEFT's: `write_checkpoint` renames on the way out, `read_adapter_weights`
on the way in, and it accepts both, so folders written before format 2 (PEFT's name) still load.
PEFT itself loads the folder with `PeftModel.from_pretrained(base, folder,
key_mapping=PEFT_KEY_MAPPING)` (without the mapping, a run that trained the unembedding would load
with that LoRA left at zero, and PEFT warns about the missing keys).

Pending gradients (forward_backward without a following optim_step) are not saved: Tinker saves
after optim_step, and a checkpoint is a point between updates.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any

import peft
import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from app.domain.ops import LoraConfig
from workers.engine.errors import OpInputError
from workers.engine.progress import Progress, size_text

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OPTIMIZER_STATE = "optimizer.safetensors"
RUN_FILE = "tuft_run.json"
# 2: the unembedding LoRA under Tinker's name (1: PEFT's). Both are read; an older TuFT reading a
# format-2 folder refuses it by number instead of with a key mismatch.
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)

PEFT_UNEMBED = "base_model.model.lm_head."
TINKER_UNEMBED = "base_model.model.model.unembed_tokens."
# PEFT applies this to keys without their "base_model.model." prefix (peft.load_peft_weights).
PEFT_KEY_MAPPING = {r"^model\.unembed_tokens\.": "lm_head."}
# Checkpoints this large say so at INFO (start, each 20%, end); smaller ones, saved every few steps
# by many runs, only at DEBUG, or the log would be mostly checkpoint lines.
LARGE_CHECKPOINT_BYTES = 256 * 1024 * 1024


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tensors_for_file(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; CPU copies are cheap at LoRA sizes.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def _renamed(tensors: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    renamed = {new + key.removeprefix(old) if key.startswith(old) else key: value for key, value in tensors.items()}
    if len(renamed) != len(tensors):
        raise OpInputError(f"adapter weights name the unembedding LoRA twice ({old!r} and {new!r})")
    return renamed


def to_file_keys(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT keys -> the keys written in adapter_model.safetensors (Tinker's)."""
    return _renamed(weights, PEFT_UNEMBED, TINKER_UNEMBED)


def from_file_keys(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of an adapter file, Tinker's or PEFT's (TuFT before format 2) -> PEFT keys."""
    return _renamed(weights, TINKER_UNEMBED, PEFT_UNEMBED)


def write_checkpoint(
    dest: Path,
    *,
    base_model: str,
    lora: LoraConfig,
    peft_config: peft.LoraConfig,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, torch.Tensor] | None,
    optimizer_steps: int,
) -> int:
    """Write a checkpoint into the existing (empty) folder `dest`; return the bytes written.

    Every file and the folder are fsynced, so once this returns the caller may publish the folder
    (it is expected to write into a staging folder and rename it into place).
    """
    config = copy.deepcopy(peft_config)
    config.base_model_name_or_path = base_model
    config.save_pretrained(str(dest))  # PEFT's own serialisation of its config (sets -> lists etc.)
    weight_bytes = _nbytes(weights)
    total = weight_bytes + (_nbytes(optimizer_state) if optimizer_state is not None else 0)
    level = logging.INFO if total >= LARGE_CHECKPOINT_BYTES else logging.DEBUG
    progress = Progress("writing checkpoint", str(dest), total=total, level=level)
    progress.start(f"{size_text(total)}, {'with' if optimizer_state is not None else 'no'} optimizer state")
    try:
        files = _write_files(dest, weights, optimizer_state, progress)
        run_info = {
            "format": FORMAT_VERSION,
            "base_model": base_model,
            "lora": lora.model_dump(),
            "optimizer_steps": optimizer_steps,
            "has_optimizer": optimizer_state is not None,
        }
        (dest / RUN_FILE).write_text(json.dumps(run_info, indent=2, sort_keys=True) + "\n")
        files.append(dest / RUN_FILE)
        for path in files:
            _fsync(path)
        _fsync(dest)
    except BaseException:
        progress.failed()
        raise
    progress.finish()
    return sum(path.stat().st_size for path in files)


def _write_files(
    dest: Path,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, torch.Tensor] | None,
    progress: Progress,
) -> list[Path]:
    save_file(_tensors_for_file(to_file_keys(weights)), str(dest / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    progress.advance(_nbytes(weights), "adapter written")
    files = [dest / ADAPTER_CONFIG, dest / ADAPTER_WEIGHTS]
    if optimizer_state is not None:
        save_file(_tensors_for_file(optimizer_state), str(dest / OPTIMIZER_STATE), metadata={"format": "pt"})
        files.append(dest / OPTIMIZER_STATE)
    return files


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _run_info(src: Path) -> dict[str, Any]:
    path = Path(src) / RUN_FILE
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise OpInputError(f"{src} is not a TuFT checkpoint (no {RUN_FILE})") from None
    except (OSError, ValueError) as exc:
        raise OpInputError(f"cannot read {path}: {exc}") from None
    if not isinstance(info, dict) or info.get("format") not in READABLE_FORMATS:
        raise OpInputError(f"{path}: unsupported checkpoint format")
    return info


def read_checkpoint_config(src: Path) -> tuple[str, LoraConfig]:
    """(base model name, LoRA config) of a checkpoint, without touching any model."""
    info = _run_info(src)
    try:
        return str(info["base_model"]), LoraConfig.model_validate(info["lora"])
    except (KeyError, ValidationError) as exc:
        raise OpInputError(f"{src}/{RUN_FILE}: bad run description: {exc}") from None


def read_optimizer_steps(src: Path) -> int:
    return int(_run_info(src).get("optimizer_steps", 0))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except FileNotFoundError:
        raise OpInputError(f"checkpoint file {path.name} is missing in {path.parent}") from None
    except (SafetensorError, OSError) as exc:
        raise OpInputError(f"cannot read {path}: {exc}") from None


def read_adapter_weights(src: Path) -> dict[str, torch.Tensor]:
    """The adapter's weights by PEFT key, from a folder of any TuFT format version."""
    return from_file_keys(_load_tensors(Path(src) / ADAPTER_WEIGHTS))


def read_adapter_config(src: Path) -> peft.LoraConfig:
    path = Path(src) / ADAPTER_CONFIG
    if not path.is_file():
        raise OpInputError(f"{src} is not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    try:
        config = peft.LoraConfig.from_pretrained(str(src))
    except (OSError, ValueError, TypeError) as exc:
        raise OpInputError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, peft.LoraConfig):
        raise OpInputError(f"{path}: only LoRA adapters are supported")
    return config


def read_optimizer_state(src: Path) -> dict[str, torch.Tensor]:
    if not (Path(src) / OPTIMIZER_STATE).is_file():
        raise OpInputError(f"checkpoint {src} has no optimizer state (saved without it?)")
    return _load_tensors(Path(src) / OPTIMIZER_STATE)


def optimizer_tensors(
    optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter]
) -> dict[str, torch.Tensor]:
    """Flatten AdamW's per-parameter state to "<PEFT key>/<name>" tensors (stable across processes,
    unlike torch's state_dict which keys by parameter position)."""
    flat: dict[str, torch.Tensor] = {}
    for key, param in params.items():
        for name, value in optimizer.state.get(param, {}).items():
            if isinstance(value, torch.Tensor):
                flat[f"{key}/{name}"] = value
    return flat


def restore_optimizer(
    optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter], flat: dict[str, torch.Tensor]
) -> None:
    """Inverse of optimizer_tensors, validated before anything is loaded."""
    per_param: dict[str, dict[str, torch.Tensor]] = {}
    for flat_key, value in flat.items():
        key, _, name = flat_key.rpartition("/")
        if key not in params:
            raise OpInputError(f"optimizer state for {key!r}, which the run does not have")
        if name in ("exp_avg", "exp_avg_sq") and tuple(value.shape) != tuple(params[key].shape):
            raise OpInputError(f"optimizer state {flat_key} has shape {list(value.shape)}")
        per_param.setdefault(key, {})[name] = value
    index = {key: i for i, key in enumerate(params)}
    state_dict = optimizer.state_dict()
    state_dict["state"] = {index[key]: dict(state) for key, state in per_param.items()}
    # load_state_dict moves moments to each parameter's device/dtype and keeps `step` as saved.
    optimizer.load_state_dict(state_dict)
