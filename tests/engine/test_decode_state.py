"""The static decode step's buffers and steps kept across sample calls (decode_state.py), on the
real tiny model. On the CPU the step runs uncaptured, but over the same kept buffers and the same
step keys a CUDA graph would be captured for; the last test replays real graphs and runs only where
CUDA is available."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from app.domain.models import builtin_tiny_spec
from app.domain.ops import SampleOp
from app.domain.results import SampleResult
from tests.engine.helpers import DEVICE, TINY, lora
from tests.engine.test_batched_sampling import PROMPTS, _op, _tokens, _trained_adapter
from tests.engine.test_decode_graph import OPS, _many, _same
from workers.engine import EngineConfig, TorchEngine
from workers.engine import decode_graph as graph
from workers.engine import sampler as sampler_module
from workers.engine.decode_state import Arena, DecodeStates, StepKey, filter_width
from workers.engine.sampling import sample as reference_sample


def _engine(cache_dir: Path, device: str = DEVICE, **config: object) -> TorchEngine:
    return TorchEngine(
        [builtin_tiny_spec()],
        device=device,
        cache_dir=cache_dir,
        config=EngineConfig(**{"decode_graphs": "on", **config}),  # type: ignore[arg-type]
    )


def _states(engine: TorchEngine) -> DecodeStates:
    return engine._slots[TINY].decode


def _exact(a: Sequence[SampleResult], b: Sequence[SampleResult]) -> None:
    """Bit for bit: tokens, logprobs, stop reasons and top-k tables."""
    for x, y in zip(a, b, strict=True):
        assert x.sequences == y.sequences


@pytest.fixture(scope="module")
def dynamic(cache_dir: Path) -> TorchEngine:
    return _engine(cache_dir, decode_graphs="off")


def test_buffers_and_steps_are_built_once_for_calls_of_one_shape(cache_dir: Path, dynamic: TorchEngine) -> None:
    engine = _engine(cache_dir)
    first = _many(engine, OPS)  # greedy and seeded rows, top-k / top-p filters, top-k logprobs
    states = _states(engine)
    assert states.allocations == 1 and states.private == 0
    keys, builds = list(states.graphs), states.builds
    assert builds == len(keys) == 1  # 8 rows, one bucket: one step shape
    for _ in range(3):
        _exact(_many(engine, OPS), first)
    assert (states.allocations, states.builds, list(states.graphs)) == (1, builds, keys)
    # The same tokens as decode.py's own step, and bit for bit those of buffers used only once.
    for got, want in zip(first, _many(dynamic, OPS), strict=True):
        _same(got, want)
    _exact(first, _many(_engine(cache_dir, decode_cache_bytes=0), OPS))


def test_smaller_batches_run_in_views_of_the_kept_buffers(cache_dir: Path) -> None:
    engine = _engine(cache_dir)
    batch = _many(engine, OPS)
    states = _states(engine)
    # Alone, each request runs at bucket 1 or 2 (num_samples), over slots a larger batch wrote:
    # the same seed gives the same tokens alone or batched, whatever the buffers held before.
    alone = [_many(engine, [op])[0] for op in OPS]
    for got, want in zip(alone, batch, strict=True):
        _same(got, want)
    assert states.allocations == 1
    assert {key.rows for key in states.graphs} == {8, 1, 2, 4}  # n=3 pads to 4
    # Greedy decoding equals the reference loop (sampling.sample) after all that reuse.
    slot = engine._slots[TINY]
    greedy = _op(PROMPTS[1], n=2, max_tokens=10, temperature=0)
    got = _many(engine, [greedy])[0]
    slot.host.activate(None)
    assert _tokens(got) == _tokens(reference_sample(slot.loaded, greedy, 10))
    builds = states.builds
    _exact(_many(engine, OPS), batch)
    assert states.builds == builds  # the batch's step was kept


def test_a_larger_call_grows_the_buffers_once_and_forgets_the_old_steps(cache_dir: Path) -> None:
    engine = _engine(cache_dir)
    small = _many(engine, [OPS[1]])
    states = _states(engine)
    assert states.allocations == 1
    long = _op(PROMPTS[0], n=2, max_tokens=125, seed=11, topk_sample_logprobs=4)  # 129 slots: capacity 256
    got = _many(engine, [long])[0]
    assert states.allocations == 2
    assert states.arena is not None and (states.arena.dims.capacity, states.arena.dims.topk) == (256, 4)
    assert all(key.capacity == 256 for key in states.graphs)  # steps over the old buffers are gone
    _same(got, _many(_engine(cache_dir, decode_graphs="off"), [long])[0])
    _exact(_many(engine, [OPS[1]]), small)  # a smaller shape fits the grown buffers
    assert states.allocations == 2


def test_buffers_over_the_limit_are_private_to_the_call(cache_dir: Path) -> None:
    engine = _engine(cache_dir, decode_cache_bytes=1)
    first = _many(engine, OPS)
    _exact(_many(engine, OPS), first)
    states = _states(engine)
    assert (states.allocations, states.private, states.arena, len(states.graphs)) == (0, 2, None, 0)


def test_free_memory_and_unloading_release_the_buffers(cache_dir: Path) -> None:
    engine = _engine(cache_dir)
    engine.create_run("state:keep", TINY, lora())  # a model with a run stays loaded through free_memory
    first = _many(engine, OPS)
    states = _states(engine)
    engine.free_memory()
    assert states.arena is None and not states.graphs
    _exact(_many(engine, OPS), first)
    assert states.allocations == 2
    engine.drop_run("state:keep")
    assert engine.unload_idle_models(0) == [TINY]  # the slot goes, with its decode states


def test_steps_are_keyed_by_adapter_layout_and_dropped_with_the_adapter(
    cache_dir: Path, dynamic: TorchEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = _trained_adapter(dynamic, "state:a", 3, tmp_path / "a")
    b = _trained_adapter(dynamic, "state:b", 4, tmp_path / "b")
    c = _trained_adapter(dynamic, "state:c", 5, tmp_path / "c")
    engine = _engine(cache_dir)
    ops = [_op(PROMPTS[i % 4], n=1 + i % 2, max_tokens=5 + i, seed=i) for i in range(4)]
    routed = _many(engine, ops, [a, b, a, b])
    states = _states(engine)
    layouts = {key.adapters[0] for key in states.graphs}
    assert layouts == {"routed"}
    one_a = _many(engine, ops[:1], [a])[0]
    base = _many(engine, ops[:1])[0]
    assert {key.adapters[0] for key in states.graphs} == {"routed", "one", "base"}
    # Each layout got its own step: the adapters change the logprobs of the same seeded request.
    assert one_a.sequences[0].logprobs != base.sequences[0].logprobs
    _same(one_a, routed[0])
    # Loading a third sampler adapter evicts the least recently used one (a): every step that
    # reads a's weights goes with it, and a loaded again gets steps of its own.
    monkeypatch.setattr(sampler_module, "SAMPLER_ADAPTER_CACHE", 2)
    _many(engine, ops[:1], [c])
    slot = engine._slots[TINY]
    assert len(slot.samplers) == 2
    names = set().union(*(key.names() for key in states.graphs))
    assert names == set(slot.samplers.values())
    assert {key.adapters[0] for key in states.graphs} == {"one", "base"}
    again = _many(engine, ops, [a, b, a, b])
    for got, want in zip(again, routed, strict=True):
        _same(got, want)


class _Reads(TorchDispatchMode):
    """The storages a block reads that no op of the block produced: what a CUDA graph captured
    from it would read from outside itself, at these addresses, on every replay."""

    def __init__(self) -> None:
        super().__init__()
        self.outside: set[int] = set()
        self._made: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_flatten((args, kwargs or {}))[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self._made:
                self.outside.add(t.untyped_storage().data_ptr())
        out = func(*args, **(kwargs or {}))
        self._made |= {t.untyped_storage().data_ptr() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)}
        return out


def _arena_storages(arena: Arena) -> set[int]:
    tensors = [*arena.keys, *arena.values, *(v for v in vars(arena).values() if isinstance(v, torch.Tensor))]
    tensors += [v for v in vars(arena.params).values() if isinstance(v, torch.Tensor)]
    return {t.untyped_storage().data_ptr() for t in tensors}


def test_a_step_reads_only_the_weights_and_the_kept_buffers(
    cache_dir: Path, dynamic: TorchEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What keeps a captured graph valid across calls, checked op by op on the CPU: outside its own
    temporaries a step reads only the model's weights (LoRA included) and the kept buffers, never a
    tensor of the call, so replaying it in a later call reads that call's inputs."""
    reads: dict[StepKey, list[set[int]]] = {}
    step = graph.StaticRun._step

    def spy(self: graph.StaticRun) -> None:
        mode = _Reads()
        with mode:
            step(self)
        reads.setdefault(self.buf.key, []).append(mode.outside)

    monkeypatch.setattr(graph.StaticRun, "_step", spy)
    engine = _engine(cache_dir)
    ops = [*OPS, _op(PROMPTS[1], n=3, max_tokens=20, seed=6)]  # 11 rows: compacts 16 -> 4
    a = _trained_adapter(dynamic, "reads:a", 3, tmp_path / "a")
    b = _trained_adapter(dynamic, "reads:b", 4, tmp_path / "b")
    for _ in range(2):
        _many(engine, ops)
        _many(engine, ops[:4], [a, b, b, a])  # routed through two adapters' LoRA weights
    slot = engine._slots[TINY]
    model = slot.loaded.model
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    assert slot.decode.arena is not None
    allowed = weights | _arena_storages(slot.decode.arena)
    assert {(key.rows, key.adapters[0]) for key in reads} == {(16, "base"), (4, "base"), (8, "routed")}
    for per_step in reads.values():
        assert all(outside <= allowed for outside in per_step)
        assert all(outside == per_step[0] for outside in per_step)  # the same addresses, call after call


