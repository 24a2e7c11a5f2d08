"""OpenAI's request and response shapes for /oai/api/v1 (docs/openai.md).

Requests become an OaiCompletionOp; results become OpenAI's `text_completion` or
`chat.completion` objects. Unknown request fields are ignored (clients send many optional ones);
known fields this server cannot honour are refused with a 400 naming them, never silently dropped.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel

from app.domain.errors import InvalidInput
from app.domain.oai import ChatMessage, OaiCompletionOp, OaiCompletionResult
from app.wire.json_models import WireModel

MAX_STOP_STRINGS = 4  # OpenAI's limit
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /completions (chat has none)


class _Common(WireModel):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | None = None
    max_tokens: int | None = COMPLETIONS_DEFAULT_MAX_TOKENS
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class _TextPart(BaseModel):
    type: str
    text: str | None = None


class _MessageIn(BaseModel):
    role: str
    content: str | list[_TextPart] | None = None


class ChatRequest(_Common):
    messages: list[_MessageIn]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


def _refuse(name: str, why: str = "is not supported by this server") -> None:
    raise InvalidInput(f"{name} {why}")


def _common(req: _Common, max_n: int) -> dict[str, Any]:
    if req.stream:
        _refuse("stream=true", "is not supported by this server; send stream=false (the default)")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            _refuse(name)
    if req.logit_bias:
        _refuse("logit_bias")
    temperature = 1.0 if req.temperature is None else req.temperature
    if not (math.isfinite(temperature) and 0 <= temperature <= 2):
        raise InvalidInput(f"temperature must be between 0 and 2, got {temperature}")
    top_p = 1.0 if req.top_p is None else req.top_p
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise InvalidInput(f"top_p must be in (0, 1], got {top_p}")
    n = 1 if req.n is None else req.n
    if not 1 <= n <= max_n:
        raise InvalidInput(f"n must be between 1 and {max_n}, got {n}")
    if req.max_tokens is not None and req.max_tokens < 1:
        raise InvalidInput(f"max_tokens must be at least 1, got {req.max_tokens}")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
        raise InvalidInput(f"stop takes up to {MAX_STOP_STRINGS} non-empty strings, got {stop!r}")
    return {
        "max_tokens": req.max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "n": n,
        "stop": tuple(stop),
        "seed": req.seed,
    }


def completion_op(req: CompletionRequest, *, base_model: str, model_path: str | None, max_n: int) -> OaiCompletionOp:
    params = _common(req, max_n)
    if req.echo:
        _refuse("echo=true")
    if req.suffix:
        _refuse("suffix")
    if req.best_of is not None and req.best_of != params["n"]:
        _refuse("best_of other than n")
    if req.logprobs not in (None, 0):
        _refuse(f"logprobs={req.logprobs}", "is not supported: only logprobs=0 (the sampled tokens' logprobs)")
    prompt: dict[str, Any]
    if isinstance(req.prompt, str):
        prompt = {"prompt": req.prompt}
    elif req.prompt and all(isinstance(p, str) for p in req.prompt):
        if len(req.prompt) != 1:
            _refuse("a batch of several prompts", "is not supported; send one prompt per request")
        prompt = {"prompt": req.prompt[0]}
    elif req.prompt:
        prompt = {"prompt_tokens": tuple(int(t) for t in req.prompt)}
    else:
        raise InvalidInput("prompt is required: a string or a list of token ids")
    if prompt.get("prompt") == "":
        raise InvalidInput("prompt is empty")
    return OaiCompletionOp(base_model=base_model, model_path=model_path, logprobs=req.logprobs == 0, **prompt, **params)


_ROLES: dict[str, Literal["system", "user", "assistant"]] = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
}


def _message(i: int, msg: _MessageIn) -> ChatMessage:
    role = _ROLES.get(msg.role)
    if role is None:
        raise InvalidInput(f"messages[{i}].role {msg.role!r} is not supported; use system, user or assistant")
    if isinstance(msg.content, str):
        return ChatMessage(role=role, content=msg.content)
    if msg.content is None:
        raise InvalidInput(f"messages[{i}].content is required")
    texts = []
    for part in msg.content:
        if part.type != "text" or part.text is None:
            raise InvalidInput(f"messages[{i}]: content parts of type {part.type!r} are not supported; send text")
        texts.append(part.text)
    return ChatMessage(role=role, content="".join(texts))


def chat_op(req: ChatRequest, *, base_model: str, model_path: str | None, max_n: int) -> OaiCompletionOp:
    if req.max_completion_tokens is not None:
        req = req.model_copy(update={"max_tokens": req.max_completion_tokens})
    params = _common(req, max_n)
    if req.tools:
        _refuse("tools")
    if req.response_format and req.response_format.get("type") != "text":
        _refuse(f"response_format {req.response_format.get('type')!r}", "is not supported; only 'text'")
    if req.top_logprobs:
        _refuse("top_logprobs", "is not supported: logprobs=true returns the sampled tokens' logprobs only")
    if not req.messages:
        raise InvalidInput("messages must hold at least one message")
    messages = tuple(_message(i, m) for i, m in enumerate(req.messages))
    return OaiCompletionOp(
        base_model=base_model, model_path=model_path, messages=messages, logprobs=bool(req.logprobs), **params
    )


def check_limits(op: OaiCompletionOp, *, vocab: int, max_len: int) -> None:
    """What can be checked without a tokenizer; the worker checks the tokenized prompt's length."""
    if op.max_tokens is not None and op.max_tokens >= max_len:
        raise InvalidInput(f"max_tokens ({op.max_tokens}) must leave room for the prompt in {max_len} tokens")
    if op.prompt_tokens is not None:
        bad = next((t for t in op.prompt_tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidInput(f"prompt: token id {bad} is outside the vocabulary [0, {vocab})")
        if len(op.prompt_tokens) + (op.max_tokens or 0) > max_len:
            raise InvalidInput(
                f"prompt ({len(op.prompt_tokens)} tokens) plus max_tokens ({op.max_tokens}) "
                f"exceed the model's maximum length {max_len}"
            )


def _completion_logprobs(tokens: tuple[str, ...], logprobs: tuple[float, ...]) -> dict[str, Any]:
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {"tokens": list(tokens), "token_logprobs": list(logprobs), "top_logprobs": None, "text_offset": offsets}


def _chat_logprobs(tokens: tuple[str, ...], logprobs: tuple[float, ...]) -> dict[str, Any]:
    return {
        "content": [
            {"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
            for t, lp in zip(tokens, logprobs, strict=True)
        ]
    }


def response_body(
    result: OaiCompletionResult, *, op: OaiCompletionOp, request_id: str, model: str, created: int
) -> dict[str, Any]:
    """OpenAI's completion object. The id carries the op's request id (it shows in `tuft` admin
    listings and server logs)."""
    choices: list[dict[str, Any]] = []
    for index, choice in enumerate(result.choices):
        lp = None
        if op.logprobs and choice.tokens is not None and choice.token_logprobs is not None:
            build = _chat_logprobs if op.chat else _completion_logprobs
            lp = build(choice.tokens, choice.token_logprobs)
        if op.chat:
            message = {"role": "assistant", "content": choice.text}
            choices.append({"index": index, "message": message, "logprobs": lp, "finish_reason": choice.finish_reason})
        else:
            choices.append({"index": index, "text": choice.text, "logprobs": lp, "finish_reason": choice.finish_reason})
    suffix = request_id.removeprefix("req-")
    return {
        "id": f"chatcmpl-{suffix}" if op.chat else f"cmpl-{suffix}",
        "object": "chat.completion" if op.chat else "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        },
    }


def error_body(message: str, *, type_: str, code: str | None) -> dict[str, Any]:
    """OpenAI's error shape; the openai package reads error.message and error.code."""
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}
