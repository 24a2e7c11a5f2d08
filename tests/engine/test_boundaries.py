"""The engine's edges: what it may import, how device errors surface, local HF model folders."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from app.domain.models import ModelSpec
from app.domain.ops import AdamParams, ForwardBackwardOp, OptimStepOp, SampleOp, SamplingParams
from tests.engine.helpers import TINY, datum, fb, lora
from workers.engine import (
    DeviceFatal,
    OpInputError,
    OutOfMemory,
    TorchEngine,
    build_tiny_model,
    build_tiny_tokenizer,
)
from workers.engine.errors import translate_device_errors

REPO = Path(__file__).resolve().parents[2]


def test_engine_imports_no_server_machinery() -> None:
    forbidden = ["sqlalchemy", "celery", "fastapi", "app.db", "app.queue", "app.wire", "app.api"]
    code = (
        "import sys, workers.engine\n"
        f"bad = [m for m in {forbidden!r} if any(k == m or k.startswith(m + '.') for k in sys.modules)]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def _raiser(exc: BaseException) -> Callable[[], None]:
    @translate_device_errors
    def fn() -> None:
        raise exc

    return fn


def test_device_errors_are_translated() -> None:
    with pytest.raises(OutOfMemory):
        _raiser(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))()
    with pytest.raises(OutOfMemory):
        _raiser(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"))()
    with pytest.raises(DeviceFatal):
        _raiser(RuntimeError("CUDA error: an illegal memory access was encountered"))()
    with pytest.raises(OpInputError):
        _raiser(OpInputError("bad"))()
    with pytest.raises(RuntimeError, match="something else"):
        _raiser(RuntimeError("something else"))()


def test_local_hf_folder_behaves_like_the_builtin(cache_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "tiny-hf"
    build_tiny_model().save_pretrained(str(folder))
    build_tiny_tokenizer(cache_dir).save_pretrained(str(folder))
    local = ModelSpec(model_name="local/tiny", model_path=str(folder))
    engine = TorchEngine([local], cache_dir=cache_dir)
    builtin = TorchEngine([ModelSpec(model_name=TINY, model_path="builtin:tiny-qwen3")], cache_dir=cache_dir)
    assert engine.vocab_size("local/tiny") == 151_936  # read from config.json, nothing loaded yet

    seq = [101, 57, 12, 7, 102]
    for eng, name in ((engine, "local/tiny"), (builtin, TINY)):
        eng.create_run("r", name, lora())
    ours = engine.forward_backward("r", fb(datum(seq))).outputs[0]["logprobs"].tolist()
    theirs = builtin.forward_backward("r", fb(datum(seq))).outputs[0]["logprobs"].tolist()
    assert ours == pytest.approx(theirs, abs=1e-6)
    op = SampleOp(prompt=(1, 2, 3), params=SamplingParams(max_tokens=4, seed=3, stop_at_eos=False))
    a, b = engine.sample("local/tiny", None, op).sequences[0], builtin.sample(TINY, None, op).sequences[0]
    assert a.tokens == b.tokens
    assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_replay_in_a_fresh_engine_is_bitwise_identical(make_engine: Callable[[], TorchEngine], tmp_path: Path) -> None:
    """Crash recovery replays a run's mutating ops on a fresh worker: the state must match exactly,
    whatever else the original worker was doing in between (other runs, sampling)."""
    step = OptimStepOp(adam=AdamParams(learning_rate=3e-3, weight_decay=0.1, grad_clip_norm=5.0))
    ops: list[ForwardBackwardOp | OptimStepOp] = [
        fb(datum([5, 6, 7, 8, 9]), datum([1, 2])),
        step,
        fb(datum([9, 8, 7])),
        fb(datum([4, 4])),
        step,
    ]

    busy = make_engine()
    busy.create_run("neighbour", TINY, lora(seed=9))
    busy.create_run("run", TINY, lora(seed=1))
    for op in ops:
        busy.forward_backward("neighbour", fb(datum([3, 3, 3])))
        if isinstance(op, OptimStepOp):
            busy.optim_step("run", op)
        else:
            busy.forward_backward("run", op)
        busy.sample(TINY, None, SampleOp(prompt=(7, 7), params=SamplingParams(max_tokens=2, seed=1)))

    fresh = make_engine()
    fresh.create_run("run", TINY, lora(seed=1))
    for op in ops:
        if isinstance(op, OptimStepOp):
            fresh.optim_step("run", op)
        else:
            fresh.forward_backward("run", op)
    assert fresh.state_digest("run") == busy.state_digest("run")
