"""Token counts for the usage report (docs/audit-and-usage.md), taken from an op when it is
submitted and from a sample's result when it commits: both are pruned later, the counts stay."""

from __future__ import annotations

import json
from typing import Any

from app.domain.oai import OaiCompletionOp
from app.domain.ops import ForwardBackwardOp, SampleOp


def input_tokens(op: Any) -> int | None:
    """Tokens the op feeds the model: every datum of a forward_backward (or forward), a sample's
    prompt once (its num_samples sequences share the prefill). None for ops without tokens, and
    for OpenAI completions, whose prompt is only tokenized on the worker (their result has it)."""
    if isinstance(op, ForwardBackwardOp):
        return sum(len(d.tokens) for d in op.data)
    if isinstance(op, SampleOp):
        return len(op.prompt)
    if isinstance(op, OaiCompletionOp) and op.prompt_tokens is not None:
        return len(op.prompt_tokens)
    return None


def sample_counts(result: bytes | None) -> dict[str, int]:
    """Column values for a committed sample: its sampled tokens (every sequence), and for an
    OpenAI completion also its prompt tokens. Read with json, not the result models: this runs in
    the worker's commit, and only two numbers are wanted. {} for a failure or an unknown shape."""
    if not result:
        return {}
    try:
        data = json.loads(result)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    if data.get("kind") == "sample":
        return {"output_tokens": sum(len(s.get("tokens") or ()) for s in data.get("sequences") or ())}
    if data.get("kind") == "oai_completion":
        counts = {"input_tokens": data.get("prompt_tokens"), "output_tokens": data.get("completion_tokens")}
        return {k: v for k, v in counts.items() if isinstance(v, int)}
    return {}