def test_the_filter_width_shares_steps_between_nearby_top_k() -> None:
    assert filter_width((100, 100), 100) == 0  # no row filters
    assert [filter_width((k, 100), 100) for k in (1, 3, 5, 20, 64, 65)] == [1, 4, 8, 32, 64, 65]
    key = StepKey(4, 128, 0, 1, 0, False, ("routed", ("s-a", 0, 2), ("s-b", 2, 4)))
    assert key.names() == {"s-a", "s-b"}
    assert StepKey(4, 128, 0, 1, 0, False, ("base",)).names() == set()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_steps_replay_in_later_calls(cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _engine(cache_dir, device="cuda")
    ops: list[SampleOp] = [
        _op(PROMPTS[1], n=3, max_tokens=40, seed=6, stop_tokens=(7,)),
        _op(PROMPTS[0], max_tokens=33, seed=8, temperature=0),
    ]
    captures: list[bool] = []
    captured = graph.StaticRun._captured

    def spy(self: graph.StaticRun) -> torch.cuda.CUDAGraph | None:
        out = captured(self)
        captures.append(out is not None)
        return out

    monkeypatch.setattr(graph.StaticRun, "_captured", spy)
    first = _many(engine, ops)
    assert captures and all(captures)
    captures.clear()
    for _ in range(3):
        _exact(_many(engine, ops), first)
    assert captures == []  # replayed from the first call's graphs
    assert _states(engine).allocations == 1
