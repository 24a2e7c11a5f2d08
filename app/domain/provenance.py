"""StableReinforce's view of a datum: where each token came from, checked against what sampling
recorded (docs/losses.md, `stable_reinforce`).

A datum names its sampled sequences through provenance spans (SDK 0.38 `Datum.with_provenance`):
runs that tile `model_input` and `target_tokens`, each either a stretch of a request's prompt or
of a sequence's sampled tokens. A sampler created with `record_stability_info=True` keeps, per
sampled sequence, its prompt length, tokens and the sampler's logprob of each token. This module
turns spans plus those records into the per-target inputs the loss reads. Pure: the queue loads
the records, the API calls `resolve_datum` and the engine trusts nothing it did not check again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from app.domain.errors import InvalidInput

# loss_fn_inputs the server adds once it has resolved a datum's provenance. A client never sends
# them: the loss must read what sampling recorded, not what the client says it recorded.
RECORDED_LOGPROBS = "recorded_logprobs"  # float32 [N]: sampler logprob of each sampled target, 0 elsewhere
SAMPLED_MASK = "sampled_mask"  # float32 [N]: 1 where the target is a recorded sampled token


@dataclass(frozen=True)
class Span:
    kind: Literal["prompt", "sampled"]
    sequence_id: str
    offset: int
    length: int


@dataclass(frozen=True)
class DatumProvenance:
    model_input: tuple[Span, ...]
    targets: tuple[Span, ...]

    def sequence_ids(self) -> set[str]:
        return {span.sequence_id for span in (*self.model_input, *self.targets)}


@dataclass(frozen=True)
class SequenceRecord:
    """What sampling recorded for one sequence (app/queue/stability.py stores it)."""

    prompt_len: int
    tokens: tuple[int, ...]
    logprobs: tuple[float, ...]


@dataclass(frozen=True)
class Resolved:
    recorded_logprobs: list[float]
    sampled_mask: list[float]


def resolve_datum(
    index: int,
    tokens: Sequence[int],
    targets: Sequence[int],
    advantages: Sequence[float],
    provenance: DatumProvenance,
    records: Mapping[str, SequenceRecord],
) -> Resolved:
    """The recorded inputs of datum `index`, or InvalidInput naming the first thing wrong.

    Sampled runs must reproduce the recorded tokens exactly (a mismatch means the datum does not
    hold what was sampled, so its recorded logprobs would be another token's); prompt runs must
    lie within the request's prompt. Only sampled targets may carry an advantage: the objective
    needs the sampler's logprob of every token it trains.
    """
    where = f"datum {index}"
    _walk(where, "model_input", provenance.model_input, tokens, records)
    recorded = [0.0] * len(targets)
    mask = [0.0] * len(targets)
    position = 0
    for span, piece in _walk(where, "target_tokens", provenance.targets, targets, records):
        if span.kind == "sampled":
            logprobs = records[span.sequence_id].logprobs[span.offset : span.offset + span.length]
            recorded[position : position + span.length] = logprobs
            mask[position : position + span.length] = [1.0] * span.length
        position += len(piece)
    for t, (advantage, sampled) in enumerate(zip(advantages, mask, strict=True)):
        if advantage != 0 and not sampled:
            raise InvalidInput(
                f"{where}: advantages[{t}] is {advantage:g} but target {t} is not a sampled token; "
                "stable_reinforce trains only sampled tokens (put advantage 0 on prompt positions)"
            )
    return Resolved(recorded_logprobs=recorded, sampled_mask=mask)


def _walk(
    where: str, field: str, spans: tuple[Span, ...], values: Sequence[int], records: Mapping[str, SequenceRecord]
) -> list[tuple[Span, Sequence[int]]]:
    """Each span with the stretch of `values` it covers, after checking the tiling and the record."""
    covered = sum(span.length for span in spans)
    if covered != len(values):
        raise InvalidInput(
            f"{where}: {field} spans cover {covered} positions but {field} has {len(values)}; the runs must tile it"
        )
    out: list[tuple[Span, Sequence[int]]] = []
    position = 0
    for span in spans:
        record = records[span.sequence_id]
        piece = values[position : position + span.length]
        end = span.offset + span.length
        if span.kind == "prompt":
            if end > record.prompt_len:
                raise InvalidInput(
                    f"{where}: {field} prompt span [{span.offset}, {end}) of {span.sequence_id!r} is past the end "
                    f"of its request's prompt ({record.prompt_len} tokens)"
                )
        else:
            if end > len(record.tokens):
                raise InvalidInput(
                    f"{where}: {field} sampled span [{span.offset}, {end}) of {span.sequence_id!r} is past the end "
                    f"of that sequence ({len(record.tokens)} sampled tokens)"
                )
            if tuple(piece) != record.tokens[span.offset : end]:
                raise InvalidInput(
                    f"{where}: {field}[{position}:{position + span.length}] does not match the tokens sampled "
                    f"for {span.sequence_id!r} at [{span.offset}, {end})"
                )
        out.append((span, piece))
        position += span.length
    return out
