"""forward_backward split into micro-batches by a token budget (workers/engine/microbatch.py): the
same loss, outputs, metrics and gradients as one pass for every loss; outputs in the op's order;
out-of-memory errors retried at half the budget; activation checkpointing changes nothing but
memory."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from app.domain.models import builtin_tiny_spec
from app.domain.ops import AdamParams, Datum, ForwardBackwardOp, OptimStepOp
from app.domain.results import ForwardBackwardResult
from app.domain.tensors import Array
from tests.engine.helpers import DEVICE, ON_GPU, TINY, datum, fb, lora, same_grads
from workers.engine import EngineConfig, OutOfMemory, TorchEngine
from workers.engine import microbatch as mb
from workers.engine.memory import FIXED_RESERVE_BYTES, MEMORY_FRACTION, token_costs

# Lengths (positions) 11, 3, 9, 6, 11, 4, 7: unsorted, with ties, so packing reorders them.
SEQS = [
    [101, 57, 12, 7, 102, 55, 66, 9, 31, 8, 44, 5],
    [3, 1000, 151_000, 42],
    [17, 18, 19, 20, 21, 22, 23, 24, 25, 26],
    [900, 800, 700, 600, 500, 400, 300],
    [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
    [77, 66, 55, 44, 33],
    [1, 2, 3, 4, 5, 6, 7, 8],
]
SPLIT_BUDGET = 16  # padded tokens: forces 6 micro-batches on SEQS
CONFIGS: dict[str, dict[str, float | str]] = {
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1},
    "cispo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.15},
    "dro": {"beta": 0.5},
    "gspo": {"clip_low_threshold": 0.95, "clip_high_threshold": 1.05},
}
# Tolerances on the CPU in float32 (GPU: bf16). Loss and metrics: relative. Logprobs: as the other
# engine tests. Gradients: relative to each tensor's norm. A micro-batch of one row takes other
# kernels than a padded batch (another summation order over tokens), and with mixed-sign weights and
# advantages the per-token contributions cancel, so the gradients' measured floor is ~3e-5 (the
# same for separate calls versus one call with the code before micro-batching); a lost, doubled or
# misplaced datum is off by far more than 1e-4.
REL = 1e-2 if ON_GPU else 1e-6
LOGPROB_TOL = 0.1 if ON_GPU else 1e-5
GRAD_REL = 1e-2 if ON_GPU else 1e-4


def _engine(cache_dir: Path, **config: object) -> TorchEngine:
    return TorchEngine([builtin_tiny_spec()], device=DEVICE, cache_dir=cache_dir, config=EngineConfig(**config))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def one_pass(cache_dir: Path) -> TorchEngine:
    return _engine(cache_dir, micro_batch_tokens=10**6)


@pytest.fixture(scope="module")
def split(cache_dir: Path) -> TorchEngine:
    return _engine(cache_dir, micro_batch_tokens=SPLIT_BUDGET)


def _trained_run(engine: TorchEngine, run: str) -> None:
    """A run after one update, so LoRA B is non-zero and every parameter gets a gradient; then one
    forward_backward whose gradient stays pending, so accumulation onto it is checked too."""
    engine.create_run(run, TINY, lora(seed=7))
    engine.forward_backward(run, fb(datum([5, 6, 7, 8, 9])))
    engine.optim_step(run, OptimStepOp(adam=AdamParams(learning_rate=1e-2)))
    engine.forward_backward(run, fb(datum([40, 41, 42, 43])))


def _logprobs(result: ForwardBackwardResult) -> list[torch.Tensor]:
    return [torch.tensor(out["logprobs"].tolist()) for out in result.outputs]


def _op(engine: TorchEngine, run: str, loss_fn: str, forward_only: bool = False) -> ForwardBackwardOp:
    """SEQS under `loss_fn`, with sampler logprobs near the model's own (ratios near 1, some
    clipped) and mixed-sign advantages; cross_entropy gets negative weights too (what
    forward_backward_custom sends)."""
    gen = torch.Generator().manual_seed(3)
    data: list[Datum] = []
    lps = _logprobs(engine.forward_backward(run, fb(*(datum(s) for s in SEQS), forward_only=True)))
    for seq, lp in zip(SEQS, lps, strict=True):
        n = lp.shape[0]
        noise = torch.randn(n, generator=gen)
        inputs = {"target_tokens": Array.from_list(list(seq[1:]), "int64")}
        if loss_fn == "cross_entropy":
            inputs["weights"] = Array.from_list(noise.tolist(), "float32")
        else:
            adv = torch.randn(n, generator=gen)
            adv[0] = 0.0  # a "prompt" token
            inputs["logprobs"] = Array.from_list((lp + 0.1 * noise).tolist(), "float32")
            inputs["advantages"] = Array.from_list(adv.tolist(), "float32")
        data.append(Datum(tokens=tuple(seq[:-1]), loss_fn_inputs=inputs))
    return ForwardBackwardOp(
        data=tuple(data), loss_fn=loss_fn, loss_fn_config=dict(CONFIGS[loss_fn]), forward_only=forward_only
    )


def assert_same_result(got: ForwardBackwardResult, want: ForwardBackwardResult) -> None:
    assert got.metrics.keys() == want.metrics.keys()
    for key, value in want.metrics.items():
        assert got.metrics[key] == pytest.approx(value, rel=REL, abs=REL), key
    got_lp, want_lp = _logprobs(got), _logprobs(want)
    assert [lp.shape for lp in got_lp] == [lp.shape for lp in want_lp]
    for a, b in zip(got_lp, want_lp, strict=True):
        torch.testing.assert_close(a, b, rtol=LOGPROB_TOL, atol=LOGPROB_TOL)


def assert_same_grads(got: dict[str, torch.Tensor | None], want: dict[str, torch.Tensor | None]) -> None:
    assert got.keys() == want.keys()
    for key, g in want.items():
        h = got[key]
        assert g is not None and h is not None, key
        assert float(g.norm()) > 0, key
        assert float((h - g).norm()) <= GRAD_REL * float(g.norm()), key


@pytest.mark.parametrize("loss_fn", sorted(CONFIGS))
def test_split_batch_equals_one_pass(one_pass: TorchEngine, split: TorchEngine, loss_fn: str) -> None:
    run = f"split:{loss_fn}"
    for engine in (one_pass, split):
        _trained_run(engine, run)
    op = _op(one_pass, run, loss_fn)
    want = one_pass.forward_backward(run, op)
    assert one_pass.micro_batch_report(TINY) == mb.Report(10**6, False, 1, 0)
    got = split.forward_backward(run, op)
    report = split.micro_batch_report(TINY)
    assert report is not None and report.micro_batches >= 3
    assert_same_result(got, want)
    assert_same_grads(split.adapter_grads(run), one_pass.adapter_grads(run))
    # And the next update lands in the same place.
    for engine in (one_pass, split):
        engine.optim_step(run, OptimStepOp(adam=AdamParams(learning_rate=1e-3)))
    assert_same_grads(split.adapter_state(run), one_pass.adapter_state(run))


def test_forward_only_split_equals_one_pass(one_pass: TorchEngine, split: TorchEngine) -> None:
    for engine in (one_pass, split):
        _trained_run(engine, "split:forward")
    op = _op(one_pass, "split:forward", "ppo", forward_only=True)
    want = one_pass.forward_backward("split:forward", op)
    got = split.forward_backward("split:forward", op)
    assert_same_result(got, want)


def test_outputs_come_back_in_the_ops_order(split: TorchEngine) -> None:
    split.create_run("order", TINY, lora(seed=1))
    result = split.forward_backward("order", fb(*(datum(s) for s in SEQS), forward_only=True))
    assert [out["logprobs"].shape for out in result.outputs] == [(len(s) - 1,) for s in SEQS]
    for seq, lp in zip(SEQS, _logprobs(result), strict=True):
        (alone,) = _logprobs(split.forward_backward("order", fb(datum(seq), forward_only=True)))
        torch.testing.assert_close(lp, alone, rtol=LOGPROB_TOL, atol=LOGPROB_TOL)


def test_plan_packs_by_length_within_the_budget() -> None:
    lengths = [len(s) - 1 for s in SEQS]
    groups = mb.plan(lengths, SPLIT_BUDGET)
    assert sorted(i for g in groups for i in g) == list(range(len(SEQS)))
    flat = [lengths[i] for g in groups for i in g]
    assert flat == sorted(flat, reverse=True)  # longest first: similar lengths share a micro-batch
    for g in groups:
        assert len(g) == 1 or len(g) * lengths[g[0]] <= SPLIT_BUDGET
    assert groups == [[0], [4], [2], [6, 3], [5, 1]]
    assert mb.plan(lengths, 1) == [[0], [4], [2], [6], [3], [5], [1]]  # never cut below one sequence
    assert mb.plan(lengths, 10**6) == [[0, 4, 2, 6, 3, 5, 1]]


# -- out of memory --------------------------------------------------------------------------


@pytest.fixture
def fake_oom(one_pass: TorchEngine) -> Iterator[dict[str, int]]:
    """torch.OutOfMemoryError from the decoder on any micro-batch above `limit` padded tokens: in
    its forward, or (with `backward_after` set) in the backward of the micro-batch numbered
    `backward_after`, after earlier micro-batches' gradients were accumulated."""
    one_pass.create_run("oom:probe", TINY, lora())  # loads the model
    decoder = one_pass._slots[TINY].loaded.model.get_decoder()
    state = {"limit": 10**9, "backward_after": -1, "seen": 0, "tokens": 0, "raised": 0}

    def forward(_: torch.nn.Module, args: tuple[object, ...], kwargs: dict[str, torch.Tensor]) -> None:
        ids = kwargs.get("input_ids")
        state["tokens"] = int(ids.numel()) if ids is not None else 0
        state["seen"] += 1
        if state["backward_after"] < 0 and state["tokens"] > state["limit"]:
            state["raised"] += 1
            raise torch.OutOfMemoryError(f"fake: {state['tokens']} tokens")

    def backward(grad: torch.Tensor) -> None:
        if state["seen"] == state["backward_after"] and state["tokens"] > state["limit"]:
            state["raised"] += 1
            raise torch.OutOfMemoryError("fake, in backward")

    def first_layer(_: torch.nn.Module, args: object, output: torch.Tensor | tuple[torch.Tensor, ...]) -> None:
        # Its gradient is computed after every later layer's LoRA gradients were accumulated.
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.requires_grad:
            hidden.register_hook(backward)

    handles = [
        decoder.register_forward_pre_hook(forward, with_kwargs=True),
        decoder.layers[0].register_forward_hook(first_layer),
    ]
    yield state
    for h in handles:
        h.remove()


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_oom_halves_the_budget_and_gives_the_same_result(
    one_pass: TorchEngine,
    cache_dir: Path,
    fake_oom: dict[str, int],
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    run = f"oom:{where}"
    _trained_run(one_pass, run)
    op = _op(one_pass, run, "ppo")
    batcher = one_pass._slots[TINY].batcher
    batcher.caps.clear()
    fake_oom.update(limit=20, seen=0)
    # Checkpointing off: on a GPU, "auto" would take the tiny learned cap as a sign that only
    # checkpointing fits and switch to it, whose budget the fake limit knows nothing about.
    monkeypatch.setattr(batcher, "config", replace(batcher.config, activation_checkpointing="off"))
    if where == "backward":
        # Micro-batches of 22, 18 and 18 tokens; the second fails in its backward, once the first
        # one's gradients and part of its own are in.
        monkeypatch.setattr(batcher, "config", EngineConfig(micro_batch_tokens=24, activation_checkpointing="off"))
        fake_oom.update(limit=10, backward_after=2)
    result = one_pass.forward_backward(run, op)
    report = one_pass.micro_batch_report(TINY)
    assert report is not None and fake_oom["raised"] >= 1 and report.oom_retries >= 1
    assert report.budget_tokens <= 20 and report.micro_batches >= 3
    # Exactly what a clean run at the budget that worked gives, pending gradients included...
    clean = _engine(cache_dir, micro_batch_tokens=report.budget_tokens)
    _trained_run(clean, run)
    want = clean.forward_backward(run, op)
    assert result == want
    assert same_grads(one_pass.adapter_grads(run), clean.adapter_grads(run))
    # ...and what one pass gives, within float rounding.
    reference = _engine(cache_dir, micro_batch_tokens=10**6)
    _trained_run(reference, run)
    assert_same_result(result, reference.forward_backward(run, op))
    assert_same_grads(one_pass.adapter_grads(run), reference.adapter_grads(run))
    # The budget that worked is remembered: the next op starts there.
    raised = fake_oom["raised"]
    one_pass.forward_backward(run, op)
    assert fake_oom["raised"] == raised
    assert one_pass.micro_batch_report(TINY) == replace(report, oom_retries=0)
    batcher.caps.clear()


def test_a_sequence_too_long_even_alone_fails_clearly(one_pass: TorchEngine, fake_oom: dict[str, int]) -> None:
    run = "oom:alone"
    _trained_run(one_pass, run)
    digest, grads = one_pass.state_digest(run), one_pass.adapter_grads(run)
    fake_oom.update(limit=8)
    with pytest.raises(OutOfMemory, match=r"datum 1 \(11 tokens\) does not fit in \w+ memory even alone"):
        one_pass.forward_backward(run, fb(datum(SEQS[1]), datum(SEQS[0]), datum(SEQS[5])))
    assert one_pass.state_digest(run) == digest
    assert same_grads(grads, one_pass.adapter_grads(run))
    one_pass._slots[TINY].batcher.caps.clear()


# -- activation checkpointing ---------------------------------------------------------------


def test_activation_checkpointing_recomputes_and_changes_nothing(
    one_pass: TorchEngine, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = _engine(cache_dir, micro_batch_tokens=10**6, activation_checkpointing="on")
    for engine in (one_pass, ckpt):
        _trained_run(engine, "ckpt")
    op = _op(one_pass, "ckpt", "cross_entropy")
    want = one_pass.forward_backward("ckpt", op)
    model = ckpt._slots[TINY].loaded.model
    layers = model.get_decoder().layers
    calls = [0]
    for layer in layers:
        # Counted on the module's own forward: torch runs no module hooks while it recomputes.
        act = layer.mlp.act_fn

        def counted(x: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor] = act.forward) -> torch.Tensor:
            calls[0] += 1
            return forward(x)

        monkeypatch.setattr(act, "forward", counted)
    got = ckpt.forward_backward("ckpt", op)
    assert calls[0] == 2 * len(layers)  # every layer ran again during backward
    report = ckpt.micro_batch_report(TINY)
    assert report is not None and report.checkpointing
    calls[0] = 0
    ckpt.forward_backward("ckpt", op.model_copy(update={"forward_only": True}))
    assert calls[0] == len(layers)
    assert_same_result(got, want)
    assert_same_grads(ckpt.adapter_grads("ckpt"), one_pass.adapter_grads("ckpt"))
    # Off again after the op, and the layers back in eval mode.
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert not any(m.training for m in (model, model.get_decoder(), *layers))


def test_auto_policy_on_a_device(one_pass: TorchEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA's auto budget and checkpointing, with the device's free memory faked (no GPU here)."""
    one_pass.create_run("auto", TINY, lora())  # loads the model
    model = one_pass._slots[TINY].loaded.model
    costs = token_costs(model)
    assert costs.forward < costs.checkpointed < costs.full
    batcher = mb.MicroBatcher(model, torch.device("cuda"), EngineConfig())
    free = {"bytes": 0}
    monkeypatch.setattr(mb, "free_bytes", lambda device: free["bytes"])
    monkeypatch.setattr(mb, "activation_checkpointing", lambda model, on: _Flag(seen, on))
    seen: list[bool] = []

    def fits(tokens: int, per_token: int) -> int:
        return int((tokens * per_token + FIXED_RESERVE_BYTES) / MEMORY_FRACTION) + 1

    free["bytes"] = fits(100_000, costs.full)  # plenty: no checkpointing
    report = batcher.run([4000, 3000], lambda group: None, forward_only=False)
    assert report == mb.Report(100_000, False, 1, 0) and seen == [False]
    free["bytes"] = fits(1000, costs.full)  # tiny without it: checkpointing, and a budget to match
    report = batcher.run([4000, 3000], lambda group: None, forward_only=False)
    assert report.checkpointing and report.budget_tokens >= 1000 * costs.full // costs.checkpointed
    # A sequence that does not fit without checkpointing is retried with it, and remembered.
    free["bytes"] = fits(100_000, costs.full)
    seen.clear()

    def step(group: Sequence[int]) -> None:
        if not seen[-1]:
            raise torch.OutOfMemoryError("fake")

    report = batcher.run([5000], step, forward_only=False)
    assert seen == [False, True] and report.checkpointing and report.oom_retries == 1
    seen.clear()
    assert batcher.run([6000], lambda group: None, forward_only=False).checkpointing and seen == [True]


class _Flag:
    def __init__(self, seen: list[bool], on: bool) -> None:
        seen.append(on)

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_engine_config_is_validated() -> None:
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        EngineConfig(micro_batch_tokens=0)
    with pytest.raises(ValueError, match="activation_checkpointing"):
        EngineConfig(activation_checkpointing="sometimes")  # type: ignore[arg-type]
