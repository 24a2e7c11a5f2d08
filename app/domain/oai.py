"""OpenAI-compatible completions as a durable op (docs/openai.md).

The API process cannot tokenize (it never imports transformers), so it stores the request as text;
a worker applies the chat template, tokenizes, samples and detokenizes (workers/engine/text.py).
The op row has kind `sample`, so claiming, requeueing an abandoned claim and result retention are
exactly those of SDK samples; only the payload differs (`kind` "oai_completion" inside it).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ChatMessage(_Frozen):
    role: Literal["system", "user", "assistant"]
    content: str


class OaiCompletionOp(_Frozen):
    """Exactly one of `prompt` (text), `prompt_tokens` (token ids) or `messages` (chat) is set."""

    kind: Literal["oai_completion"] = "oai_completion"
    base_model: str
    # The tinker:// sampler path of the adapter, None for the bare base model. The API checked the
    # tenant may read it; the worker only locates its files.
    model_path: str | None = None
    prompt: str | None = None
    prompt_tokens: tuple[int, ...] | None = None
    messages: tuple[ChatMessage, ...] | None = None
    # None: the engine's default (whatever fits, capped at 256).
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # Return each generated token (decoded alone) with its logprob.
    logprobs: bool = False

    @model_validator(mode="after")
    def _one_prompt(self) -> OaiCompletionOp:
        given = [x is not None for x in (self.prompt, self.prompt_tokens, self.messages)]
        if sum(given) != 1:
            raise ValueError("exactly one of prompt, prompt_tokens and messages must be set")
        return self

    @property
    def chat(self) -> bool:
        return self.messages is not None


class OaiChoice(_Frozen):
    # Stop strings, EOS and stop tokens are cut off, as OpenAI does.
    text: str
    finish_reason: Literal["stop", "length"]
    # With logprobs: the tokens behind `text`, each decoded alone, and their logprobs.
    tokens: tuple[str, ...] | None = None
    token_logprobs: tuple[float, ...] | None = None


class OaiCompletionResult(_Frozen):
    kind: Literal["oai_completion"] = "oai_completion"
    choices: tuple[OaiChoice, ...]
    prompt_tokens: int
    # Every generated token, including any EOS or stop token that was cut from the text.
    completion_tokens: int


def parse_oai_result(raw: bytes) -> OaiCompletionResult:
    return OaiCompletionResult.model_validate_json(raw)
