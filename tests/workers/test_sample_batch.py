"""The worker claims several queued samples at once and decodes them in one batch (issue 9;
workers/sample_batch.py), committing each as its own op: the same results as one at a time (same
tokens, logprobs within float rounding), a bad request fails alone, and samples claimed by a worker
that died mid-batch are redone with the same tokens.

Batching is on by default on CUDA only; here it is forced on the CPU (EngineConfig.batch_samples)."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.db import migrate
from app.db.engine import Database
from app.domain.ops import SampleOp, SamplingParams
from app.domain.results import SampleResult, parse_result
from app.queue import claim, sample_batch, submit
from tests.workers.conftest import make_settings
from tests.workers.test_recovery import TENANT, new_run
from tests.workers.test_resilience import make_runner, op_rows, wait_terminal
from workers.engine import EngineConfig, TorchEngine
from workers.engine.config import BatchRunsPolicy


def _ops() -> list[SampleOp]:
    ops = [
        SampleOp(prompt=(101, 57, 12 + i), num_samples=1 + i % 3, params=SamplingParams(max_tokens=4 + i, seed=i))
        for i in range(5)
    ]
    ops.append(SampleOp(prompt=(101,), params=SamplingParams(max_tokens=3, top_p=0.0)))  # invalid: fails alone
    return ops


def _submit(db: Database) -> list[str]:
    run_id = new_run(db)
    with db.write() as s:
        session_id = submit.get_run(s, TENANT, run_id).session_id
        sampler = submit.create_sampler(
            s, TENANT, session_id=session_id, sampling_session_seq_id=0, base_model="tuft/tiny-qwen3", model_path=None
        )
        return [submit.submit_sample(s, sampler, i, op).request_id for i, op in enumerate(_ops())]


def _serve(tmp_path: Path, db_url: str, cache: Path, batch: BatchRunsPolicy, dead_claim: bool = False) -> list[object]:
    migrate.upgrade(db_url)
    db = Database(db_url)
    settings = make_settings(tmp_path, db_url)
    engine = TorchEngine(settings.models(), cache_dir=cache, config=EngineConfig(batch_samples=batch))
    try:
        request_ids = _submit(db)
        if dead_claim:
            # A worker claims the whole batch and dies before committing anything.
            with db.write() as s:
                taken = sample_batch.claim_samples(s, "w-dead", 0.0, count=32, max_attempts=5)
            assert len(taken) == len(request_ids) and all(t.attempt == 1 for t in taken)
            with db.write() as s:
                assert claim.requeue_expired_samples(s) == len(request_ids)  # what the sweeper does
        runner = make_runner(settings, db, engine, f"w-{batch}")
        try:
            if batch == "on" and not dead_claim:
                runner.step()  # one pass claims, decodes and commits the whole batch
                assert all(r.status in ("succeeded", "failed") for r in op_rows(db, request_ids))
            rows = wait_terminal(runner, db, request_ids)
        finally:
            runner.stop.set()
        if dead_claim:
            assert all(r.attempt == 2 for r in rows)
        out: list[object] = []
        for r in rows:
            out.append(parse_result(r.result) if r.status == "succeeded" else (r.status, r.error_category))  # type: ignore[arg-type]
        return out
    finally:
        db.dispose()


def test_batched_samples_equal_one_at_a_time(
    db_url: str, tmp_path: Path, engine_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    batched = _serve(tmp_path, db_url, engine_cache, "on")
    # One at a time on a database of its own (SQLite: the results do not depend on the database).
    other_url = f"sqlite:///{tmp_path_factory.mktemp('single')}/db.sqlite"
    single = _serve(tmp_path_factory.mktemp("single-data"), other_url, engine_cache, "off")
    assert batched[-1] == ("failed", "user") == single[-1]
    for got, want in zip(batched[:-1], single[:-1], strict=True):
        assert isinstance(got, SampleResult) and isinstance(want, SampleResult)
        assert [s.tokens for s in got.sequences] == [s.tokens for s in want.sequences]
        for a, b in zip(got.sequences, want.sequences, strict=True):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_a_dead_workers_batch_is_redone_with_the_same_tokens(
    db_url: str, tmp_path: Path, engine_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    redone = _serve(tmp_path, db_url, engine_cache, "on", dead_claim=True)
    fresh = _serve(
        tmp_path_factory.mktemp("fresh"),
        f"sqlite:///{tmp_path_factory.mktemp('fresh-db')}/db.sqlite",
        engine_cache,
        "on",
    )
    assert redone[-1] == ("failed", "user")
    for got, want in zip(redone[:-1], fresh[:-1], strict=True):
        assert isinstance(got, SampleResult) and isinstance(want, SampleResult)
        assert [s.tokens for s in got.sequences] == [s.tokens for s in want.sequences]


class _NoSampling(TorchEngine):
    """An engine that trains but does not sample, as a worker with a sharded base (engine/sharded.py)."""

    def serves_samples(self) -> bool:
        return False


def test_a_worker_that_cannot_sample_leaves_samples_to_the_others(
    db_url: str, tmp_path: Path, engine_cache: Path
) -> None:
    migrate.upgrade(db_url)
    db = Database(db_url)
    settings = make_settings(tmp_path, db_url)
    try:
        request_ids = _submit(db)
        trainer = make_runner(settings, db, _NoSampling(settings.models(), cache_dir=engine_cache), "w-train")
        try:
            for _ in range(3):
                trainer.step()
        finally:
            trainer.stop.set()
        rows = op_rows(db, request_ids)
        assert [(r.status, r.attempt) for r in rows] == [("queued", 0)] * len(request_ids)  # not claimed, not failed
        sampler = make_runner(settings, db, TorchEngine(settings.models(), cache_dir=engine_cache), "w-sample")
        try:
            rows = wait_terminal(sampler, db, request_ids)
        finally:
            sampler.stop.set()
        assert [r.status for r in rows] == ["succeeded"] * (len(request_ids) - 1) + ["failed"]
    finally:
        db.dispose()
