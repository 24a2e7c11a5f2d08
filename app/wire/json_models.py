"""Pydantic models of the SDK's JSON request bodies (tinker-protocol.md §5.1, §5.2).

Both SDK versions must parse: 0.25 sends fewer fields and 0.38 more (§11), so every model ignores
unknown keys and defaults every field the SDK may omit. Bodies are produced with
`exclude_none=True`, so an optional field is absent rather than null (§5). `type` literals are
accepted and ignored. Semantic checks that produce domain ops live in `app.wire.translate`.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

from app.domain.errors import InvalidInput, MalformedRequest
from app.domain.ids import run_id_for
from app.wire import json_guard


class WireModel(BaseModel):
    # protected_namespaces=(): the SDK's field names start with `model_` (model_id, model_seq_id).
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


M = TypeVar("M", bound=WireModel)


def parse_body(model: type[M], body: bytes | str | dict[str, Any]) -> M:
    """Validate a request body, turning parse failures into domain errors with readable messages."""
    if isinstance(body, bytes | str):
        body = json_guard.loads(body)
    else:
        json_guard.check(body)
    if not isinstance(body, dict):
        raise MalformedRequest("request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors())
        raise InvalidInput(f"invalid {model.__name__}: {problems}") from exc


# Bootstrap and session (§2)


class ClientConfigRequest(WireModel):
    sdk_version: str | None = None


class CreateSessionRequest(WireModel):
    @field_validator("sdk_version", "display_name", "tags")
    @classmethod
    def _no_nul(cls, v: Any) -> Any:
        if any("\x00" in x for x in ([v] if isinstance(v, str) else v or [])):
            raise ValueError("must not contain NUL characters")
        return v

    tags: list[str] = Field(default_factory=list)
    user_metadata: dict[str, Any] | None = None
    sdk_version: str | None = Field(None, max_length=64)
    project_id: str | None = None
    display_name: str | None = Field(None, max_length=200)  # 0.38


class SessionHeartbeatRequest(WireModel):
    session_id: str


class FinishReason(WireModel):
    type: str = "success"  # success | errored | interrupted; a later SDK may add more


class FinishSessionRequest(WireModel):
    """`POST /sessions/{id}/finish` (0.38 only, §2.6)."""

    reason: FinishReason = Field(default_factory=FinishReason)
    detail: str | None = None


class SearchOwnerModel(WireModel):
    type: Literal["own", "accessible", "user"] = "own"
    owner_urns: list[str] = Field(default_factory=list)


class SessionStatusQueryModel(WireModel):
    # The SDK's four, plus TuFT's "expired" (docs/sessions.md).
    type: Literal["active", "cancelled", "failed", "client_finished", "expired"]
    reasons: list[str] | None = Field(None, min_length=1)


class SessionSearchCursorModel(WireModel):
    last_created_at: str  # ISO 8601 with an offset, as the SDK echoes next_cursor back
    last_session_id: str


class SessionSearchRequest(WireModel):
    """`POST /sessions/search` (0.38, experimental, §5.2)."""

    session_id: str | None = None
    project_ids: list[str] | None = None
    user_metadata: dict[str, str] = Field(default_factory=dict)
    display_name: str | None = Field(None, min_length=1, max_length=200)
    owner: SearchOwnerModel = Field(default_factory=SearchOwnerModel)
    statuses: list[SessionStatusQueryModel] | None = Field(None, min_length=1)
    limit: int = Field(50, ge=1, le=200)
    cursor: SessionSearchCursorModel | None = None


class TelemetryRequest(WireModel):
    """Accepted whatever its shape: telemetry failures must never reach users (§10)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    events: Any = None
    platform: Any = None
    sdk_version: Any = None
    session_id: Any = None
    process_uuid: Any = None


# Training (§5.1, §6.5)


