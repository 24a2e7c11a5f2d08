"""GET /metrics after real ops (docs/metrics.md): submitted through the API, claimed and committed
through the queue's own functions (the worker's path, without a model), read by the client. Each
backend gets an app and a database of its own, so the counts are exactly the ops done here."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from app.domain.results import CreateModelResult, ForwardBackwardResult, SampledSequence, SampleResult, result_bytes
from app.queue import claim, commit, leases
from app.queue.commit import Outcome
from tests.api.helpers import BASE_MODEL, KEY_B, TENANT_B, Api, ce_datum, fb_body, make_settings, running_app
from tests.conftest import PG_ADMIN_URL, _pg_url_for

TOKEN = "metrics-secret"
WORKER = "metrics-w1"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def mapi(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    data_dir = tmp_path_factory.mktemp(f"metrics-{request.param}")
    # Cache off: each scrape must see the ops committed just before it.
    overrides = {"metrics_token": TOKEN, "metrics_cache_seconds": 0.0}
    if request.param == "sqlite":
        tokenizer = data_dir / "cache" / "tokenizers" / "tiny-qwen3"
        tokenizer.mkdir(parents=True)
        (tokenizer / "tokenizer.json").write_text("{}")
        with running_app(make_settings(data_dir, None, **overrides)) as app:
            yield app
        return
    name = f"tuft_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        with running_app(make_settings(data_dir, _pg_url_for(name), **overrides)) as app:
            yield app
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def scrape(api: Api) -> tuple[Samples, dict[str, str]]:
    r = api.get("/metrics", key=None, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(r.text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def run_worker(api: Api, fail_seq: int | None = None) -> int:
    """Claim and commit every ready training op the way the runner does; returns how many."""
    done = 0
    while True:
        with api.db.write() as s:
            leases.acquire_runs(s, WORKER, ttl=30)
            ready = claim.ready_run_ops(s, WORKER)
        if not ready:
            return done
        for op in ready:
            with api.db.write() as s:
                assert claim.claim_run_op(s, WORKER, op)
            if op.kind == "create_model":
                outcome = Outcome(result=result_bytes(CreateModelResult(model_id=op.run_id)))
            elif op.seq == fail_seq:
                outcome = Outcome(error_message="bad datum", error_category="user")
            else:
                outcome = Outcome(result=result_bytes(ForwardBackwardResult(outputs=({},), metrics={"loss:sum": 1.0})))
            with api.db.write() as s:
                commit.commit_run_op(
                    s,
                    worker_id=WORKER,
                    run_id=op.run_id,
                    seq=op.seq,
                    epoch=op.epoch,
                    request_id=op.request_id,
                    outcome=outcome,
                )
            done += 1


def test_metrics_need_the_token(mapi: Api) -> None:
    assert mapi.get("/metrics", key=None).status_code == 404
    # A tenant's API key is not enough: the page names every tenant.
    assert mapi.get("/metrics").status_code == 404
    assert mapi.get("/metrics", key=None, headers={"Authorization": "Bearer wrong"}).status_code == 404
    assert mapi.get("/metrics", key=None, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_metrics_count_the_ops_done(mapi: Api) -> None:
    with mapi.db.write() as s:
        leases.register_worker(s, worker_id=WORKER, host="h", device="cpu", queue="q", pid=1)
    model_id = mapi.model()
    sizes = [4, 6, 9]
    fb = [
        mapi.accepted(mapi.post_proto(fb_body(model_id, i + 1, [ce_datum(list(range(1, n + 1)))])))
        for i, n in enumerate(sizes)
    ]
    before, _ = scrape(mapi)
    assert value(before, "tuft_queue_depth", base_model=BASE_MODEL, tenant="default", status="queued") == 3
    assert value(before, "tuft_queue_oldest_age_seconds", base_model=BASE_MODEL, tenant="default", status="queued") >= 0

    # create_model (seq 0) succeeded at submission; of the forward_backwards at 1..3 the one at
    # seq 2 fails (category user).
    assert run_worker(mapi, fail_seq=2) == 3
    # Tenant B samples: prompt 3 tokens, 5 sampled.
    sampler_id = mapi.sampler(key=KEY_B)
    body = {
        "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
        "sampling_params": {"max_tokens": 8, "temperature": 1.0, "top_k": -1, "top_p": 1.0},
        "type": "sample",
        "sampling_session_id": sampler_id,
        "seq_id": 0,
    }
    sample_id = mapi.accepted(mapi.post("/api/v1/asample", body, key=KEY_B))
    with mapi.db.write() as s:
        claimed = claim.claim_sample(s, WORKER, claim_ttl=30)
    assert claimed is not None and claimed.request_id == sample_id
    seq = SampledSequence(tokens=(5, 6, 7, 8, 9), logprobs=None, stop_reason="length")
    with mapi.db.write() as s:
        commit.commit_sample(
            s,
            worker_id=WORKER,
            request_id=sample_id,
            outcome=Outcome(result=result_bytes(SampleResult(sequences=(seq,)))),
        )
    # The client reads two results: their delivered stage ends.
    for request_id in (fb[0], fb[2]):
        assert mapi.retrieve(request_id).status_code == 200
    assert mapi.retrieve(sample_id, key=KEY_B).status_code == 200

    after, types = scrape(mapi)
    assert types["tuft_op_stage_seconds"] == "histogram"
    assert types["tuft_ops_finished"] == types["tuft_tokens"] == types["tuft_op_failures"] == "counter"
    assert value(after, "tuft_ops_finished_total", kind="forward_backward", status="succeeded") == 2
    assert value(after, "tuft_ops_finished_total", kind="forward_backward", status="failed") == 1
    assert value(after, "tuft_ops_finished_total", kind="create_model", status="succeeded") == 1
    assert value(after, "tuft_ops_finished_total", kind="sample", status="succeeded") == 1
    assert value(after, "tuft_op_failures_total", kind="forward_backward", category="user") == 1
    # Trained tokens of succeeded ops only (the failed one's 6 are not counted), per tenant.
    assert value(after, "tuft_tokens_total", tenant="default", kind="forward_backward", direction="input") == 4 + 9
    assert value(after, "tuft_tokens_total", tenant=TENANT_B, kind="sample", direction="input") == 3
    assert value(after, "tuft_tokens_total", tenant=TENANT_B, kind="sample", direction="output") == 5
    assert not [
        k
        for k in after
        if k[0] == "tuft_tokens_total" and ("tenant", TENANT_B) in k[1] and ("kind", "forward_backward") in k[1]
    ]
    assert value(after, "tuft_queue_depth", base_model=BASE_MODEL, tenant="default", status="queued") == 0

    # Histograms: one series per (kind, stage), le buckets cumulative up to +Inf == count.
    stage_counts = {
        (dict(labels)["kind"], dict(labels)["stage"]): v
        for (name, labels), v in after.items()
        if name == "tuft_op_stage_seconds_count"
    }
    assert stage_counts[("forward_backward", "queued")] == 3
    assert stage_counts[("forward_backward", "running")] == 3
    assert stage_counts[("forward_backward", "delivered")] == 2
    assert stage_counts[("sample", "delivered")] == 1
    for (name, labels), v in after.items():
        if name == "tuft_op_stage_seconds_bucket":
            assert {k for k, _ in labels} == {"kind", "stage", "le"}
            if dict(labels)["le"] == "+Inf":
                assert v == stage_counts[(dict(labels)["kind"], dict(labels)["stage"])]
    buckets = sorted(
        (float(dict(labels)["le"]), v)
        for (name, labels), v in after.items()
        if name == "tuft_op_stage_seconds_bucket"
        and ("kind", "forward_backward") in labels
        and ("stage", "running") in labels
    )
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
    assert value(after, "tuft_workers", state="live") == 1
    assert value(after, "tuft_runs", status="active") == 1
    assert value(after, "tuft_lease_takeovers_total") == 0


def test_unauthenticated_listener_on_its_own_port(tmp_path: Path) -> None:
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = make_settings(tmp_path, None, metrics_port=port)
    with running_app(settings) as app:
        assert app.get("/metrics", key=None).status_code == 404  # no token set: not on the API port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            body = reply.read().decode()
    assert "tuft_queue_depth" in body and "tuft_lease_takeovers_total" in body
