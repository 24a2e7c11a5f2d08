"""JSON request models -> domain ops, with the semantic checks the SDK leaves to the server.

Every rejection is an `InvalidInput` whose message names the field, so the SDK user sees a
`BadRequestError` that says what to fix (tinker-protocol.md §1.6).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from app.domain.errors import InvalidInput
from app.domain.ids import parse_tinker_path, validate_checkpoint_name
from app.domain.ops import (
    MAX_TTL_SECONDS,
    AdamParams,
    LoadWeightsOp,
    LoraConfig,
    OptimStepOp,
    SampleOp,
    SamplingParams,
    SaveWeightsOp,
)
from app.wire.json_models import (
    AdamParamsModel,
    ChunkModel,
    CreateModelRequest,
    CreateSamplingSessionRequest,
    LoadWeightsRequest,
    OptimizerConfigModel,
    OptimStepRequest,
    SampleRequest,
    SaveWeightsExternalRequest,
    SaveWeightsForSamplerRequest,
    SaveWeightsRequest,
)
from app.wire.sample_extras import sample_extras

# Adam is the only optimizer family implemented; 0.38 names it "adamw" (§6.5).
_ADAM_NAMES = frozenset({"adam", "adamw"})
_UNSUPPORTED_MEDIA = "image/audio input is not supported by this server"


def require_seq_id(seq_id: int | None) -> int:
    """Training requests carry seq_id 1, 2, 3, ... per model (§4.3); 0 or absent means missing."""
    if seq_id is None or seq_id == 0:
        raise InvalidInput("seq_id is required (training requests number from 1)")
    if seq_id < 0:
        raise InvalidInput(f"seq_id must be positive, got {seq_id}")
    return seq_id


def check_optimizer_config(config: OptimizerConfigModel | None) -> None:
    # 0.25 sends no optimizer_config; 0.38 sends {"type": "adamw"} unless asked for dimuon.
    if config is not None and config.type not in _ADAM_NAMES:
        raise InvalidInput(f"optimizer {config.type} is not supported")


def create_model_to_lora_config(req: CreateModelRequest) -> LoraConfig:
    check_optimizer_config(req.optimizer_config)
    if req.lora_config is None:
        return LoraConfig()
    cfg = req.lora_config
    if cfg.rank < 1:
        raise InvalidInput(f"lora_config.rank must be at least 1, got {cfg.rank}")
    if not (cfg.train_attn or cfg.train_mlp or cfg.train_unembed):
        raise InvalidInput("lora_config trains nothing: enable train_attn, train_mlp or train_unembed")
    return LoraConfig(
        rank=cfg.rank,
        seed=cfg.seed,
        train_attn=cfg.train_attn,
        train_mlp=cfg.train_mlp,
        train_unembed=cfg.train_unembed,
    )


def optim_step_to_op(req: OptimStepRequest) -> OptimStepOp:
    if req.adam_params is not None:
        return OptimStepOp(adam=_adam(req.adam_params))
    params = req.optimizer_params if req.optimizer_params is not None else req.optim_params
    if params is None:
        raise InvalidInput("adam_params is required")
    family = params.get("type")
    if family is not None and family not in _ADAM_NAMES:
        raise InvalidInput(f"optimizer {family} is not supported")
    fields = {k: v for k, v in params.items() if k != "type"}
    try:
        model = AdamParamsModel.model_validate(fields)
    except ValueError as exc:
        raise InvalidInput(f"invalid optimizer_params: {exc}") from exc
    return OptimStepOp(adam=_adam(model))


def _adam(p: AdamParamsModel) -> AdamParams:
    for name in ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm"):
        value = getattr(p, name)
        if not math.isfinite(value) or value < 0:
            raise InvalidInput(f"adam_params.{name} must be a finite number >= 0, got {value}")
    for name in ("beta1", "beta2"):
        if getattr(p, name) >= 1:
            raise InvalidInput(f"adam_params.{name} must be below 1, got {getattr(p, name)}")
    return AdamParams(
        learning_rate=p.learning_rate,
        beta1=p.beta1,
        beta2=p.beta2,
        eps=p.eps,
        weight_decay=p.weight_decay,
        grad_clip_norm=p.grad_clip_norm,
    )


def _ttl(ttl_seconds: int | None) -> int | None:
    if ttl_seconds is not None and not 1 <= ttl_seconds <= MAX_TTL_SECONDS:
        raise InvalidInput(
            f"ttl_seconds must be between 1 and {MAX_TTL_SECONDS} (10 years), or omitted for no expiry;"
            f" got {ttl_seconds}"
        )
    return ttl_seconds


def _sorted(metadata: dict[str, str] | None) -> dict[str, str] | None:
    # Key order is not meaningful in JSON; sorting keeps the op's canonical bytes (the dedupe hash)
    # independent of it.
    return None if metadata is None else dict(sorted(metadata.items()))


def save_weights_to_op(req: SaveWeightsRequest) -> SaveWeightsOp:
    """`save_state(name)`: the SDK sends just the name; the server composes the path (§8)."""
    if not req.path:
        raise InvalidInput("path (the checkpoint name) is required")
    return SaveWeightsOp(
        checkpoint_kind="training",
        name=validate_checkpoint_name(req.path),
        ttl_seconds=_ttl(req.ttl_seconds),
        overwrite=req.overwrite,
        user_metadata=_sorted(req.user_metadata),
    )


def save_weights_for_sampler_to_op(req: SaveWeightsForSamplerRequest) -> SaveWeightsOp:
    """Named save, or the ephemeral one behind `save_weights_and_get_sampling_client` (§5.1).

    `kind` (0.38) is accepted and not recorded: every save here is a fixed snapshot, which also
    meets the `inflight` contract ("the weights saved when the client was created, or newer").
    """
    if req.path:
        name: str | None = validate_checkpoint_name(req.path)
    elif req.sampling_session_seq_id is not None:
        name = None
    else:
        raise InvalidInput("save_weights_for_sampler needs a path (name) or a sampling_session_seq_id")
    if req.sampling_session_seq_id is not None and req.sampling_session_seq_id < 0:
        raise InvalidInput(f"sampling_session_seq_id must be >= 0, got {req.sampling_session_seq_id}")
    return SaveWeightsOp(
        checkpoint_kind="sampler",
        name=name,
        sampling_session_seq_id=req.sampling_session_seq_id,
        ttl_seconds=_ttl(req.ttl_seconds),
        user_metadata=_sorted(req.user_metadata),
    )


def save_weights_external_to_op(req: SaveWeightsExternalRequest) -> SaveWeightsOp:
    """0.38's save_weights_external: the sampler's PEFT adapter, stored as an `external_weights`
    checkpoint whose files are downloaded through signed links (docs/downloads.md)."""
    if not req.path:
        raise InvalidInput("path (the external weights name) is required")
    # The keys themselves are parsed by the route (app/age_crypto.py): this layer has no crypto.
    recipients = tuple(req.age_encryption_recipients or ())
    if req.age_encryption_recipients is not None and not recipients:
        raise InvalidInput("age_encryption_recipients must name at least one recipient, or be omitted")
    return SaveWeightsOp(
        checkpoint_kind="external",
        name=validate_checkpoint_name(req.path),
        ttl_seconds=_ttl(req.ttl_seconds),
        age_recipients=recipients,
    )


def load_weights_to_op(req: LoadWeightsRequest) -> LoadWeightsOp:
    """Either addressing mode (§11 row 9); the caller reads `model_id`/`seq_id` or
    `created_model_id` from the request itself."""
    if req.model_id is not None and req.session_id is not None:
        raise InvalidInput("load_weights takes model_id (+seq_id) or session_id (+model_seq_id), not both")
    if req.model_id is None:
        if req.session_id is None or req.model_seq_id is None:
            raise InvalidInput("load_weights needs model_id, or session_id and model_seq_id")
        if req.model_seq_id < 0:
            raise InvalidInput(f"model_seq_id must be >= 0, got {req.model_seq_id}")
        check_optimizer_config(req.optimizer_config)
    path = parse_tinker_path(req.path)
    return LoadWeightsOp(path=str(path), with_optimizer=req.optimizer)


def check_create_sampling_session(req: CreateSamplingSessionRequest) -> None:
    if req.model_path is not None:
        parse_tinker_path(req.model_path)
    elif not req.base_model:
        raise InvalidInput("create_sampling_session needs base_model or model_path")


def prompt_tokens(chunks: Sequence[ChunkModel]) -> tuple[int, ...]:
    tokens: list[int] = []
    for i, chunk in enumerate(chunks):
        if chunk.type in ("image", "image_asset_pointer", "dmel"):
            raise InvalidInput(_UNSUPPORTED_MEDIA)
        if chunk.type != "encoded_text" or chunk.tokens is None:
            raise InvalidInput(f"prompt.chunks[{i}]: unsupported chunk type {chunk.type!r}")
        tokens.extend(chunk.tokens)
    if any(t < 0 for t in tokens):
        raise InvalidInput("prompt token ids must be non-negative")
    return tuple(tokens)


def sample_to_op(req: SampleRequest) -> SampleOp:
    prompt = prompt_tokens(req.prompt.chunks)
    if not prompt:
        raise InvalidInput("prompt is empty")
    if req.num_samples < 1:
        raise InvalidInput(f"num_samples must be at least 1, got {req.num_samples}")
    # Logprob options, top-k widths and the 0.38 extras (docs/sampling.md).
    extras = sample_extras(req, len(prompt))
    return SampleOp(prompt=prompt, num_samples=req.num_samples, params=_sampling_params(req), **extras)


def _sampling_params(req: SampleRequest) -> SamplingParams:
    p = req.sampling_params
    if p.max_tokens is not None and p.max_tokens < 1:
        raise InvalidInput(f"sampling_params.max_tokens must be at least 1, got {p.max_tokens}")
    if not math.isfinite(p.temperature) or p.temperature < 0:
        raise InvalidInput(f"sampling_params.temperature must be >= 0, got {p.temperature}")
    if not (math.isfinite(p.top_p) and 0 < p.top_p <= 1):
        raise InvalidInput(f"sampling_params.top_p must be in (0, 1], got {p.top_p}")
    if p.top_k != -1 and p.top_k < 1:
        raise InvalidInput(f"sampling_params.top_k must be -1 (no limit) or at least 1, got {p.top_k}")
    stop_strings: tuple[str, ...] = ()
    stop_tokens: tuple[int, ...] = ()
    stop_at_eos = True
    if isinstance(p.stop, str):
        stop_strings = (p.stop,)
    elif p.stop is not None and not p.stop:
        stop_at_eos = False  # [] disables every stop, EOS included (§6.4)
    elif p.stop is not None and isinstance(p.stop[0], str):
        stop_strings = tuple(str(s) for s in p.stop)
    elif p.stop is not None:
        stop_tokens = tuple(int(t) for t in p.stop)
    if any(not s for s in stop_strings):
        raise InvalidInput("sampling_params.stop strings must be non-empty")
    if any(t < 0 for t in stop_tokens):
        raise InvalidInput("sampling_params.stop token ids must be non-negative")
    return SamplingParams(
        max_tokens=p.max_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        seed=p.seed,
        stop_strings=stop_strings,
        stop_tokens=stop_tokens,
        stop_at_eos=stop_at_eos,
    )


# The brief and callers look for the response builders next to the request translation; they
# live in app.wire.responses (one responsibility per module) and are re-exported here.
from app.wire.responses import (  # noqa: E402
    encode_result,
    failed_future_body,
    result_to_json,
    try_again_body,
)

__all__ = [
    "check_create_sampling_session",
    "check_optimizer_config",
    "create_model_to_lora_config",
    "encode_result",
    "failed_future_body",
    "load_weights_to_op",
    "optim_step_to_op",
    "prompt_tokens",
    "require_seq_id",
    "result_to_json",
    "sample_to_op",
    "save_weights_external_to_op",
    "save_weights_for_sampler_to_op",
    "save_weights_to_op",
    "try_again_body",
]
