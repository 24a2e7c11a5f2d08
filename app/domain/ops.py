"""The canonical, wire-independent form of every Tinker operation.

The API translates JSON or protobuf into these once (app/wire); the queue stores
`canonical_bytes(op)` as the op's input and hashes it for dedupe, so a JSON retry and a protobuf
retry of the same request compare equal; the worker replays ops from these bytes after a crash.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, TypeAdapter, model_serializer

from app.domain.oai import OaiCompletionOp
from app.domain.provenance import RECORDED_LOGPROBS, SAMPLED_MASK
from app.domain.sampling import PromptGrid
from app.domain.tensors import Array

OpKind = Literal["forward_backward", "optim_step", "save_weights", "load_weights", "sample"]

# Ops whose execution changes the run's in-memory training state (adapter, optimizer, gradients).
# Recovery replays exactly these, in seq order, from their stored inputs.
MUTATING_KINDS: frozenset[str] = frozenset({"forward_backward", "optim_step", "load_weights"})


@dataclass(frozen=True)
class LossSpec:
    """What a built-in loss reads (docs/losses.md has the formulas).

    Every loss needs `target_tokens` (int64 [N]). `required` and `optional` name its float32 [N]
    inputs; `config` maps each loss_fn_config key to its default. A `strict` loss rejects inputs it
    does not read, so a `weights` sent to an RL loss is an error rather than silently ignored.
    """

    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    config: Mapping[str, float] = field(default_factory=dict)
    strict: bool = True


_RL_INPUTS = ("logprobs", "advantages")

LOSS_SPECS: Mapping[str, LossSpec] = {
    # Lenient for compatibility: other float inputs are checked if present, then ignored.
    "cross_entropy": LossSpec(optional=("weights",), strict=False),
    "importance_sampling": LossSpec(required=_RL_INPUTS),
    "ppo": LossSpec(required=_RL_INPUTS, config={"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
    "cispo": LossSpec(required=_RL_INPUTS, config={"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}),
    "dro": LossSpec(required=_RL_INPUTS, config={"beta": 0.01}),
    # GSPO paper (arXiv 2507.18071) clip ranges 3e-4 / 4e-4 around 1.
    "gspo": LossSpec(
        required=_RL_INPUTS,
        optional=("sequence_ratio_mask",),
        config={"clip_low_threshold": 0.9997, "clip_high_threshold": 1.0004},
    ),
    # Reads the sampler's recorded logprobs, never the client's `logprobs` (accepted because the
    # cookbook sends it, then ignored). Config defaults are TuFT's choice (docs/losses.md).
    "stable_reinforce": LossSpec(
        required=("advantages", RECORDED_LOGPROBS, SAMPLED_MASK),
        optional=("logprobs",),
        config={"clip_high_threshold": 2.0, "kl_coeff": 0.0},
    ),
}
KNOWN_LOSSES: frozenset[str] = frozenset(LOSS_SPECS)
# Inputs the API fills in from sampling records (app/domain/provenance.py): required by the
# engine, refused from a client.
SERVER_INPUTS: Mapping[str, tuple[str, ...]] = {"stable_reinforce": (RECORDED_LOGPROBS, SAMPLED_MASK)}

# SDK loss names this server refuses, with the reason it gives the user.
UNSUPPORTED_LOSSES: Mapping[str, str] = {
    "custom": (
        "server-side custom losses (ServiceClient.create_custom_loss) are not available; "
        "forward_backward_custom with a Python callable runs the loss on the client instead"
    ),
}

# Per-datum clip thresholds are in the SDK's key list; this server takes them only as loss_fn_config.
_CONFIG_AS_INPUT = frozenset({"clip_low_threshold", "clip_high_threshold"})


def loss_input_names(loss_fn: str) -> frozenset[str]:
    spec = LOSS_SPECS[loss_fn]
    return frozenset({"target_tokens", *spec.required, *spec.optional})


def client_input_names(loss_fn: str) -> frozenset[str]:
    """What a client may send: the loss's inputs less those the server fills in."""
    return loss_input_names(loss_fn) - frozenset(SERVER_INPUTS.get(loss_fn, ()))


def unexpected_inputs_message(loss_fn: str, extra: list[str]) -> str:
    allowed = ", ".join(sorted(client_input_names(loss_fn)))
    message = f"{loss_fn} does not use loss_fn_inputs {extra} (it reads: {allowed})"
    if _CONFIG_AS_INPUT.intersection(extra):
        message += "; pass clip thresholds in loss_fn_config"
    return message


