"""The canonical, wire-independent form of every Tinker operation.

The API translates JSON or protobuf into these once (app/wire); the queue stores
`canonical_bytes(op)` as the op's input and hashes it for dedupe, so a JSON retry and a protobuf
retry of the same request compare equal; the worker replays ops from these bytes after a crash.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from app.domain.tensors import Array

OpKind = Literal["forward_backward", "optim_step", "save_weights", "load_weights", "sample"]

# Ops whose execution changes the run's in-memory training state (adapter, optimizer, gradients).
# Recovery replays exactly these, in seq order, from their stored inputs.
MUTATING_KINDS: frozenset[str] = frozenset({"forward_backward", "optim_step", "load_weights"})

KNOWN_LOSSES: frozenset[str] = frozenset({"cross_entropy"})


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


class SaveWeightsOp(_Frozen):
    """save_state (checkpoint_kind=training) or save_weights_for_sampler (sampler).

    `name` is None for the ephemeral sampler save behind save_weights_and_get_sampling_client; then
    `sampling_session_seq_id` names the sampler that the result creates.
    """

    kind: Literal["save_weights"] = "save_weights"
    checkpoint_kind: Literal["training", "sampler"]
    name: str | None
    sampling_session_seq_id: int | None = None
    ttl_seconds: int | None = None
    overwrite: bool = False
    user_metadata: dict[str, str] | None = None


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


Op = Annotated[
    ForwardBackwardOp | OptimStepOp | SaveWeightsOp | LoadWeightsOp | SampleOp,
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
