"""The base model sharded over 2 CPU processes with FSDP2 and gloo (workers/engine/sharded.py under
the data-parallel engine): each rank holds half of every decoder layer, and every verb gives what
one process gives.

One process group serves the whole module (as in test_data_parallel.py): this test process is
rank 0, a plain TorchEngine beside it the single-process reference. Each test uses its own run
ids; the test that kills rank 1 runs last.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from app.domain.models import builtin_tiny_spec
from app.domain.ops import AdamParams, Datum, ForwardBackwardOp, OptimStepOp, SampleOp
from app.domain.tensors import Array
from tests.engine.helpers import ON_GPU, TINY, datum, fb, lora
from tests.engine.test_data_parallel import SEQS, assert_same_result, grad_gap, rl_datum
from workers.engine import DeviceFatal, EngineConfig, OpInputError, TorchEngine, build_tiny_model, microbatch, sharded
from workers.engine.data_parallel import DataParallelEngine, EngineArgs, launch
from workers.engine.memory import token_costs, tokens_that_fit
from workers.engine.microbatch import MicroBatcher
from workers.engine.sharded import LockstepBatcher, ShardedEngine, gathered_layer_bytes

pytestmark = pytest.mark.skipif(ON_GPU, reason="the gloo path is tested on the CPU; GPUs need NCCL and several cards")

LORA = lora(seed=5, train_unembed=False)
STEP = OptimStepOp(adam=AdamParams(learning_rate=1e-2, grad_clip_norm=1.0))
Ranks = tuple[DataParallelEngine, TorchEngine]


@pytest.fixture(scope="module")
def ranks(cache_dir: Path) -> Iterator[Ranks]:
    dp = launch(EngineArgs([builtin_tiny_spec()], cache_dir=cache_dir, shard=True), world=2, timeout_s=60)
    try:
        yield dp, TorchEngine([builtin_tiny_spec()], cache_dir=cache_dir)
    finally:
        dp.close(timeout_s=10)


def create(ranks: Ranks, run: str) -> None:
    for engine in ranks:
        engine.create_run(run, TINY, LORA)


def assert_same_weights(dp: DataParallelEngine, ref: TorchEngine, run: str, atol: float) -> None:
    w_dp, w_ref = dp.adapter_state(run), ref.adapter_state(run)
    assert w_dp.keys() == w_ref.keys()
    for key, value in w_ref.items():
        torch.testing.assert_close(w_dp[key], value, rtol=0, atol=atol)


def test_each_rank_holds_half_of_every_decoder_layer(ranks: Ranks) -> None:
    dp, _ = ranks
    create(ranks, "fsdp:size")
    assert isinstance(dp.engine, ShardedEngine)
    local, whole = dp.engine.shard_bytes(TINY)
    model = build_tiny_model()
    layers = sum(p.numel() * p.element_size() for p in model.model.layers.parameters())
    everything = sum(p.numel() * p.element_size() for p in dict.fromkeys(model.parameters()))
    assert whole == everything
    # The decoder layers halved; the (tied) embedding and the final norm whole on each rank.
    assert whole - local == layers // 2


def test_the_auto_budget_leaves_room_for_two_gathered_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU (free memory faked here: the CPU has no budget from memory), FSDP's running and
    prefetched layers come out of the memory a sharded model's micro-batches may plan with."""
    model = build_tiny_model()
    layer = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    assert gathered_layer_bytes(model) == layer
    free = 4 * 2**30
    for module in (microbatch, sharded):
        monkeypatch.setattr(module, "free_bytes", lambda device: free)
    plain = MicroBatcher(model, torch.device("cpu"), EngineConfig())
    lockstep = LockstepBatcher(model, torch.device("cpu"), EngineConfig())
    costs = token_costs(model)
    assert plain._budget(False, False) == tokens_that_fit(free, costs.full)
    assert lockstep._budget(False, False) == tokens_that_fit(free - 2 * layer, costs.full)
    assert lockstep._budget(True, False) == tokens_that_fit(free - 2 * layer, costs.forward)


