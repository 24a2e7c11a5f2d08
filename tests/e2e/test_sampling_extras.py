"""Sampling options and backpressure through the real SDK against a live server (docs/sampling.md).

`make test-sdk-old` reruns this file under tinker 0.25.0, which has none of the 0.38 extras: there the
0.38-only tests skip, and the prompt logprob and backpressure tests run as they are.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import tinker
from tinker import types

from tests.e2e.server import REPO, TUFT, LiveServer, _env, free_port
from tests.e2e.test_training import client_for, resolved

pytestmark = pytest.mark.e2e

SDK_038 = tuple(int(x) for x in tinker.__version__.split(".")[:2]) >= (0, 38)
only_038 = pytest.mark.skipif(not SDK_038, reason=f"tinker {tinker.__version__} has no sampling extras")
PROMPT = [9707, 1879, 0, 220, 3838, 374, 279, 6722]
P = len(PROMPT)


def _sampler(server: LiveServer) -> tinker.SamplingClient:
    return resolved(client_for(server).create_sampling_client(base_model="tuft/tiny-qwen3"))


def _sample(sampler: tinker.SamplingClient, n: int = 1, **kw: Any) -> types.SampleResponse:
    params = types.SamplingParams(max_tokens=kw.pop("max_tokens", 4), seed=kw.pop("seed", 0), top_k=kw.pop("top_k", -1))
    return sampler.sample(types.ModelInput.from_ints(PROMPT), n, params, **kw).result(timeout=120)


def test_prompt_logprobs_and_topk(embedded_server: LiveServer) -> None:
    """The path both SDK versions share."""
    sampler = _sampler(embedded_server)
    out = _sample(sampler, include_prompt_logprobs=True, topk_prompt_logprobs=3)
    assert out.prompt_logprobs is not None and out.topk_prompt_logprobs is not None
    assert len(out.prompt_logprobs) == len(out.topk_prompt_logprobs) == P
    assert out.prompt_logprobs[0] is None and out.topk_prompt_logprobs[0] is None
    for lp, top in zip(out.prompt_logprobs[1:], out.topk_prompt_logprobs[1:], strict=True):
        assert lp is not None and lp < 0
        assert top is not None and len(top) == 3
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True) and lp <= values[0] + 1e-6
    logprobs = sampler.compute_logprobs(types.ModelInput.from_ints(PROMPT)).result(timeout=120)
    assert logprobs[0] is None
    assert logprobs[1:] == pytest.approx(out.prompt_logprobs[1:], abs=1e-5)


@only_038
def test_topk_sample_logprobs(embedded_server: LiveServer) -> None:
    # Sampling among the 4 likeliest tokens keeps every sampled token inside its top-20 row (the
    # row also ranks the vocabulary's padding ids, which are never sampled).
    out = _sample(_sampler(embedded_server), n=2, max_tokens=6, seed=3, top_k=4, topk_sample_logprobs=20)
    for seq in out.sequences:
        assert seq.logprobs is not None and seq.topk_logprobs is not None
        assert len(seq.topk_logprobs) == len(seq.tokens) == 6
        for token, logprob, row in zip(seq.tokens, seq.logprobs, seq.topk_logprobs, strict=True):
            assert row is not None and len(row) == 20
            values = [v for _, v in row]
            assert values == sorted(values, reverse=True)
            ids = [t for t, _ in row]
            assert values[ids.index(token)] == logprob
    assert all(s.topk_logprobs is None for s in _sample(_sampler(embedded_server)).sequences)


@only_038
def test_prompt_logprobs_last_n(embedded_server: LiveServer) -> None:
    sampler = _sampler(embedded_server)
    whole = sampler.compute_logprobs(types.ModelInput.from_ints(PROMPT)).result(timeout=120)
    # The SDK itself raises if any position before the suffix carries a logprob.
    tail = sampler.compute_logprobs(types.ModelInput.from_ints(PROMPT), prompt_logprobs_last_n=3).result(timeout=120)
    assert tail[: P - 3] == [None] * (P - 3)
    assert tail[P - 3 :] == pytest.approx(whole[P - 3 :], abs=1e-5)
    out = _sample(sampler, include_prompt_logprobs=True, topk_prompt_logprobs=2, prompt_logprobs_last_n=2)
    assert out.topk_prompt_logprobs is not None
    assert out.topk_prompt_logprobs[: P - 2] == [None] * (P - 2)
    assert all(row is not None and len(row) == 2 for row in out.topk_prompt_logprobs[P - 2 :])
    with pytest.raises(tinker.BadRequestError, match="prompt_logprobs_last_n"):
        _sample(sampler, include_prompt_logprobs=True, prompt_logprobs_last_n=P)


@only_038
def test_target_prompt_logprobs_dense_and_sparse(embedded_server: LiveServer) -> None:
    import torch

    sampler = _sampler(embedded_server)
    ids = torch.full((P - 1, 2), -1, dtype=torch.int64)
    ids[:, 0] = torch.tensor(PROMPT[1:])  # each position's own next token
    ids[2, 1] = 42
    out = _sample(sampler, include_prompt_logprobs=True, target_prompt_logprobs=types.TensorData.from_torch(ids))
    assert out.prompt_logprobs is not None and out.target_prompt_logprobs is not None
    dense = out.target_prompt_logprobs.to_torch()
    assert list(dense.shape) == [P - 1, 2]
    assert dense[:, 0].tolist() == pytest.approx(out.prompt_logprobs[1:], abs=1e-5)
    assert dense[2, 1] < 0 and dense[0, 1] == 0.0  # -1 asked for nothing
    sparse_ids = torch.full((P - 1, 3), -1, dtype=torch.int64)
    sparse_ids[P - 2, 1] = PROMPT[-1]
    target = types.TensorData.from_torch_sparse(sparse_ids, pad_value=-1)
    assert target.sparse_crow_indices is not None
    sparse = _sample(sampler, target_prompt_logprobs=target).target_prompt_logprobs
    assert sparse is not None
    assert (sparse.sparse_crow_indices, sparse.sparse_col_indices) == (
        target.sparse_crow_indices,
        target.sparse_col_indices,
    )
    assert sparse.to_torch()[P - 2, 1].item() == pytest.approx(out.prompt_logprobs[-1], abs=1e-5)


@only_038
def test_prompt_alt_tokens(embedded_server: LiveServer) -> None:
    out = _sample(_sampler(embedded_server), seed=5, prompt_alt_tokens_k=3)
    assert out.prompt_alt_tokens is not None
    tokens, logprobs = out.prompt_alt_tokens.tokens.to_torch(), out.prompt_alt_tokens.logprobs.to_torch()
    assert list(tokens.shape) == list(logprobs.shape) == [P - 1, 3]
    assert bool((logprobs <= 0).all()) and bool((tokens >= 0).all())


@only_038
def test_out_of_range_extras_are_bad_requests(embedded_server: LiveServer) -> None:
    sampler = _sampler(embedded_server)
    with pytest.raises(tinker.BadRequestError, match="topk_sample_logprobs must be between 0 and 20"):
        _sample(sampler, topk_sample_logprobs=21)
    with pytest.raises(tinker.BadRequestError, match="prompt_alt_tokens_k must be between 0 and 100"):
        _sample(sampler, prompt_alt_tokens_k=101)


# Backpressure: a queue of one, many concurrent samples.


def _api_without_worker(tmp_path: Path, max_queued_samples: int) -> tuple[LiveServer, list[str]]:
    """`tuft api` on an SQLite file, with the worker left for later: until it starts, the first
    sample holds the queue's one place and every other one is refused."""
    data = tmp_path / "data"
    data.mkdir()
    config = tmp_path / "tuft.yaml"
    config.write_text(
        f"max_queued_samples: {max_queued_samples}\napi_keys:\n  - key: tml-local-dev-key\n    tenant: default\n"
    )
    common = ["--data-dir", str(data), "--database-url", f"sqlite:///{data / 'tuft.db'}", "--config", str(config)]
    subprocess.run([*TUFT, "db", "upgrade", *common], cwd=REPO, env=_env(), check=True, capture_output=True)
    port = free_port()
    server = LiveServer(port=port, data_dir=data, args=["api", "--port", str(port), *common], log_dir=tmp_path)
    return server, ["worker", "--device", "cpu", *common]


