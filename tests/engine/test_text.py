"""Text completions on the tiny model: chat template, tokenization, stop handling, detokenization."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from app.domain.models import builtin_tiny_spec
from app.domain.oai import ChatMessage, OaiCompletionOp, OaiCompletionResult
from app.domain.ops import SampleOp
from app.domain.results import SampledSequence, SampleResult
from tests.engine.helpers import TINY
from workers.engine import OpInputError, TorchEngine, build_tiny_tokenizer
from workers.engine.text import complete_text, encode_prompt, finish, render_chat

EOS = 151_643
IM_START, IM_END = 151_644, 151_645


class Recording:
    """The real engine, keeping the SampleOps it was given."""

    def __init__(self, engine: TorchEngine) -> None:
        self.engine = engine
        self.ops: list[SampleOp] = []

    def sample(self, base_model: str, adapter: Path | None, op: SampleOp) -> SampleResult:
        self.ops.append(op)
        return self.engine.sample(base_model, adapter, op)


@pytest.fixture(scope="module")
def tok(cache_dir: Path) -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer(cache_dir)


def _complete(engine: TorchEngine, cache_dir: Path, **fields: object) -> tuple[OaiCompletionResult, SampleOp]:
    recording = Recording(engine)
    op = OaiCompletionOp(base_model=TINY, **fields)  # type: ignore[arg-type]
    result = complete_text(recording, [builtin_tiny_spec()], cache_dir, None, op)
    return result, recording.ops[0]


def test_tiny_model_uses_the_documented_chatml_template(tok: PreTrainedTokenizerFast) -> None:
    assert not tok.chat_template  # so the fallback is what runs
    messages = (ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi!"))
    text = render_chat(tok, messages)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    ids, stops = encode_prompt(tok, OaiCompletionOp(base_model=TINY, messages=messages))
    assert stops == (IM_END,)
    assert ids.count(IM_START) == 3 and ids.count(IM_END) == 2  # markers are single special tokens
    assert ids[-2:] == tok.encode("assistant\n", add_special_tokens=False)
    assert tok.decode(ids) == text


def test_finish_drops_the_stopping_token_and_round_trips(tok: PreTrainedTokenizerFast) -> None:
    body = tok.encode("Hello there, café ☕", add_special_tokens=False)
    seq = SampledSequence(
        tokens=(*body, EOS), logprobs=tuple(-0.1 * i for i in range(len(body) + 1)), stop_reason="stop"
    )
    choice = finish(tok, seq, (), logprobs=True)
    assert choice.text == "Hello there, café ☕" and choice.finish_reason == "stop"
    assert choice.token_logprobs == seq.logprobs[: len(body)]  # the EOS is not reported
    assert choice.tokens is not None and len(choice.tokens) == len(body)
    assert "".join(choice.tokens).startswith("Hello there, caf")
    # Run out of tokens: nothing is dropped.
    cut = SampledSequence(tokens=tuple(body), logprobs=None, stop_reason="length")
    assert finish(tok, cut, (), logprobs=False).model_dump() == {
        "text": "Hello there, café ☕",
        "finish_reason": "length",
        "tokens": None,
        "token_logprobs": None,
    }


def test_finish_cuts_at_the_first_stop_string(tok: PreTrainedTokenizerFast) -> None:
    tokens = tuple(tok.encode("one two. three. four", add_special_tokens=False))
    seq = SampledSequence(tokens=tokens, logprobs=tuple(-1.0 for _ in tokens), stop_reason="stop")
    choice = finish(tok, seq, ("four", ". "), logprobs=True)
    assert choice.text == "one two" and choice.finish_reason == "stop"
    assert choice.tokens is not None and "".join(choice.tokens).startswith("one two")
    # The kept tokens are the fewest that spell the text: dropping one more would lose some of it.
    assert len(tok.decode(tokens[: len(choice.tokens) - 1])) < len("one two")


def test_completion_on_the_base_model(engine: TorchEngine, cache_dir: Path, tok: PreTrainedTokenizerFast) -> None:
    result, sent = _complete(engine, cache_dir, prompt="Hello world", max_tokens=6, n=3, temperature=1.0, seed=7)
    assert sent.prompt == tuple(tok.encode("Hello world")) and sent.num_samples == 3
    assert sent.params.max_tokens == 6 and sent.params.stop_tokens == ()
    assert result.prompt_tokens == len(sent.prompt)
    assert len(result.choices) == 3
    assert 3 <= result.completion_tokens <= 18
    again, _ = _complete(engine, cache_dir, prompt="Hello world", max_tokens=6, n=3, temperature=1.0, seed=7)
    assert again == result  # the seed fixes the output
    for choice in result.choices:
        assert choice.finish_reason in ("stop", "length") and choice.tokens is None


def test_greedy_stop_string_matches_the_unstopped_text(engine: TorchEngine, cache_dir: Path) -> None:
    full, _ = _complete(engine, cache_dir, prompt="The weather today", max_tokens=12, temperature=0.0)
    text = full.choices[0].text
    assert full.choices[0].finish_reason == "length" and len(text) > 4
    stop = text[3:5]
    cut, sent = _complete(engine, cache_dir, prompt="The weather today", max_tokens=12, temperature=0.0, stop=(stop,))
    assert sent.params.stop_strings == (stop,)
    assert cut.choices[0].text == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.completion_tokens < full.completion_tokens


def test_chat_completion_stops_at_end_of_turn_and_reports_logprobs(engine: TorchEngine, cache_dir: Path) -> None:
    messages = (ChatMessage(role="user", content="Say something."),)
    result, sent = _complete(engine, cache_dir, messages=messages, max_tokens=5, temperature=0.0, logprobs=True)
    assert sent.params.stop_tokens == (IM_END,) and sent.params.stop_at_eos
    assert sent.prompt[-3:-2] == (IM_START,)
    choice = result.choices[0]
    assert choice.tokens is not None and choice.token_logprobs is not None
    assert len(choice.tokens) == len(choice.token_logprobs) <= 5
    assert all(lp <= 0 for lp in choice.token_logprobs)


def test_token_prompts_and_errors(engine: TorchEngine, cache_dir: Path) -> None:
    result, sent = _complete(engine, cache_dir, prompt_tokens=(9707, 1879), max_tokens=2, temperature=0.0)
    assert sent.prompt == (9707, 1879) and result.prompt_tokens == 2
    with pytest.raises(OpInputError, match="max length"):
        _complete(engine, cache_dir, prompt="hi", max_tokens=5000)
    with pytest.raises(OpInputError, match="unknown base model"):
        complete_text(engine, [builtin_tiny_spec()], cache_dir, None, OaiCompletionOp(base_model="nope", prompt="x"))
