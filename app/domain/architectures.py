"""Whether a LoRA config can be applied to a base model, decided without torch.

The engine derives LoRA targets from the loaded model (workers/engine/lora_targets.py) and refuses
a config it cannot cover. The API cannot load models, so it reads the same verdicts, computed ahead
for every causal-LM architecture of the installed transformers (lora_coverage.py), by the
`model_type` of the model folder's config.json: the refusal then reaches the client as a 400 on
create_model, at once, instead of as a failed first operation once a worker has loaded the model.
"""

from __future__ import annotations

from app.domain.lora_coverage import REFUSED
from app.domain.ops import LoraConfig

_FLAGS = ("train_attn", "train_mlp", "train_unembed")


def lora_refusal(model_name: str, model_type: str | None, lora: LoraConfig) -> str | None:
    """Why `lora` cannot be trained on a model of `model_type`, or None if it can (or if the
    architecture is unknown here: the worker then decides when it loads the model)."""
    refused = REFUSED.get(model_type or "", {})
    blocking = [flag for flag in _FLAGS if getattr(lora, flag) and flag in refused]
    if not blocking:
        return None
    reasons = "; ".join(f"{flag}: {refused[flag]}" for flag in blocking)
    message = f"{model_name} ({model_type}) cannot be trained with this LoRA config: {reasons}."
    possible = [flag for flag in _FLAGS if flag not in refused]
    if possible:
        off = " and ".join(f"{flag}=False" for flag in _FLAGS if flag in refused)
        message += f" Set {off} to train only what it can ({', '.join(possible)})"
    return message