@pytest.mark.parametrize("loss_fn", ["cross_entropy", "ppo"])
def test_training_steps_equal_one_process(ranks: Ranks, loss_fn: str) -> None:
    """Three forward_backward + optim_step rounds. Budget 1: every datum is its own micro-batch on
    either side, so only the order the gradients are summed in differs (as in data parallel)."""
    dp, ref = ranks
    run = f"fsdp:{loss_fn}"
    create(ranks, run)
    data = [datum(s) for s in SEQS] if loss_fn == "cross_entropy" else [rl_datum(s, i) for i, s in enumerate(SEQS)]
    for round_ in range(3):
        op = ForwardBackwardOp(data=tuple(data[round_:] + data[:round_]), loss_fn=loss_fn)
        assert_same_result(dp.forward_backward(run, op, 1), ref.forward_backward(run, op, 1), rel=1e-5)
        assert grad_gap(dp.adapter_grads(run), ref.adapter_grads(run)) < 1e-5
        got, want = dp.optim_step(run, STEP), ref.optim_step(run, STEP)
        assert got.metrics["grad_norm"] == pytest.approx(want.metrics["grad_norm"], rel=1e-5)
        assert got.metrics["optimizer_step"] == round_ + 1
    # AdamW magnifies rounding-level gradient differences in near-zero components (see
    # test_data_parallel): a bound of a few percent of one step's size, three steps in.
    assert_same_weights(dp, ref, run, atol=2e-2 * STEP.adam.learning_rate)
    check = ForwardBackwardOp(data=tuple(reversed(data)), loss_fn=loss_fn, forward_only=True)
    assert_same_result(dp.forward_backward(run, check, 1), ref.forward_backward(run, check, 1), rel=1e-4)


def test_uneven_micro_batches_and_an_idle_rank(ranks: Ranks) -> None:
    """Budget 5 gives rank 0 three micro-batches (6, 3, 1 tokens) and rank 1 two (5, 4): rank 1
    runs an empty pass to keep the all-gathers in step. A one-datum op leaves rank 1 nothing at
    all. The budget every rank used is recorded for a replay."""
    dp, ref = ranks
    create(ranks, "fsdp:uneven")
    op = fb(*(datum(s) for s in SEQS))
    assert_same_result(dp.forward_backward("fsdp:uneven", op, 5), ref.forward_backward("fsdp:uneven", op, 5))
    assert dp.micro_batch_tokens("fsdp:uneven") == 5
    one = fb(datum(SEQS[1]))
    assert_same_result(dp.forward_backward("fsdp:uneven", one), ref.forward_backward("fsdp:uneven", one))
    assert grad_gap(dp.adapter_grads("fsdp:uneven"), ref.adapter_grads("fsdp:uneven")) < 1e-5
    dp.optim_step("fsdp:uneven", STEP)
    ref.optim_step("fsdp:uneven", STEP)
    assert_same_weights(dp, ref, "fsdp:uneven", atol=5e-3 * STEP.adam.learning_rate)


def test_invalid_ops_fail_everywhere_and_the_ranks_stay_in_step(ranks: Ranks) -> None:
    dp, ref = ranks
    create(ranks, "fsdp:bad")
    good = fb(datum(SEQS[0]), datum(SEQS[2]))
    assert_same_result(dp.forward_backward("fsdp:bad", good, 1), ref.forward_backward("fsdp:bad", good, 1))
    before = dp.adapter_grads("fsdp:bad")
    # Refused before any rank enters the sharded pass.
    with pytest.raises(OpInputError, match="datum 1: target_tokens"):
        dp.forward_backward("fsdp:bad", fb(datum(SEQS[2]), datum([1, 2, 10**9]), datum(SEQS[3])))
    # Found inside the pass, on rank 1's share only (an importance ratio overflows on datum 1):
    # raised once both ranks are through, the op's gradients dropped on both.
    n = len(SEQS[1]) - 1
    overflow = Datum(
        tokens=tuple(SEQS[1][:-1]),
        loss_fn_inputs={
            "target_tokens": Array.from_list(list(SEQS[1][1:]), "int64"),
            "logprobs": Array.from_list([-1e4] * n, "float32"),
            "advantages": Array.from_list([1.0] * n, "float32"),
        },
    )
    ok = rl_datum(SEQS[0], 0)
    with pytest.raises(OpInputError, match="datum 1, token 0: the importance_sampling loss is not finite"):
        dp.forward_backward("fsdp:bad", ForwardBackwardOp(data=(ok, overflow), loss_fn="importance_sampling"), 1)
    after = dp.adapter_grads("fsdp:bad")
    assert all(g is not None and torch.equal(g, after[k]) for k, g in before.items())
    op = fb(datum(SEQS[4]), datum(SEQS[3]))
    assert_same_result(dp.forward_backward("fsdp:bad", op, 1), ref.forward_backward("fsdp:bad", op, 1))
    assert dp.optim_step("fsdp:bad", STEP).metrics["grad_norm"] == pytest.approx(
        ref.optim_step("fsdp:bad", STEP).metrics["grad_norm"], rel=1e-5
    )


