"""The static-shape decode step (decode_graph.py) against decode.py's own step, on the real tiny
model: on the CPU it runs uncaptured (EngineConfig.decode_graphs="on"); the last test replays it
from CUDA graphs and runs only where CUDA is available."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

from app.domain.models import builtin_tiny_spec
from app.domain.ops import SampleOp
from app.domain.results import SampleResult
from tests.engine.helpers import DEVICE, ON_GPU, TINY, ref_tol
from tests.engine.test_batched_sampling import PROMPTS, _op, _tokens, _trained_adapter
from workers.engine import EngineConfig, TorchEngine, build_tiny_tokenizer
from workers.engine import decode_graph as graph
from workers.engine.decode import SampleRequest
from workers.engine.sampler_rows import build_rows, gumbel, vocab_hashes


@pytest.fixture(scope="module")
def static(cache_dir: Path) -> TorchEngine:
    return TorchEngine(
        [builtin_tiny_spec()], device=DEVICE, cache_dir=cache_dir, config=EngineConfig(decode_graphs="on")
    )


@pytest.fixture(scope="module")
def dynamic(cache_dir: Path) -> TorchEngine:
    return TorchEngine(
        [builtin_tiny_spec()], device=DEVICE, cache_dir=cache_dir, config=EngineConfig(decode_graphs="off")
    )


@pytest.fixture
def steps(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Bucket sizes the static step ran at, in order (one entry per StaticRun and per compaction)."""
    sizes: list[int] = []
    init, compact = graph.StaticRun.__init__, graph.StaticRun._compact

    def spy_init(self: graph.StaticRun, *args: object, **kw: object) -> None:
        init(self, *args, **kw)  # type: ignore[arg-type]
        sizes.append(self.buf.key.rows)

    def spy_compact(self: graph.StaticRun, size: int) -> None:
        compact(self, size)
        sizes.append(size)

    monkeypatch.setattr(graph.StaticRun, "__init__", spy_init)
    monkeypatch.setattr(graph.StaticRun, "_compact", spy_compact)
    yield sizes


def _many(
    engine: TorchEngine, ops: Sequence[SampleOp], adapters: Sequence[Path | None] | None = None
) -> list[SampleResult]:
    adapters = adapters or [None] * len(ops)
    results = engine.sample_many([SampleRequest(TINY, a, op) for a, op in zip(adapters, ops, strict=True)])
    assert all(isinstance(r, SampleResult) for r in results), results
    return results  # type: ignore[return-value]


def _same(a: SampleResult, b: SampleResult, tol: float = 1e-5) -> None:
    """Same tokens, stop reasons and top-k ids; logprobs equal up to the float rounding of another
    attention width (the static step attends over the whole capacity, masked)."""
    assert _tokens(a) == _tokens(b)
    assert [s.stop_reason for s in a.sequences] == [s.stop_reason for s in b.sequences]
    for x, y in zip(a.sequences, b.sequences, strict=True):
        assert x.logprobs == pytest.approx(y.logprobs, abs=ref_tol(tol))
        assert (x.topk_logprobs is None) == (y.topk_logprobs is None)
        if x.topk_logprobs is not None and y.topk_logprobs is not None:
            # On a GPU (bf16) two candidates within rounding of each other may swap places in the
            # top-k between batch shapes; their logprobs, compared below, still agree.
            if not ON_GPU:
                assert x.topk_logprobs.token_ids == y.topk_logprobs.token_ids
            assert x.topk_logprobs.logprobs.tolist() == pytest.approx(
                y.topk_logprobs.logprobs.tolist(), abs=ref_tol(tol)
            )


OPS = [
    _op(PROMPTS[0], n=2, max_tokens=9, temperature=0),
    _op(PROMPTS[1], max_tokens=4, seed=2, temperature=0.7, top_k=20, topk_sample_logprobs=3),
    _op(PROMPTS[2], n=3, max_tokens=12, seed=3, top_p=0.8),
    _op(PROMPTS[3], max_tokens=6, seed=4, temperature=0, topk_sample_logprobs=2),
    _op(PROMPTS[3], max_tokens=11, seed=5, temperature=1.3, top_k=5, top_p=0.95),
]


def test_static_step_equals_the_dynamic_step(static: TorchEngine, dynamic: TorchEngine, steps: list[int]) -> None:
    for got, want in zip(_many(static, OPS), _many(dynamic, OPS), strict=True):
        _same(got, want)
    if not ON_GPU:  # on CUDA a decode this short takes decode.py's step (decode_graph.mode_for)
        assert steps == [8]  # 8 rows: no padding row; the next test pads


def test_padding_rows_and_compaction_change_nothing(
    static: TorchEngine, dynamic: TorchEngine, steps: list[int]
) -> None:
    # 1 + 1 + 3 + 1 + 1 + 3 = 10 rows in a bucket of 16. At the first sync (after 8 steps) the
    # 8 rows of the requests of 11 tokens or more run on, in a bucket of 8; at the second (16
    # steps) the 4 rows of the two long ones, in a bucket of 4.
    ops = [*OPS, _op(PROMPTS[1], n=3, max_tokens=20, seed=6)]
    ops[0] = _op(PROMPTS[0], n=1, max_tokens=18, seed=7)
    got, want = _many(static, ops), _many(dynamic, ops)
    for a, b in zip(got, want, strict=True):
        _same(a, b)
    if not ON_GPU:
        assert steps == [16, 8, 4]
    assert [len(s.tokens) for s in got[-1].sequences] == [20, 20, 20]