def resolve_loss_config(loss_fn: str, config: Mapping[str, float | str]) -> dict[str, float]:
    """The loss's config with defaults filled in; ValueError naming what is wrong.

    Shared by the API (submission-time checks) and the engine, so both accept exactly the same.
    """
    if loss_fn in UNSUPPORTED_LOSSES:
        raise ValueError(f"loss function {loss_fn!r} is not supported by this server: {UNSUPPORTED_LOSSES[loss_fn]}")
    if loss_fn not in LOSS_SPECS:
        raise ValueError(f"unknown loss function {loss_fn!r}; supported: {sorted(KNOWN_LOSSES)}")
    defaults = LOSS_SPECS[loss_fn].config
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        accepted = ", ".join(f"{k} (default {v:g})" for k, v in defaults.items()) or "none"
        raise ValueError(f"loss_fn_config keys {unknown} are not used by {loss_fn}; it accepts: {accepted}")
    resolved = dict(defaults)
    for key, value in config.items():
        if isinstance(value, str | bool) or not math.isfinite(value):
            raise ValueError(f"loss_fn_config[{key!r}] must be a finite number, got {value!r}")
        resolved[key] = float(value)
    if "clip_low_threshold" in resolved:
        low, high = resolved["clip_low_threshold"], resolved["clip_high_threshold"]
        if not 0.0 <= low <= high:
            raise ValueError(
                f"{loss_fn} needs 0 <= clip_low_threshold <= clip_high_threshold, got {low:g} and {high:g}"
            )
    if resolved.get("beta", 0.0) < 0:
        raise ValueError(f"{loss_fn} needs beta >= 0, got {resolved['beta']:g}")
    if resolved.get("kl_coeff", 0.0) < 0:
        raise ValueError(f"{loss_fn} needs kl_coeff >= 0, got {resolved['kl_coeff']:g}")
    if loss_fn == "stable_reinforce" and resolved["clip_high_threshold"] <= 0:
        raise ValueError(f"{loss_fn} needs clip_high_threshold > 0, got {resolved['clip_high_threshold']:g}")
    return resolved


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LoraConfig(_Frozen):
    rank: int = 32
    seed: int | None = None
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True


class AdamParams(_Frozen):
    """Tinker's AdamParams, with the SDK's defaults."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0  # 0 disables clipping


class Datum(_Frozen):
    tokens: tuple[int, ...]
    loss_fn_inputs: dict[str, Array]


class ForwardBackwardOp(_Frozen):
    kind: Literal["forward_backward"] = "forward_backward"
    data: tuple[Datum, ...]
    loss_fn: str
    loss_fn_config: dict[str, float | str] = Field(default_factory=dict)
    forward_only: bool = False


class OptimStepOp(_Frozen):
    kind: Literal["optim_step"] = "optim_step"
    adam: AdamParams = AdamParams()


# Longest checkpoint TTL accepted anywhere (save, set-TTL, copy): 10 years.
MAX_TTL_SECONDS = 3650 * 86400


class SaveWeightsOp(_Frozen):
    """save_state (checkpoint_kind=training), save_weights_for_sampler (sampler) or
    save_weights_external (external: the sampler's PEFT adapter, kept for download).

    `name` is None for the ephemeral sampler save behind save_weights_and_get_sampling_client; then
    `sampling_session_seq_id` names the sampler that the result creates.
    """

    kind: Literal["save_weights"] = "save_weights"
    checkpoint_kind: Literal["training", "sampler", "external"]
    name: str | None
    sampling_session_seq_id: int | None = None
    ttl_seconds: int | None = None
    overwrite: bool = False
    user_metadata: dict[str, str] | None = None
    # save_weights_external: age public keys to encrypt every exported file to (app/age_crypto.py).
    age_recipients: tuple[str, ...] = ()

    @model_serializer(mode="wrap")
    def _omit_no_recipients(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        # Left out when empty, so every unencrypted save keeps the canonical bytes, and so the
        # dedupe hash, it had before the field existed.
        data: dict[str, object] = handler(self)
        if not self.age_recipients:
            data.pop("age_recipients", None)
        return data


class LoadWeightsOp(_Frozen):
    kind: Literal["load_weights"] = "load_weights"
    path: str  # tinker://<run>/<weights|sampler_weights>/<name>
    with_optimizer: bool = False


class SamplingParams(_Frozen):
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    # None: stop at EOS only. Strings and token ids are both accepted, as in the SDK.
    stop_strings: tuple[str, ...] = ()
    stop_tokens: tuple[int, ...] = ()
    stop_at_eos: bool = True


class SampleOp(_Frozen):
    kind: Literal["sample"] = "sample"
    prompt: tuple[int, ...]
    num_samples: int = 1
    params: SamplingParams = SamplingParams()
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    # SDK 0.38 extras (docs/sampling.md). last_n limits prompt_logprobs and topk_prompt_logprobs
    # to the last N positions; target_prompt_logprobs holds int64 token ids, -1 asking for nothing.
    topk_sample_logprobs: int = 0
    prompt_logprobs_last_n: int | None = None
    target_prompt_logprobs: PromptGrid | None = None
    prompt_alt_tokens_k: int = 0
    # Keep what StableReinforce needs of each sequence (app/queue/stability.py).
    record_stability_info: bool = False

    @model_serializer(mode="wrap")
    def _omit_default_record(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        # Left out when false, so every other sample op keeps the canonical bytes, and so the
        # dedupe hash, it had before the field existed.
        data: dict[str, object] = handler(self)
        if not self.record_stability_info:
            data.pop("record_stability_info", None)
        return data


Op = Annotated[
    # OaiCompletionOp is stored as a sample op (app/domain/oai.py).
    ForwardBackwardOp | OptimStepOp | SaveWeightsOp | LoadWeightsOp | SampleOp | OaiCompletionOp,
    Field(discriminator="kind"),
]
_OP_ADAPTER: TypeAdapter[Op] = TypeAdapter(Op)


def canonical_bytes(op: BaseModel) -> bytes:
    """Deterministic serialisation (field order is the model's), used for storage and hashing."""
    return op.model_dump_json().encode()


def op_sha256(op: BaseModel) -> str:
    return hashlib.sha256(canonical_bytes(op)).hexdigest()


def parse_op(raw: bytes) -> Op:
    return _OP_ADAPTER.validate_json(raw)