def test_checkpoint_round_trip(ranks: Ranks, tmp_path: Path) -> None:
    """Saved from rank 0 (its LoRA is whole: FSDP manages only the base), loaded on every rank."""
    dp, ref = ranks
    create(ranks, "fsdp:ckpt")
    dp.forward_backward("fsdp:ckpt", fb(datum(SEQS[0]), datum(SEQS[2])), 1)
    dp.optim_step("fsdp:ckpt", STEP)
    dp.save_run("fsdp:ckpt", tmp_path / "ckpt", with_optimizer=True)
    digest = dp.state_digest("fsdp:ckpt")
    dp.drop_run("fsdp:ckpt")
    dp.create_run("fsdp:ckpt", TINY, LORA)
    dp.load_run("fsdp:ckpt", tmp_path / "ckpt", with_optimizer=True)
    ref.load_run("fsdp:ckpt", tmp_path / "ckpt", with_optimizer=True)
    assert dp.state_digest("fsdp:ckpt") == digest == ref.state_digest("fsdp:ckpt")
    # Rank 1 loaded the same state: the next step agrees with one process.
    op = fb(datum(SEQS[1]), datum(SEQS[4]))
    assert_same_result(dp.forward_backward("fsdp:ckpt", op, 1), ref.forward_backward("fsdp:ckpt", op, 1))
    got, want = dp.optim_step("fsdp:ckpt", STEP), ref.optim_step("fsdp:ckpt", STEP)
    assert got.metrics == pytest.approx(want.metrics, rel=1e-5)


def test_sampling_is_refused(ranks: Ranks) -> None:
    dp, _ = ranks
    with pytest.raises(OpInputError, match="sharded"):
        dp.sample(TINY, None, SampleOp(prompt=(1, 2, 3)))
    assert dp.serves_samples() is False


def test_a_rank_that_dies_inside_a_pass_fails_the_call_loudly(ranks: Ranks) -> None:
    """Last in the module: it breaks the process group for good. Rank 1 is killed once rank 0 is
    inside the sharded pass, so rank 0 is waiting in (or about to enter) an all-gather with it: the
    call fails with DeviceFatal within seconds (gloo notices the closed connection), not at the
    process group's timeout, and so does the next call."""
    dp, _ = ranks
    create(ranks, "fsdp:dead")
    pid = dp.pids[0]
    assert pid is not None
    inside = threading.Event()
    hook = torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: inside.set())

    def kill() -> None:
        if inside.wait(30):
            os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill)
    killer.start()
    long_op = fb(*(datum(list(range(1, 30 + i))) for i in range(200)))
    started = time.monotonic()
    try:
        with pytest.raises(DeviceFatal, match="rank 0: a pass through the sharded model failed"):
            dp.forward_backward("fsdp:dead", long_op, 1)
    finally:
        hook.remove()
        inside.set()
        killer.join()
    with pytest.raises(DeviceFatal):
        dp.optim_step("fsdp:dead", STEP)
    assert time.monotonic() - started < 30
