"""The sampling extras on the real tiny model: top-k at sampled positions, prompt_logprobs_last_n,
target_prompt_logprobs and prompt_alt_tokens_k, each against a plain full forward of the model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

from app.domain.ops import SampleOp, SamplingParams
from app.domain.results import SampleResult, TokenTable
from app.domain.sampling import PromptGrid
from app.domain.tensors import Array
from tests.engine.helpers import ON_GPU, TINY, ref_tol
from workers.engine import OpInputError, TorchEngine, build_tiny_model

PROMPT = (9707, 1879, 0, 220, 3838, 374, 279)  # "Hello world! What is the"
P = len(PROMPT)
TOKENIZER_IDS = 151_669  # ids past this are vocabulary padding rows, never sampled

FullLogprobs = Callable[[Sequence[int]], torch.Tensor]


def _sample(engine: TorchEngine, **kw: Any) -> SampleResult:
    params = {k: kw.pop(k) for k in list(kw) if k in SamplingParams.model_fields}
    op = SampleOp(prompt=kw.pop("prompt", PROMPT), params=SamplingParams(**params), **kw)
    return engine.sample(TINY, None, op)


@pytest.fixture(scope="module")
def full_logprobs() -> FullLogprobs:
    """log_softmax of one plain forward over `tokens`: row i is the distribution of tokens[i + 1]."""
    model = build_tiny_model()

    def run(tokens: Sequence[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([list(tokens)])).logits[0].float(), -1)

    return run


def _rows(table: TokenTable) -> tuple[list[list[int]], list[list[float]]]:
    n, k = table.token_ids.shape
    ids, lps = table.token_ids.tolist(), table.logprobs.tolist()
    return [ids[i * k : (i + 1) * k] for i in range(n)], [lps[i * k : (i + 1) * k] for i in range(n)]  # type: ignore[misc]


# topk_sample_logprobs


def test_topk_sample_logprobs_match_a_full_forward(engine: TorchEngine, full_logprobs: FullLogprobs) -> None:
    k = 5
    # Seed 19: under the counter-based noise (sampler_rows.py) some sampled tokens land in the top-k.
    result = _sample(engine, num_samples=3, max_tokens=6, seed=19, stop_at_eos=False, topk_sample_logprobs=k)
    plain = _sample(engine, num_samples=3, max_tokens=6, seed=19, stop_at_eos=False)
    # Asking for alternatives changes nothing about what is sampled.
    assert [s.tokens for s in result.sequences] == [s.tokens for s in plain.sequences]
    assert [s.logprobs for s in result.sequences] == [s.logprobs for s in plain.sequences]
    assert all(s.topk_logprobs is None for s in plain.sequences)
    in_top = 0
    for seq in result.sequences:
        assert seq.topk_logprobs is not None and seq.logprobs is not None
        assert seq.topk_logprobs.token_ids.shape == (len(seq.tokens), k)
        assert seq.topk_logprobs.logprobs.dtype == "float32"
        ids, lps = _rows(seq.topk_logprobs)
        reference = full_logprobs([*PROMPT, *seq.tokens])
        for i, token in enumerate(seq.tokens):
            assert lps[i] == sorted(lps[i], reverse=True)
            top = torch.topk(reference[P - 1 + i], k)
            assert lps[i] == pytest.approx(top.values.tolist(), abs=ref_tol(1e-4))
            if not ON_GPU:  # bfloat16 logits tie often, so which of the tied ids make the top-k varies
                assert set(ids[i]) == set(top.indices.tolist())
            if token in ids[i]:
                in_top += 1
                # The very number reported as the sampled token's logprob.
                assert lps[i][ids[i].index(token)] == seq.logprobs[i]
            else:
                assert seq.logprobs[i] <= lps[i][-1]
    if not ON_GPU:
        # Both branches ran: with this seed some sampled tokens are in the top-k on the CPU. Which
        # ones depends on the device's random stream; greedy decoding (next test) is exact anywhere.
        assert in_top > 0


def test_greedy_token_heads_its_top_k(engine: TorchEngine) -> None:
    seq = _sample(engine, max_tokens=4, temperature=0.0, stop_at_eos=False, topk_sample_logprobs=20).sequences[0]
    assert seq.topk_logprobs is not None and seq.logprobs is not None
    ids, lps = _rows(seq.topk_logprobs)
    for i, token in enumerate(seq.tokens):
        # Greedy never picks a padding row; every better-ranked id must be one.
        rank = ids[i].index(token)
        assert all(t >= TOKENIZER_IDS for t in ids[i][:rank])
        assert lps[i][rank] == seq.logprobs[i]


def test_topk_rows_follow_early_stops(engine: TorchEngine) -> None:
    free = _sample(engine, max_tokens=8, seed=4, stop_at_eos=False).sequences[0]
    stop_at = free.tokens[2]
    result = _sample(engine, num_samples=2, max_tokens=8, seed=4, stop_tokens=(stop_at,), topk_sample_logprobs=3)
    for seq in result.sequences:
        assert seq.topk_logprobs is not None
        assert seq.topk_logprobs.token_ids.shape == (len(seq.tokens), 3)


# prompt_logprobs_last_n


@pytest.mark.parametrize("last_n", [1, 3, P - 1])
def test_last_n_masks_exactly_the_earlier_positions(engine: TorchEngine, last_n: int) -> None:
    whole = _sample(engine, max_tokens=2, seed=0, prompt_logprobs=True, topk_prompt_logprobs=4)
    part = _sample(
        engine, max_tokens=2, seed=0, prompt_logprobs=True, topk_prompt_logprobs=4, prompt_logprobs_last_n=last_n
    )
    assert whole.prompt_logprobs is not None and whole.topk_prompt_logprobs is not None
    assert part.prompt_logprobs is not None and part.topk_prompt_logprobs is not None
    assert len(part.prompt_logprobs) == len(part.topk_prompt_logprobs) == P
    cut = P - last_n
    assert part.prompt_logprobs[:cut] == (None,) * cut
    assert part.topk_prompt_logprobs[:cut] == (None,) * cut
    assert all(lp is not None for lp in part.prompt_logprobs[cut:])
    # Same numbers up to float32 rounding: fewer rows go through the projection.
    assert part.prompt_logprobs[cut:] == pytest.approx(whole.prompt_logprobs[cut:], abs=1e-5)
    for got, want in zip(part.topk_prompt_logprobs[cut:], whole.topk_prompt_logprobs[cut:], strict=True):
        assert got is not None and want is not None
        assert [t for t, _ in got] == [t for t, _ in want]
        assert [lp for _, lp in got] == pytest.approx([lp for _, lp in want], abs=1e-5)
    assert part.sequences == whole.sequences


def test_last_n_without_topk(engine: TorchEngine) -> None:
    part = _sample(engine, max_tokens=1, seed=0, prompt_logprobs=True, prompt_logprobs_last_n=2)
    assert part.prompt_logprobs is not None and part.topk_prompt_logprobs is None
    assert [lp is None for lp in part.prompt_logprobs] == [True] * (P - 2) + [False, False]


# target_prompt_logprobs


def test_dense_target_logprobs(engine: TorchEngine, full_logprobs: FullLogprobs) -> None:
    ids = [[PROMPT[r + 1], (r * 7919) % 1000, -1] for r in range(P - 1)]
    ids[0] = [-1, -1, -1]  # a row that asks for nothing
    grid = PromptGrid(shape=(P - 1, 3), values=Array.from_list([t for row in ids for t in row], "int64"))
    result = _sample(engine, max_tokens=1, seed=0, prompt_logprobs=True, target_prompt_logprobs=grid)
    got = result.target_prompt_logprobs
    assert got is not None and got.shape == (P - 1, 3) and got.crow_indices is None
    assert got.values.dtype == "float32" and got.values.size == (P - 1) * 3
    values = got.values.tolist()
    reference = full_logprobs(PROMPT)
    assert result.prompt_logprobs is not None
    for r, row in enumerate(ids):
        for c, token in enumerate(row):
            value = values[r * 3 + c]
            if token == -1:
                assert value == 0.0
            else:
                assert value == pytest.approx(float(reference[r, token]), abs=ref_tol(1e-4))
        if row[0] != -1:
            # Column 0 names the prompt's own next token: the prompt logprob at position r + 1.
            assert values[r * 3] == pytest.approx(result.prompt_logprobs[r + 1], abs=1e-6)


def test_sparse_target_logprobs_keep_the_layout(engine: TorchEngine, full_logprobs: FullLogprobs) -> None:
    # Two cells: row 1 column 3, row P-2 column 0.
    grid = PromptGrid(
        shape=(P - 1, 4),
        values=Array.from_list([42, 4242], "int64"),
        crow_indices=(0, 0, *([1] * (P - 3)), 2),
        col_indices=(3, 0),
    )
    grid.check()
    got = _sample(engine, max_tokens=1, seed=0, target_prompt_logprobs=grid).target_prompt_logprobs
    assert got is not None
    assert (got.shape, got.crow_indices, got.col_indices) == (grid.shape, grid.crow_indices, grid.col_indices)
    reference = full_logprobs(PROMPT)
    want = [float(reference[1, 42]), float(reference[P - 2, 4242])]
    assert got.values.tolist() == pytest.approx(want, abs=ref_tol(1e-4))


# prompt_alt_tokens_k


def test_alt_tokens_are_seeded_draws_with_model_logprobs(engine: TorchEngine, full_logprobs: FullLogprobs) -> None:
    k = 4
    a = _sample(engine, max_tokens=3, seed=21, stop_at_eos=False, prompt_alt_tokens_k=k)
    b = _sample(engine, max_tokens=3, seed=21, stop_at_eos=False, prompt_alt_tokens_k=k)
    c = _sample(engine, max_tokens=3, seed=22, stop_at_eos=False, prompt_alt_tokens_k=k)
    plain = _sample(engine, max_tokens=3, seed=21, stop_at_eos=False)
    assert a == b
    assert a.prompt_alt_tokens is not None and c.prompt_alt_tokens is not None
    assert a.prompt_alt_tokens.token_ids != c.prompt_alt_tokens.token_ids
    assert a.sequences == plain.sequences  # the draws have a generator of their own
    assert a.prompt_alt_tokens.token_ids.shape == a.prompt_alt_tokens.logprobs.shape == (P - 1, k)
    ids, lps = _rows(a.prompt_alt_tokens)
    reference = full_logprobs(PROMPT)
    for r in range(P - 1):
        assert all(0 <= t < TOKENIZER_IDS for t in ids[r])
        assert lps[r] == pytest.approx([float(reference[r, t]) for t in ids[r]], abs=ref_tol(1e-4))


def test_alt_tokens_at_temperature_zero_are_the_argmax(engine: TorchEngine, full_logprobs: FullLogprobs) -> None:
    alt = _sample(engine, max_tokens=1, temperature=0.0, prompt_alt_tokens_k=3).prompt_alt_tokens
    assert alt is not None
    ids, _ = _rows(alt)
    reference = full_logprobs(PROMPT)
    assert ids == [[int(reference[r, :TOKENIZER_IDS].argmax())] * 3 for r in range(P - 1)]


def test_one_token_prompt_gets_empty_tables(engine: TorchEngine) -> None:
    result = _sample(
        engine, prompt=(5,), max_tokens=1, prompt_logprobs=True, topk_prompt_logprobs=2, prompt_alt_tokens_k=2
    )
    assert result.prompt_logprobs == (None,) and result.topk_prompt_logprobs == (None,)
    assert result.prompt_alt_tokens is not None and result.prompt_alt_tokens.token_ids.shape == (0, 2)


# validation (the API refuses these first; the engine checks again)


def _grid(ids: list[int], shape: tuple[int, int]) -> PromptGrid:
    return PromptGrid(shape=shape, values=Array.from_list(ids, "int64"))


@pytest.mark.parametrize(
    "kw",
    [
        {"topk_sample_logprobs": 21},
        {"topk_sample_logprobs": -1},
        {"prompt_alt_tokens_k": 101},
        {"prompt_logprobs_last_n": 2},  # without prompt_logprobs
        {"prompt_logprobs": True, "prompt_logprobs_last_n": 0},
        {"prompt_logprobs": True, "prompt_logprobs_last_n": P},
        {"target_prompt_logprobs": _grid([1] * (P - 2), (P - 2, 1))},
        {"target_prompt_logprobs": _grid([-1] * (P - 1), (P - 1, 1))},
        {"target_prompt_logprobs": _grid([151_936] * (P - 1), (P - 1, 1))},
        {"target_prompt_logprobs": _grid([1], (P - 1, 1))},
    ],
)
def test_bad_extras_are_user_errors(engine: TorchEngine, kw: dict[str, Any]) -> None:
    with pytest.raises(OpInputError):
        _sample(engine, max_tokens=1, **kw)
