"""The data-parallel engine (workers/engine/data_parallel.py) on 2 CPU processes with gloo: every
verb gives what one process gives, and a rank that dies fails the next call instead of hanging.

One process group serves the whole module (spawning a rank costs seconds of imports): this test
process is rank 0, and a plain TorchEngine beside it is the single-process reference. Each test
uses its own run ids; the test that kills rank 1 runs last.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest
import torch

from app.domain.models import builtin_tiny_spec
from app.domain.ops import AdamParams, Datum, ForwardBackwardOp, OptimStepOp
from app.domain.results import ForwardBackwardResult
from app.domain.tensors import Array
from tests.engine.helpers import ON_GPU, TINY, datum, fb, lora
from workers.engine import DeviceFatal, OpInputError, TorchEngine
from workers.engine.data_parallel import DataParallelEngine, EngineArgs, balance, launch

pytestmark = pytest.mark.skipif(ON_GPU, reason="the gloo path is tested on the CPU; GPUs need NCCL and several cards")

SEQS = [[101, 57, 12, 7, 102, 55, 66], [3, 1000, 151_000, 42], [9, 10, 11, 12, 13], [5, 6], [77, 78, 79, 80, 81, 82]]
# No LoRA on the 151k-row unembedding: the tests stay fast and the ranks' arithmetic is the same.
LORA = lora(seed=3, train_unembed=False)
STEP = OptimStepOp(adam=AdamParams(learning_rate=1e-2, grad_clip_norm=1.0))


@pytest.fixture(scope="module")
def ranks(cache_dir: Path) -> Iterator[tuple[DataParallelEngine, TorchEngine]]:
    dp = launch(EngineArgs([builtin_tiny_spec()], cache_dir=cache_dir), world=2, timeout_s=60)
    try:
        yield dp, TorchEngine([builtin_tiny_spec()], cache_dir=cache_dir)
    finally:
        dp.close(timeout_s=10)


def rl_datum(seq: Sequence[int], seed: int) -> Datum:
    g = torch.Generator().manual_seed(seed)
    n = len(seq) - 1
    return Datum(
        tokens=tuple(seq[:-1]),
        loss_fn_inputs={
            "target_tokens": Array.from_list(list(seq[1:]), "int64"),
            "logprobs": Array.from_list((-torch.rand(n, generator=g) * 5 - 8).tolist(), "float32"),
            "advantages": Array.from_list(torch.randn(n, generator=g).tolist(), "float32"),
        },
    )


def grad_gap(a: Mapping[str, torch.Tensor | None], b: Mapping[str, torch.Tensor | None]) -> float:
    """|a - b| / |b| over all parameters (both must have a gradient exactly where the other has)."""
    assert a.keys() == b.keys() and all((a[k] is None) == (b[k] is None) for k in a)
    pairs = [(ga, gb) for k, ga in a.items() if ga is not None and (gb := b[k]) is not None]
    diff = math.fsum(float(((ga - gb) ** 2).sum()) for ga, gb in pairs)
    norm = math.fsum(float((gb**2).sum()) for _, gb in pairs)
    return math.sqrt(diff / norm)


def assert_same_result(got: ForwardBackwardResult, want: ForwardBackwardResult, rel: float = 1e-6) -> None:
    assert got.metrics.keys() == want.metrics.keys()
    for key, value in want.metrics.items():
        assert got.metrics[key] == pytest.approx(value, rel=rel, abs=1e-7), key
    assert len(got.outputs) == len(want.outputs)
    for g, w in zip(got.outputs, want.outputs, strict=True):
        assert g["logprobs"].shape == w["logprobs"].shape
        lp_g, lp_w = (torch.tensor(x["logprobs"].tolist()) for x in (g, w))
        torch.testing.assert_close(lp_g, lp_w, rtol=rel, atol=1e-6)


def both(ranks: tuple[DataParallelEngine, TorchEngine], run: str, op: ForwardBackwardOp, budget: int | None) -> None:
    dp, ref = ranks
    for engine in ranks:
        engine.create_run(run, TINY, LORA)
    got, want = dp.forward_backward(run, op, budget), ref.forward_backward(run, op, budget)
    assert_same_result(got, want)


def test_balance_splits_by_tokens_and_keeps_op_order() -> None:
    shares = balance([7, 4, 5, 2, 6], 2)
    # Longest first, each to the lighter rank: 7 -> r0, 6 -> r1, 5 -> r1, 4 -> r0, 2 -> r0 (a tie).
    assert shares == [[0, 1, 3], [2, 4]]
    assert sorted(i for s in shares for i in s) == list(range(5))
    assert balance([3], 2) == [[0], []]
    assert balance([5, 5, 5, 5], 4) == [[0], [1], [2], [3]]


@pytest.mark.parametrize("loss_fn", ["cross_entropy", "ppo"])
def test_forward_backward_and_step_equal_one_process(
    ranks: tuple[DataParallelEngine, TorchEngine], loss_fn: str
) -> None:
    """Budget 1: every datum is its own micro-batch on either side, so each datum's arithmetic is
    the same and only the order the gradients are summed in differs."""
    dp, ref = ranks
    run = f"dp:{loss_fn}"
    data = [datum(s) for s in SEQS] if loss_fn == "cross_entropy" else [rl_datum(s, i) for i, s in enumerate(SEQS)]
    op = ForwardBackwardOp(data=tuple(data), loss_fn=loss_fn)
    both(ranks, run, op, budget=1)
    assert grad_gap(dp.adapter_grads(run), ref.adapter_grads(run)) < 1e-6
    assert dp.micro_batch_tokens(run) == 1
    got, want = dp.optim_step(run, STEP), ref.optim_step(run, STEP)
    assert got.metrics["grad_norm"] == pytest.approx(want.metrics["grad_norm"], rel=1e-6)
    assert got.metrics["optimizer_step"] == 1.0
    # Rank 0's weights equal the reference's. AdamW's first step is lr * g / (|g| + eps): a component
    # whose gradient is near eps moves by a visible fraction of lr for a rounding-level difference
    # in g (1.3e-3 lr seen), while a wrong gradient moves components by whole multiples of lr. Rank
    # 1's weights equal rank 0's: its next share, computed with its own copy, gives what one
    # process gives.
    w_dp, w_ref = dp.adapter_state(run), ref.adapter_state(run)
    for key, value in w_ref.items():
        torch.testing.assert_close(w_dp[key], value, rtol=0, atol=5e-3 * STEP.adam.learning_rate)
    assert not dp.pending_gradients(run)
    check = ForwardBackwardOp(data=tuple(reversed(data)), loss_fn=loss_fn, forward_only=True)
    assert_same_result(dp.forward_backward(run, check, 1), ref.forward_backward(run, check, 1), rel=1e-5)


def test_default_budget_and_accumulation(ranks: tuple[DataParallelEngine, TorchEngine]) -> None:
    """Under the default budget the ranks' micro-batches differ from one process's, which moves
    float32 gradients by ~2e-5 of their norm on the tiny model: as much as one process differs
    from itself under two budgets (measured with the unembedding adapter on: 2.0e-5)."""
    dp, ref = ranks
    op1, op2 = fb(*(datum(s) for s in SEQS[:3])), fb(*(datum(s) for s in SEQS[3:]))
    both(ranks, "dp:acc", op1, None)
    for engine in ranks:
        engine.forward_backward("dp:acc", op2)
    assert grad_gap(dp.adapter_grads("dp:acc"), ref.adapter_grads("dp:acc")) < 1e-4


def test_one_datum_leaves_a_rank_idle(ranks: tuple[DataParallelEngine, TorchEngine]) -> None:
    dp, ref = ranks
    both(ranks, "dp:one", fb(datum(SEQS[0])), None)
    assert grad_gap(dp.adapter_grads("dp:one"), ref.adapter_grads("dp:one")) < 1e-6
    dp.optim_step("dp:one", STEP)
    ref.optim_step("dp:one", STEP)
    # Rank 1 took no datum yet stepped with the summed gradient: a two-datum op (one each) agrees.
    op = fb(datum(SEQS[1]), datum(SEQS[2]), forward_only=True)
    assert_same_result(dp.forward_backward("dp:one", op, 1), ref.forward_backward("dp:one", op, 1), rel=1e-5)


def test_invalid_op_fails_on_every_rank_and_changes_nothing(ranks: tuple[DataParallelEngine, TorchEngine]) -> None:
    dp, ref = ranks
    both(ranks, "dp:bad", fb(datum(SEQS[0]), datum(SEQS[1])), 1)
    before = dp.adapter_grads("dp:bad")
    with pytest.raises(OpInputError, match="datum 1: target_tokens"):
        dp.forward_backward("dp:bad", fb(datum(SEQS[2]), datum([1, 2, 10**9]), datum(SEQS[3])))
    after = dp.adapter_grads("dp:bad")
    assert all(torch.equal(g, after[k]) for k, g in before.items() if g is not None)
    assert all(g is not None for g in before.values())
    with pytest.raises(OpInputError, match="learning_rate"):
        dp.optim_step("dp:bad", OptimStepOp(adam=AdamParams(learning_rate=-1.0)))
    # The ranks are still in step: a forward_backward and a step agree with one process.
    op = fb(datum(SEQS[4]), datum(SEQS[3]))
    assert_same_result(dp.forward_backward("dp:bad", op, 1), ref.forward_backward("dp:bad", op, 1))
    assert dp.optim_step("dp:bad", STEP).metrics["grad_norm"] == pytest.approx(
        ref.optim_step("dp:bad", STEP).metrics["grad_norm"], rel=1e-6
    )
    dp.drop_run("dp:bad")
    assert not dp.has_run("dp:bad")
    with pytest.raises(KeyError):
        dp.forward_backward("dp:bad", op)


def test_checkpoint_round_trip_reaches_every_rank(
    ranks: tuple[DataParallelEngine, TorchEngine], tmp_path: Path
) -> None:
    dp, ref = ranks
    both(ranks, "dp:ckpt", fb(datum(SEQS[0]), datum(SEQS[2])), 1)
    dp.optim_step("dp:ckpt", STEP)
    dp.save_run("dp:ckpt", tmp_path / "ckpt", with_optimizer=True)
    dp.drop_run("dp:ckpt")
    dp.create_run("dp:ckpt", TINY, LORA)
    dp.load_run("dp:ckpt", tmp_path / "ckpt", with_optimizer=True)
    ref.load_run("dp:ckpt", tmp_path / "ckpt", with_optimizer=True)
    assert dp.state_digest("dp:ckpt") == ref.state_digest("dp:ckpt")
    op = fb(datum(SEQS[1]), datum(SEQS[4]))
    assert_same_result(dp.forward_backward("dp:ckpt", op, 1), ref.forward_backward("dp:ckpt", op, 1))


def test_a_dead_rank_fails_the_next_call_loudly(ranks: tuple[DataParallelEngine, TorchEngine]) -> None:
    """Last in the module: it breaks the process group for good."""
    dp, _ = ranks
    dp.create_run("dp:dead", TINY, LORA)
    pid = dp.pids[0]
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    started = time.monotonic()
    with pytest.raises(DeviceFatal, match="rank 1"):
        dp.forward_backward("dp:dead", fb(datum(SEQS[0]), datum(SEQS[1])))
    with pytest.raises(DeviceFatal):
        dp.optim_step("dp:dead", STEP)
    assert time.monotonic() - started < 10