def _wait_for(predicate: Any, what: str, server: LiveServer, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} never happened:\n{server.logs()}")
        time.sleep(0.2)


def test_full_queue_backs_the_sdk_off_until_every_sample_succeeds(tmp_path: Path) -> None:
    n = 8
    server, worker_args = _api_without_worker(tmp_path, max_queued_samples=1)
    server.start()
    try:
        sampler = _sampler(server)
        results: list[Any] = []

        async def sample_all() -> list[types.SampleResponse]:
            params = types.SamplingParams(max_tokens=3, seed=1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # 0.38 deprecates sample_async
                calls = [sampler.sample_async(types.ModelInput.from_ints([*PROMPT, i]), 1, params) for i in range(n)]
                return await asyncio.gather(*calls)

        thread = threading.Thread(target=lambda: results.append(asyncio.run(sample_all())), daemon=True)
        thread.start()
        api_log = tmp_path / "api.log"
        _wait_for(lambda: api_log.read_text(errors="replace").count("-> 429") >= n - 1, "backpressure", server)
        server.procs.append(server._spawn(worker_args, "worker"))
        thread.join(timeout=480)
        assert not thread.is_alive(), server.logs()
        assert len(results) == 1, server.logs()
        for out in results[0]:
            assert len(out.sequences) == 1 and 1 <= len(out.sequences[0].tokens) <= 3
        # Each sample was recorded once, however often it was refused before.
        with sqlite3.connect(server.data_dir / "tuft.db") as db:
            rows = db.execute("SELECT status, count(*) FROM ops WHERE kind = 'sample' GROUP BY status").fetchall()
        assert rows == [("succeeded", n)]
    finally:
        server.stop()