class LoraConfigModel(WireModel):
    rank: int = 32
    # torch seeds its generators from any 64-bit value, signed or not; anything wider would be
    # accepted here and then fail every attempt to build the adapter.
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class OptimizerConfigModel(WireModel):
    """`{"type": "adamw"}` or `{"type": "dimuon", "version": 1}` (0.38; 0.25 sends none)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    type: str = "adamw"


class CreateModelRequest(WireModel):
    session_id: str
    model_seq_id: int = Field(ge=0, le=2**31 - 1)
    base_model: str
    user_metadata: dict[str, Any] | None = None
    lora_config: LoraConfigModel | None = None
    optimizer_config: OptimizerConfigModel | None = None


class GetInfoRequest(WireModel):
    model_id: str


class AdamParamsModel(WireModel):
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


class OptimStepRequest(WireModel):
    """0.25 sends `adam_params`; 0.38 sends `adam_params` or `optimizer_params` (non-Adam, §6.5)."""

    model_id: str
    seq_id: int | None = Field(None, le=2**31 - 1)
    adam_params: AdamParamsModel | None = None
    optimizer_params: dict[str, Any] | None = None
    # The 0.38 request model's own field name, accepted in case a client dumps it unaliased.
    optim_params: dict[str, Any] | None = None


class SaveWeightsRequest(WireModel):
    model_id: str
    path: str | None = None  # the checkpoint name; the server composes the tinker:// path (§8)
    seq_id: int | None = Field(None, le=2**31 - 1)
    ttl_seconds: int | None = None
    overwrite: bool = False
    user_metadata: dict[str, str] | None = None  # 0.38


class SaveWeightsForSamplerRequest(WireModel):
    """Named (`path`) or ephemeral (`sampling_session_seq_id`), §5.1."""

    model_id: str
    path: str | None = None
    # Names the sampler the save creates (`<session>:sample:<n>`), stored as an int64.
    sampling_session_seq_id: int | None = Field(None, ge=0, lt=2**63)
    kind: Literal["snapshot", "inflight"] = "snapshot"  # 0.38; absent in 0.25
    seq_id: int | None = Field(None, le=2**31 - 1)
    ttl_seconds: int | None = None
    user_metadata: dict[str, str] | None = None  # 0.38


class SaveWeightsExternalRequest(WireModel):
    model_id: str
    path: str | None = None
    seq_id: int | None = Field(None, le=2**31 - 1)
    ttl_seconds: int | None = None
    age_encryption_recipients: list[str] | None = None  # age public keys (app/age_crypto.py)


class LoadWeightsRequest(WireModel):
    """Legacy addressing (`model_id` + `seq_id`) or create-via-load (`session_id` + `model_seq_id`)."""

    model_id: str | None = None
    seq_id: int | None = Field(None, le=2**31 - 1)
    session_id: str | None = None
    model_seq_id: int | None = Field(None, le=2**31 - 1)
    base_model: str | None = None
    user_metadata: dict[str, Any] | None = None
    path: str
    optimizer: bool = False
    optimizer_config: OptimizerConfigModel | None = None  # 0.38
    weights_access_token: str | None = None

    @property
    def creates_model(self) -> bool:
        return self.model_id is None and self.session_id is not None

    @property
    def created_model_id(self) -> str | None:
        """The id the SDK itself derives on the create-via-load path (§0.8): `<session>:train:<n>`."""
        if self.session_id is None or self.model_seq_id is None:
            return None
        return run_id_for(self.session_id, self.model_seq_id)


class UnloadModelRequest(WireModel):
    model_id: str


# Sampling (§6.4)


class ChunkModel(WireModel):
    """One `ModelInput` chunk, kept loose so unsupported kinds get a clear error in translate."""

    type: str = "encoded_text"
    # Far above any model's context (the exact bound is checked against the sampler's model);
    # it keeps the work done on a parsed body bounded before that check.
    tokens: list[int] | None = Field(None, max_length=1 << 20)


MAX_PROMPT_TOKENS = 1 << 20


class ModelInputModel(WireModel):
    chunks: list[ChunkModel] = Field(default_factory=list, max_length=1 << 16)

    @model_validator(mode="after")
    def _bounded(self) -> ModelInputModel:
        # Checked while parsing (off the event loop for a large body), so that building the
        # prompt afterwards stays cheap whatever the body held.
        if sum(len(c.tokens or ()) for c in self.chunks) > MAX_PROMPT_TOKENS:
            raise ValueError(f"the prompt holds more than {MAX_PROMPT_TOKENS} tokens")
        return self


class SamplingParamsModel(WireModel):
    max_tokens: int | None = None
    seed: int | None = None
    # None: EOS only; []: no stops at all, not even EOS.
    stop: str | list[str] | list[int] | None = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0


class CreateSamplingSessionRequest(WireModel):
    session_id: str
    sampling_session_seq_id: int = Field(ge=0, lt=2**63)
    base_model: str | None = None
    model_path: str | None = None


class JoinSamplingSessionRequest(WireModel):
    sampling_session_id: str


class SampleRequest(WireModel):
    num_samples: int = 1
    prompt: ModelInputModel
    sampling_params: SamplingParamsModel = Field(default_factory=SamplingParamsModel)
    base_model: str | None = None
    model_path: str | None = None
    sampling_session_id: str | None = None
    seq_id: int | None = Field(None, lt=2**63)
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: int = 0
    # 0.38 only:
    topk_sample_logprobs: int = 0
    target_prompt_logprobs: dict[str, Any] | None = None
    prompt_alt_tokens_k: int = 0
    prompt_logprobs_last_n: int | None = None
    record_stability_info: bool | None = None


# Futures (§3)


class RetrieveFutureRequest(WireModel):
    request_id: str
    allow_metadata_only: bool = False


class RetrieveFuturesRequest(WireModel):
    """Flag-gated batch poller (0.38, §3.6)."""

    target: dict[str, Any] = Field(default_factory=dict)
    prev_cursor: int = 0
    timeout: float | None = None
    retrieved_request_ids: list[str] = Field(default_factory=list)


class CancelFutureRequest(WireModel):
    request_id: str


class UntypedAPIFuture(WireModel):
    """The submission reply of every future-returning endpoint (§3.1).

    0.38 asserts one `sample_sequence_ids` entry per requested sample on `asample`; dump with
    `exclude_none=True` so the other endpoints omit it.
    """

    request_id: str
    model_id: str | None = None
    sample_sequence_ids: list[str] | None = None


# REST (§5.2)


class WeightsInfoRequest(WireModel):
    tinker_path: str


class SetTtlRequest(WireModel):
    """The SDK always sends the key; null removes the expiry. Strict: "60", 1.5 or true are
    mistakes to report, not to coerce."""

    ttl_seconds: StrictInt | None


class AssignProjectRequest(WireModel):
    project_id: str


class CopyWeightsRequest(WireModel):
    source_path: str
    destination_project_id: str | None = None
    session_id: str | None = None
    model_seq_id: int | None = Field(None, ge=0, le=2**31 - 1)
    ttl_seconds: StrictInt | None = None


class ListQuery(WireModel):
    """Query string of the list endpoints: `?limit=&offset=&access_scope=` (§14.3)."""

    limit: int = 20
    offset: int = 0
    access_scope: str = "owned"  # owned | accessible
    project_id: str | None = None
