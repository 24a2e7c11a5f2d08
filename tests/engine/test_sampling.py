"""sample: determinism, stop conditions, lengths, logprob semantics, validation."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from app.domain.ops import OptimStepOp, SampleOp, SamplingParams
from app.domain.results import SampleResult
from tests.engine.helpers import TINY, datum, fb, lora, ref_tol
from workers.engine import OpInputError, TorchEngine, build_tiny_model, build_tiny_tokenizer
from workers.engine.sampler import SAMPLER_ADAPTER_CACHE
from workers.engine.sampling import DEFAULT_MAX_TOKENS, resolve_max_tokens

PROMPT = (9707, 1879, 0, 220)  # "Hello world! "


def _sample(engine: TorchEngine, adapter: Path | None = None, **kw: object) -> SampleResult:
    params = {k: kw.pop(k) for k in list(kw) if k in SamplingParams.model_fields}
    op = SampleOp(prompt=kw.pop("prompt", PROMPT), params=SamplingParams(**params), **kw)  # type: ignore[arg-type]
    return engine.sample(TINY, adapter, op)


def test_same_seed_same_output_different_seed_different(engine: TorchEngine) -> None:
    a = _sample(engine, num_samples=3, max_tokens=8, seed=1, stop_at_eos=False)
    b = _sample(engine, num_samples=3, max_tokens=8, seed=1, stop_at_eos=False)
    c = _sample(engine, num_samples=3, max_tokens=8, seed=2, stop_at_eos=False)
    assert a == b
    assert a.sequences != c.sequences
    assert len({s.tokens for s in a.sequences}) == 3  # independent draws within one request


def test_lengths_counts_and_logprobs(engine: TorchEngine) -> None:
    result = _sample(engine, num_samples=5, max_tokens=6, seed=3, stop_at_eos=False)
    assert len(result.sequences) == 5
    for seq in result.sequences:
        assert len(seq.tokens) == 6 and seq.stop_reason == "length"
        assert seq.logprobs is not None and len(seq.logprobs) == len(seq.tokens)
        assert all(lp <= 0 for lp in seq.logprobs)
        assert all(0 <= t < 151_669 for t in seq.tokens)  # never a vocabulary padding row
    assert result.prompt_logprobs is None and result.topk_prompt_logprobs is None


def test_default_max_tokens() -> None:
    assert resolve_max_tokens(SampleOp(prompt=PROMPT), 151_936, 2048) == DEFAULT_MAX_TOKENS
    # Capped by the room left in the context.
    assert resolve_max_tokens(SampleOp(prompt=tuple(range(2000))), 151_936, 2048) == 48


def test_default_max_tokens_fills_the_context(engine: TorchEngine) -> None:
    result = _sample(engine, prompt=tuple(range(2045)), seed=0, stop_at_eos=False)
    assert len(result.sequences[0].tokens) == 3
    assert result.sequences[0].stop_reason == "length"


def test_greedy_logprobs_are_raw_model_logprobs(engine: TorchEngine) -> None:
    result = _sample(engine, max_tokens=4, temperature=0.0, stop_at_eos=False)
    seq = result.sequences[0]
    model = build_tiny_model()
    full = list(PROMPT) + list(seq.tokens)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
    for i, token in enumerate(seq.tokens):
        row = logprobs[len(PROMPT) - 1 + i]
        assert token == int(row[:151_669].argmax())
        assert seq.logprobs is not None
        assert seq.logprobs[i] == pytest.approx(float(row[token]), abs=ref_tol(1e-4))
    # Temperature changes the choice distribution, never the reported logprob of a token.
    hot = _sample(engine, max_tokens=4, temperature=0.01, stop_at_eos=False, seed=5).sequences[0]
    assert hot.tokens == seq.tokens
    assert hot.logprobs == pytest.approx(seq.logprobs, abs=1e-5)


def test_top_k_one_is_greedy(engine: TorchEngine) -> None:
    greedy = _sample(engine, max_tokens=5, temperature=0.0, stop_at_eos=False).sequences[0].tokens
    for seed in (1, 2):
        topk = _sample(engine, max_tokens=5, top_k=1, seed=seed, stop_at_eos=False).sequences[0].tokens
        tiny_p = _sample(engine, max_tokens=5, top_p=1e-6, seed=seed, stop_at_eos=False).sequences[0].tokens
        assert topk == greedy == tiny_p


def test_stop_tokens_end_sequences_and_are_included(engine: TorchEngine) -> None:
    free = _sample(engine, max_tokens=10, seed=4, stop_at_eos=False).sequences[0]
    stop_at = free.tokens[3]
    first = free.tokens.index(stop_at)
    stopped = _sample(engine, max_tokens=10, seed=4, stop_tokens=(stop_at,), stop_at_eos=False).sequences[0]
    assert stopped.tokens == free.tokens[: first + 1]
    assert stopped.stop_reason == "stop"
    assert stopped.logprobs == free.logprobs[: first + 1]  # type: ignore[index]


def test_stop_strings(engine: TorchEngine, cache_dir: Path) -> None:
    tok = build_tiny_tokenizer(cache_dir)
    free = _sample(engine, max_tokens=12, seed=6, stop_at_eos=False).sequences[0]
    # A stop string that straddles the 4th and 5th sampled tokens' text.
    text4, text5 = tok.decode(list(free.tokens[:4])), tok.decode(list(free.tokens[:5]))
    assert len(text5) > len(text4)
    needle = text5[len(text4) - 1 :] if len(text4) else text5
    expected_end = next(n for n in range(1, 13) if needle in tok.decode(list(free.tokens[:n])))
    stopped = _sample(engine, max_tokens=12, seed=6, stop_strings=(needle,), stop_at_eos=False).sequences[0]
    assert stopped.stop_reason == "stop"
    assert stopped.tokens == free.tokens[:expected_end]
    assert needle in tok.decode(list(stopped.tokens))


def test_prompt_logprobs(engine: TorchEngine) -> None:
    result = _sample(engine, max_tokens=1, prompt_logprobs=True, topk_prompt_logprobs=3, seed=0)
    assert result.prompt_logprobs is not None and result.topk_prompt_logprobs is not None
    assert len(result.prompt_logprobs) == len(result.topk_prompt_logprobs) == len(PROMPT)
    assert result.prompt_logprobs[0] is None and result.topk_prompt_logprobs[0] is None
    # Same numbers as the training path (a fresh run's adapter is the identity).
    engine.create_run("samp:ref", TINY, lora())
    ref = engine.forward_backward("samp:ref", fb(datum(list(PROMPT)), forward_only=True)).outputs[0]["logprobs"]
    assert result.prompt_logprobs[1:] == pytest.approx(ref.tolist(), abs=1e-5)
    for i, top in enumerate(result.topk_prompt_logprobs[1:], start=1):
        assert top is not None and len(top) == 3
        values = [lp for _, lp in top]
        assert values == sorted(values, reverse=True)
        lp_i = result.prompt_logprobs[i]
        assert lp_i is not None and top[0][1] >= lp_i - 1e-6
    single = _sample(engine, max_tokens=1, prompt=(5,), prompt_logprobs=True)
    assert single.prompt_logprobs == (None,)


def test_sampling_through_a_saved_adapter(engine: TorchEngine, tmp_path: Path) -> None:
    engine.create_run("samp:trained", TINY, lora(seed=3))
    for _ in range(3):
        engine.forward_backward("samp:trained", fb(datum([*PROMPT, 5, 6, 7])))
        engine.optim_step("samp:trained", OptimStepOp())
    dest = tmp_path / "adapter"
    dest.mkdir()
    engine.save_run("samp:trained", dest, with_optimizer=False)
    base = _sample(engine, max_tokens=3, prompt_logprobs=True, seed=0)
    tuned = _sample(engine, dest, max_tokens=3, prompt_logprobs=True, seed=0)
    assert base.prompt_logprobs != tuned.prompt_logprobs
    again = _sample(engine, dest, max_tokens=3, prompt_logprobs=True, seed=0)
    assert again == tuned  # served from the adapter cache, same answer
    assert _sample(engine, None, max_tokens=3, prompt_logprobs=True, seed=0) == base


@pytest.mark.parametrize(
    "kw",
    [
        {"prompt": ()},
        {"prompt": (151_936,)},
        {"prompt": (-1, 2)},
        {"num_samples": 0},
        {"num_samples": 65},
        {"max_tokens": 2048},  # prompt + max_tokens > 2048
        {"max_tokens": -1},
        {"prompt": tuple(range(2049))},
        {"temperature": -0.5},
        {"temperature": float("nan")},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -2},
        {"stop_tokens": (200_000,)},
        {"stop_strings": ("",)},
        {"topk_prompt_logprobs": 101},
    ],
)
def test_bad_requests_are_user_errors(engine: TorchEngine, kw: dict[str, Any]) -> None:
    with pytest.raises(OpInputError):
        _sample(engine, **kw)


def test_missing_adapter_folder_is_a_user_error(engine: TorchEngine, tmp_path: Path) -> None:
    with pytest.raises(OpInputError):
        _sample(engine, tmp_path / "nope", max_tokens=1)


def test_adapter_for_other_modules_is_a_user_error(engine: TorchEngine, tmp_path: Path) -> None:
    engine.create_run("samp:foreign", TINY, lora())
    dest = tmp_path / "foreign"
    dest.mkdir()
    engine.save_run("samp:foreign", dest, with_optimizer=False)
    config_file = dest / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["target_modules"] = ["no_such_proj"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(OpInputError):
        _sample(engine, dest, max_tokens=1)
    assert _sample(engine, None, max_tokens=1, seed=1).sequences  # the engine still works


def test_sampler_adapters_are_evicted_lru(make_engine: Callable[[], TorchEngine], tmp_path: Path) -> None:
    engine = make_engine()
    engine.create_run("samp:lru", TINY, lora(rank=2))
    folders = []
    for i in range(SAMPLER_ADAPTER_CACHE + 2):
        folder = tmp_path / f"a{i}"
        folder.mkdir()
        engine.save_run("samp:lru", folder, with_optimizer=False)
        folders.append(folder)
        _sample(engine, folder, max_tokens=1, seed=0)
    slot = engine._slots[TINY]
    assert len(slot.samplers) == SAMPLER_ADAPTER_CACHE
    # The training run's adapter plus the cached sampler adapters, nothing leaked.
    assert len(slot.host.names()) == SAMPLER_ADAPTER_CACHE + 1
    assert engine.has_run("samp:lru")