def test_stops_and_budgets_on_the_device_and_host(static: TorchEngine, dynamic: TorchEngine, cache_dir: Path) -> None:
    tok = build_tiny_tokenizer(cache_dir)
    free = _many(dynamic, [_op(max_tokens=20, seed=6)])[0].sequences[0]
    text9, text10 = tok.decode(list(free.tokens[:9])), tok.decode(list(free.tokens[:10]))
    ops = [
        _op(max_tokens=20, seed=6, stop_tokens=(free.tokens[3],)),
        _op(max_tokens=20, seed=6, stop_strings=(text10[len(text9) - 1 :],)),
        _op(max_tokens=20, seed=6),
        _op(max_tokens=2, seed=6),
        _op(max_tokens=0, seed=6, topk_sample_logprobs=2),
    ]
    got = _many(static, ops)
    for a, b in zip(got, _many(dynamic, ops), strict=True):
        _same(a, b)
    assert got[0].sequences[0].stop_reason == "stop" and got[0].sequences[0].tokens[-1] == free.tokens[3]
    assert got[1].sequences[0].stop_reason == "stop" and len(got[1].sequences[0].tokens) < 20
    assert got[2].sequences[0].tokens == free.tokens


def test_a_request_gets_the_same_tokens_alone_or_batched(static: TorchEngine) -> None:
    together = _many(static, OPS)
    for op, got in zip(OPS, together, strict=True):
        _same(got, _many(static, [op])[0])


def test_two_adapters_in_one_batch(static: TorchEngine, dynamic: TorchEngine, tmp_path: Path) -> None:
    a = _trained_adapter(dynamic, "graph:a", 3, tmp_path / "a")
    b = _trained_adapter(dynamic, "graph:b", 4, tmp_path / "b")
    ops = [_op(PROMPTS[i % 4], n=1 + i % 2, max_tokens=5 + i, seed=i) for i in range(5)]
    adapters = [a, b, a, b, b]
    got = _many(static, ops, adapters)
    assert static._slots[TINY].router.supported()  # the rows were routed, not split into batches
    for x, y in zip(got, _many(dynamic, ops, adapters), strict=True):
        _same(x, y)
    for op, adapter, x in zip(ops, adapters, got, strict=True):
        _same(x, _many(static, [op], [adapter])[0])
    # The adapters matter: one greedy request through each gives different logprobs.
    greedy = _op(PROMPTS[1], max_tokens=6, temperature=0)
    one, two = _many(static, [greedy, greedy], [a, b])
    assert one.sequences[0].logprobs != two.sequences[0].logprobs


def test_noise_from_a_device_step_equals_noise_from_an_int() -> None:
    rows = build_rows([(1.0, 0, 1.0, 2**63 + 5, 1, (), 4), (0.5, 0, 1.0, 7, 0, (3,), 9)], 1000, torch.device("cpu"))
    hashes = vocab_hashes(1000, torch.device("cpu"))
    for step in (0, 1, 17, 4095):
        want = gumbel(rows, step, hashes)
        assert torch.equal(gumbel(rows, torch.tensor([step]), hashes), want)
    assert not torch.equal(gumbel(rows, torch.tensor([1]), hashes), gumbel(rows, 2, hashes))


def test_buckets_and_capacity() -> None:
    assert [graph.bucket(n) for n in (1, 3, 8, 9, 200, 256, 257, 600)] == [1, 4, 8, 16, 256, 256, 512, 768]
    assert [graph.round_capacity(n) for n in (1, 128, 129)] == [128, 128, 256]
    assert graph.mode_for("capture", graph.MIN_GRAPH_STEPS - 1) == "off"
    assert graph.mode_for("capture", graph.MIN_GRAPH_STEPS) == "capture"
    assert graph.mode_for("eager", 1) == "eager"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_replay_equals_the_uncaptured_static_step(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = TorchEngine(
        [builtin_tiny_spec()], device="cuda", cache_dir=cache_dir, config=EngineConfig(decode_graphs="on")
    )
    a = _trained_adapter(engine, "graph:cuda:a", 3, tmp_path / "a")
    b = _trained_adapter(engine, "graph:cuda:b", 4, tmp_path / "b")
    ops = [*OPS, _op(PROMPTS[1], n=3, max_tokens=40, seed=6, stop_tokens=(7,)), _op(PROMPTS[0], max_tokens=33, seed=8)]
    adapters = [a if i % 2 else b for i in range(len(ops))]
    graphs: list[bool] = []
    captured = graph.StaticRun._captured

    def spy(self: graph.StaticRun) -> torch.cuda.CUDAGraph | None:
        out = captured(self)
        graphs.append(out is not None)
        return out

    monkeypatch.setattr(graph.StaticRun, "_captured", spy)
    replayed = _many(engine, ops, adapters)
    assert graphs and all(graphs)  # captured (at least once), and no capture fell back
    monkeypatch.setattr(graph, "mode_for", lambda mode, budget: "eager")
    graphs.clear()
    eager = _many(engine, ops, adapters)
    assert graphs == []
    for x, y in zip(replayed, eager, strict=True):
        _same(x, y, tol=1e-3)
