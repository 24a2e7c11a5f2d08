"""sample_many on the real tiny model: the batched decode (decode.py) against the reference loop
(sampling.sample), against a teacher-forced forward, and against itself alone vs in other batches."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from app.domain.models import ModelSpec
from app.domain.ops import OptimStepOp, SampleOp, SamplingParams
from app.domain.results import SampleResult
from tests.engine.helpers import DEVICE, TINY, datum, fb, lora, ref_tol
from tests.engine.test_architectures import ARCHS
from tests.engine.test_architectures import _config as arch_config
from workers.engine import OpInputError, TorchEngine, build_tiny_model, build_tiny_tokenizer, decode
from workers.engine.decode import ROW_CACHE_MODELS, SampleRequest
from workers.engine.sampler_rows import as_i32, mix32
from workers.engine.sampling import sample as reference_sample

PROMPTS = ((9707, 1879, 0, 220), (9707, 1879, 0, 220, 3838, 374, 279), (5,), (3838, 374, 279, 1879, 0))


def _op(prompt: Sequence[int] = PROMPTS[0], n: int = 1, **kw: object) -> SampleOp:
    params = {k: kw.pop(k) for k in list(kw) if k in SamplingParams.model_fields}
    params.setdefault("stop_at_eos", False)
    return SampleOp(prompt=tuple(prompt), num_samples=n, params=SamplingParams(**params), **kw)  # type: ignore[arg-type]


def _many(
    engine: TorchEngine, ops: Sequence[SampleOp], adapters: Sequence[Path | None] | None = None
) -> list[SampleResult]:
    adapters = adapters or [None] * len(ops)
    results = engine.sample_many([SampleRequest(TINY, a, op) for a, op in zip(adapters, ops, strict=True)])
    assert all(isinstance(r, SampleResult) for r in results)
    return results  # type: ignore[return-value]


def _tokens(result: SampleResult) -> list[tuple[int, ...]]:
    return [s.tokens for s in result.sequences]


def _close(a: SampleResult, b: SampleResult, tol: float = 1e-5) -> None:
    """Same tokens and stop reasons; logprobs equal up to the rounding of a different batch shape."""
    assert _tokens(a) == _tokens(b)
    assert [s.stop_reason for s in a.sequences] == [s.stop_reason for s in b.sequences]
    for x, y in zip(a.sequences, b.sequences, strict=True):
        assert x.logprobs == pytest.approx(y.logprobs, abs=ref_tol(tol))


def test_greedy_equals_the_reference_loop(engine: TorchEngine) -> None:
    ops = [_op(p, n=2, max_tokens=10, temperature=0) for p in PROMPTS]
    batched = _many(engine, ops)
    slot = engine._slots[TINY]
    slot.host.activate(None)
    for op, got in zip(ops, batched, strict=True):
        want = reference_sample(slot.loaded, op, 10)
        _close(got, want)


def test_logprobs_match_a_teacher_forced_forward(engine: TorchEngine) -> None:
    model = build_tiny_model()
    ops = [_op(PROMPTS[1], n=3, max_tokens=8, seed=5, top_k=50, top_p=0.9), _op(PROMPTS[0], max_tokens=5, seed=2)]
    for op, result in zip(ops, _many(engine, ops), strict=True):
        for seq in result.sequences:
            tokens = [*op.prompt, *seq.tokens]
            with torch.no_grad():
                lps = torch.log_softmax(model(torch.tensor([tokens])).logits[0].float(), -1)
            p = len(op.prompt)
            want = [lps[p - 1 + i, t].item() for i, t in enumerate(seq.tokens)]
            assert seq.logprobs == pytest.approx(want, abs=ref_tol(1e-4))


def test_seeded_tokens_do_not_depend_on_the_batch(engine: TorchEngine) -> None:
    ops = [
        _op(PROMPTS[0], n=2, max_tokens=9, seed=1),
        _op(PROMPTS[1], max_tokens=4, seed=2, temperature=0.7, top_k=20),
        _op(PROMPTS[2], n=3, max_tokens=12, seed=3, top_p=0.8),
        _op(PROMPTS[3], max_tokens=6, seed=4, temperature=0),
        _op(PROMPTS[3], max_tokens=7, seed=5, temperature=1.3, top_k=5, top_p=0.95),
    ]
    alone = [_many(engine, [op])[0] for op in ops]
    together = _many(engine, ops)
    reversed_ = _many(engine, ops[::-1])[::-1]
    crowd = _many(engine, [_op(PROMPTS[1], n=4, max_tokens=15, seed=9), *ops[:2], _op((7, 8), seed=10), *ops[2:]])
    mixed = [crowd[1], crowd[2], *crowd[4:]]
    for a, b, c, d in zip(alone, together, reversed_, mixed, strict=True):
        _close(a, b)
        _close(a, c)
        _close(a, d)
    assert len(set(_tokens(together[2]))) == 3  # the samples of one request are independent draws


def test_a_sample_index_keeps_its_tokens_whatever_num_samples(engine: TorchEngine) -> None:
    two, five = _many(engine, [_op(n=2, max_tokens=6, seed=8), _op(n=5, max_tokens=6, seed=8)])
    assert _tokens(five)[:2] == _tokens(two)
    assert _tokens(_many(engine, [_op(n=2, max_tokens=6, seed=9)])[0]) != _tokens(two)


def test_stops_in_a_batch(engine: TorchEngine, cache_dir: Path) -> None:
    tok = build_tiny_tokenizer(cache_dir)
    free = _many(engine, [_op(max_tokens=20, seed=6)])[0].sequences[0]
    stop_token = free.tokens[3]
    text9, text10 = tok.decode(list(free.tokens[:9])), tok.decode(list(free.tokens[:10]))
    needle = text10[len(text9) - 1 :]
    string_end = next(n for n in range(1, 21) if needle in tok.decode(list(free.tokens[:n])))
    ops = [
        _op(max_tokens=20, seed=6, stop_tokens=(stop_token,)),
        _op(max_tokens=20, seed=6, stop_strings=(needle,)),
        _op(max_tokens=20, seed=6),
        _op(max_tokens=2, seed=6),
        _op(max_tokens=0, seed=6, topk_sample_logprobs=2),
    ]
    by_token, by_string, whole, short, empty = _many(engine, ops)
    first = free.tokens.index(stop_token) + 1
    assert by_token.sequences[0].tokens == free.tokens[:first] and by_token.sequences[0].stop_reason == "stop"
    assert by_string.sequences[0].tokens == free.tokens[:string_end]
    assert by_string.sequences[0].stop_reason == "stop"
    assert whole.sequences[0].tokens == free.tokens and whole.sequences[0].stop_reason == "length"
    assert short.sequences[0].tokens == free.tokens[:2] and short.sequences[0].stop_reason == "length"
    assert empty.sequences[0].tokens == () and empty.sequences[0].stop_reason == "length"
    for got, op in zip((by_token, by_string, whole, short), ops, strict=False):
        _close(got, _many(engine, [op])[0])


def test_extras_in_a_batch_equal_alone(engine: TorchEngine) -> None:
    ops = [
        _op(
            PROMPTS[1], n=2, max_tokens=5, seed=1, prompt_logprobs=True, topk_prompt_logprobs=3, topk_sample_logprobs=4
        ),
        _op(PROMPTS[0], max_tokens=3, seed=2, prompt_alt_tokens_k=2),
        _op(PROMPTS[3], max_tokens=4, seed=3, topk_sample_logprobs=2),
    ]
    together = _many(engine, ops)
    for op, got in zip(ops, together, strict=True):
        want = engine.sample(TINY, None, op)
        _close(got, want)
        assert got.prompt_logprobs == want.prompt_logprobs
        assert got.topk_prompt_logprobs == want.topk_prompt_logprobs
        assert got.prompt_alt_tokens == want.prompt_alt_tokens
        for x, y in zip(got.sequences, want.sequences, strict=True):
            assert (x.topk_logprobs is None) == (y.topk_logprobs is None)
            if x.topk_logprobs is not None and y.topk_logprobs is not None:
                assert x.topk_logprobs.token_ids == y.topk_logprobs.token_ids
                assert x.topk_logprobs.logprobs.tolist() == pytest.approx(y.topk_logprobs.logprobs.tolist(), abs=1e-5)


def test_a_bad_request_fails_alone(engine: TorchEngine) -> None:
    good = _op(max_tokens=4, seed=1)
    results = engine.sample_many(
        [SampleRequest(TINY, None, good), SampleRequest(TINY, None, _op(top_p=0.0)), SampleRequest("nope", None, good)]
    )
    assert isinstance(results[0], SampleResult) and _tokens(results[0]) == _tokens(_many(engine, [good])[0])
    assert isinstance(results[1], OpInputError) and isinstance(results[2], OpInputError)


def _trained_adapter(engine: TorchEngine, run_id: str, seed: int, dest: Path) -> Path:
    engine.create_run(run_id, TINY, lora(seed=seed))
    for _ in range(2):
        engine.forward_backward(run_id, fb(datum([*PROMPTS[0], 5, 6, 7 + seed])))
        engine.optim_step(run_id, OptimStepOp())
    dest.mkdir()
    engine.save_run(run_id, dest, with_optimizer=False)
    return dest


def test_mixed_adapters_in_one_batch_equal_each_alone(engine: TorchEngine, tmp_path: Path) -> None:
    a = _trained_adapter(engine, "batch:a", 3, tmp_path / "a")
    b = _trained_adapter(engine, "batch:b", 4, tmp_path / "b")
    ops = [_op(PROMPTS[i % 4], n=1 + i % 2, max_tokens=6, seed=i, prompt_logprobs=True) for i in range(6)]
    adapters = [a, None, b, a, b, None]
    assert engine._slots[TINY].router.supported()  # the rows are routed, not split into batches
    together = _many(engine, ops, adapters)
    for op, adapter, got in zip(ops, adapters, together, strict=True):
        want = engine.sample(TINY, adapter, op)
        _close(got, want)
        assert got.prompt_logprobs == want.prompt_logprobs
    # The adapters matter: the same request through each gives different prompt logprobs.
    scores = [r.prompt_logprobs for r in _many(engine, [ops[0]] * 3, [a, b, None])]
    assert len({s for s in scores}) == 3


def _lowbias32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_noise_hash_is_the_32_bit_hash_in_int32_tensors() -> None:
    # The tensor version wraps int32 products and emulates logical shifts: the bits must equal
    # plain integers'.
    xs = [0, 1, 12345, 2**31, 2**32 - 1, 0xDEADBEEF, 0x7FFFFFFF]
    got = mix32(torch.tensor([as_i32(x) for x in xs], dtype=torch.int32)).tolist()
    assert [v & 0xFFFFFFFF for v in got] == [_lowbias32(x) for x in xs]


@pytest.mark.parametrize("model_type", sorted(ROW_CACHE_MODELS))
def test_row_cache_equals_hf_cache_on_each_listed_architecture(
    model_type: str, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every architecture decoded through kv_cache.RowCache gives what HF's own cache gives (the
    path taken by architectures not listed): same tokens, logprobs within float rounding."""
    if model_type not in ARCHS:
        pytest.skip(f"{model_type} is not among test_architectures' models")
    config = arch_config(model_type, ARCHS[model_type][0])
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(tmp_path / model_type)
        build_tiny_tokenizer(cache_dir).save_pretrained(tmp_path / model_type)
    spec = ModelSpec(model_name=model_type, model_path=str(tmp_path / model_type), max_model_len=64)
    engine = TorchEngine([spec], device=DEVICE, cache_dir=cache_dir)
    prompts = [tuple(range(3, 3 + n)) for n in (2, 5, 9)]
    ops = [_op(p, n=2, max_tokens=7, seed=i, temperature=0 if i == 0 else 1.0) for i, p in enumerate(prompts)]
    requests = [SampleRequest(model_type, None, op) for op in ops]
    rows = engine.sample_many(requests)
    monkeypatch.setattr(decode, "ROW_CACHE_MODELS", frozenset())
    hf = engine.sample_many(requests)
    for a, b in zip(rows, hf, strict=True):
        assert isinstance(a, SampleResult) and isinstance(b, SampleResult)
        _close(a, b)


def test_greedy_equals_hf_generate(engine: TorchEngine) -> None:
    model = build_tiny_model()
    ops = [_op(p, max_tokens=8, temperature=0) for p in PROMPTS]
    for op, got in zip(ops, _many(engine, ops), strict=True):
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([op.prompt]),
                attention_mask=torch.ones(1, len(op.prompt), dtype=torch.int64),
                max_new_tokens=8,
                min_new_tokens=8,  # no EOS stop, as stop_at_eos=False
                do_sample=False,
                pad_token_id=0,
            )
        assert got.sequences[0].tokens == tuple(out[0, len(op.prompt) :].tolist())


def test_large_batches_split_by_rows_with_the_same_results(
    engine: TorchEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    ops = [_op(PROMPTS[i % 4], n=1 + i % 3, max_tokens=5, seed=i) for i in range(5)]
    whole = _many(engine, ops)
    monkeypatch.setattr(decode, "MAX_ROWS", 3)  # batches of at most 3 rows: (1, 2), (3), (1, 2)
    assert decode._row_chunks([1, 2, 3, 1, 2]) == [(0, 2), (2, 3), (3, 5)]
    for a, b in zip(whole, _many(engine, ops), strict=True):
        _close(a, b)
