"""The audit log and usage with the real SDK 0.38 (AdminClient, and the `tinker billing` CLI)
against a live server whose worker really trains and samples (docs/audit-and-usage.md): the
tokens reported are the tokens the client sent and the worker generated.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import tinker
from tinker import types

from tests.e2e.server import LiveServer
from tests.e2e.test_download import _cli
from tests.e2e.test_training import PROMPT, client_for, memorise_datum, new_training

SDK = tuple(int(p) for p in tinker.__version__.split(".")[:2])
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(SDK < (0, 38), reason="AdminClient is SDK 0.38's")]


def test_admin_client_reads_the_audit_log_and_usage(embedded_server: LiveServer) -> None:
    client = client_for(embedded_server)
    training = new_training(client)
    datum = memorise_datum()
    training.forward_backward([datum], "cross_entropy").result(timeout=120)
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=120)
    saved = training.save_weights_for_sampler("audited").result(timeout=120)
    sampler = client.create_sampling_client(model_path=saved.path).result(timeout=120)
    out = sampler.sample(
        prompt=types.ModelInput.from_ints(PROMPT),
        num_samples=2,
        sampling_params=types.SamplingParams(max_tokens=3, temperature=1.0, seed=1),
    ).result(timeout=120)
    generated = sum(len(seq.tokens) for seq in out.sequences)
    session = training.model_id.split(":")[0]

    admin = tinker.AdminClient(base_url=embedded_server.url, api_key="tml-local-dev-key")
    log = admin.get_audit_log().result(timeout=60)
    events = [(e.event, e.event_details.get("model_id")) for e in log.entries]
    assert ("training_run_create", training.model_id) in events
    assert events.count(("op_forward_backward", training.model_id)) == 1
    assert any(e.event == "checkpoint_create" and e.tinker_path == saved.path for e in log.entries)
    fb = next(e for e in log.entries if e.event == "op_forward_backward")
    assert (fb.event_details["status"], fb.event_details["input_tokens"]) == ("succeeded", datum.model_input.length)
    assert [e.timestamp for e in log.entries] == sorted(e.timestamp for e in log.entries)
    assert admin.get_audit_log(event_type="teams").result(timeout=60).entries == []

    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    usage = admin.get_billing_usage(hour - timedelta(hours=1), hour + timedelta(hours=1)).result(timeout=60)
    totals: dict[str, int] = {}
    for event in usage.data:
        if event.session_id == session:
            info = event.event_info
            quantity = info.count if isinstance(info, types.CheckpointBillingEvent) else getattr(info, "token_count", 0)
            totals[info.type] = totals.get(info.type, 0) + quantity
            assert event.base_model == "tuft/tiny-qwen3"
    assert totals == {
        "training": datum.model_input.length,
        "checkpoint": 1,
        "sampling_prefill": len(PROMPT),
        "sampling_sample": generated,
    }
    assert session in usage.sessions

    storage = admin.get_current_checkpoint_storage_usage().result(timeout=60)
    assert storage.data[0].checkpoint_count >= 1 and storage.data[0].size_bytes > 0

    # The CLI's own commands print the same (JSON output).
    start, end = (hour - timedelta(hours=1)).isoformat(), (hour + timedelta(hours=1)).isoformat()
    printed = _cli(embedded_server, "billing", "usage", start.replace("+00:00", "Z"), end.replace("+00:00", "Z"))
    assert any(row.get("session_id") == session for row in printed["data"]), printed
    assert _cli(embedded_server, "billing", "checkpoint-storage")["data"]
