"""Results of ops, as stored in the database and encoded for the wire by app/wire at retrieve time."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from app.domain.oai import OaiCompletionResult
from app.domain.sampling import PromptGrid
from app.domain.tensors import Array


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, ser_json_bytes="base64", val_json_bytes="base64")


class CreateModelResult(_Frozen):
    kind: Literal["create_model"] = "create_model"
    model_id: str


class ForwardBackwardResult(_Frozen):
    kind: Literal["forward_backward"] = "forward_backward"
    # One dict per datum, e.g. {"logprobs": float32 [N_i]}
    outputs: tuple[dict[str, Array], ...]
    metrics: dict[str, float]  # keys are "name:reduction" (tinker-protocol.md §6.3)


class OptimStepResult(_Frozen):
    kind: Literal["optim_step"] = "optim_step"
    metrics: dict[str, float] = Field(default_factory=dict)


class SaveWeightsResult(_Frozen):
    kind: Literal["save_weights"] = "save_weights"
    checkpoint_kind: Literal["training", "sampler", "external"]
    path: str | None = None
    sampling_session_id: str | None = None
    size_bytes: int | None = None


class LoadWeightsResult(_Frozen):
    kind: Literal["load_weights"] = "load_weights"
    path: str
    model_id: str


class TokenTable(_Frozen):
    """[n, k] token ids (int64) and their logprobs (float32), row by row."""

    token_ids: Array
    logprobs: Array


class SampledSequence(_Frozen):
    tokens: tuple[int, ...]
    logprobs: tuple[float, ...] | None
    stop_reason: Literal["stop", "length"]
    # topk_sample_logprobs: one row per sampled token, best first.
    topk_logprobs: TokenTable | None = None


class SampleResult(_Frozen):
    kind: Literal["sample"] = "sample"
    sequences: tuple[SampledSequence, ...]
    # One entry per prompt token; None where none was computed (position 0, and every position
    # before the last prompt_logprobs_last_n).
    prompt_logprobs: tuple[float | None, ...] | None = None
    # Per prompt position: (token_id, logprob) pairs, best first; None where prompt_logprobs is.
    topk_prompt_logprobs: tuple[tuple[tuple[int, float], ...] | None, ...] | None = None
    # float32 logprobs in the layout of the request's target ids; 0.0 where the id was -1.
    target_prompt_logprobs: PromptGrid | None = None
    # prompt_alt_tokens_k draws: [len(prompt) - 1, k], row i for prompt position i + 1.
    prompt_alt_tokens: TokenTable | None = None


Result = Annotated[
    CreateModelResult
    | ForwardBackwardResult
    | OptimStepResult
    | SaveWeightsResult
    | LoadWeightsResult
    | SampleResult
    # An OpenAI-endpoint completion is an op too; its id is visible to clients, who may poll it.
    | OaiCompletionResult,
    Field(discriminator="kind"),
]
_RESULT_ADAPTER: TypeAdapter[Result] = TypeAdapter(Result)


def result_bytes(result: BaseModel) -> bytes:
    return result.model_dump_json().encode()


def parse_result(raw: bytes) -> Result:
    return _RESULT_ADAPTER.validate_json(raw)
