"""optim_step: bad hyperparameters become failed futures; a missing seq_id is a 400."""

from __future__ import annotations

from typing import Any

import pytest

from tests.api.helpers import Api, adam, assert_error


def _optim(model_id: str, seq: int | None = 1, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model_id": model_id, "type": "optim_step", **fields}
    if seq is not None:
        body["seq_id"] = seq
    if "adam_params" not in fields and "optimizer_params" not in fields:
        body["adam_params"] = adam()
    return body


BAD_ADAM: dict[str, tuple[dict[str, Any], str]] = {
    "nan_lr": ({"learning_rate": float("nan")}, "learning_rate"),
    "inf_lr": ({"learning_rate": float("inf")}, "learning_rate"),
    "negative_lr": ({"learning_rate": -1e-4}, "learning_rate"),
    "beta1_is_1": ({"beta1": 1.0}, "beta1"),
    "beta2_above_1": ({"beta2": 1.5}, "beta2"),
    "negative_beta1": ({"beta1": -0.1}, "beta1"),
    "negative_eps": ({"eps": -1.0}, "eps"),
    "nan_weight_decay": ({"weight_decay": float("nan")}, "weight_decay"),
    "negative_grad_clip": ({"grad_clip_norm": -1.0}, "grad_clip_norm"),
}


@pytest.mark.parametrize("case", sorted(BAD_ADAM))
def test_bad_adam_params_are_a_failed_future(api: Api, case: str) -> None:
    overrides, field = BAD_ADAM[case]
    model_id = api.model()
    request_id = api.accepted(api.post("/api/v1/optim_step", _optim(model_id, adam_params=adam(**overrides))))
    assert field in api.failed_future(request_id)
    # The run goes on with the next seq.
    api.queued(api.accepted(api.post("/api/v1/optim_step", _optim(model_id, 2))))


def test_dimuon_is_a_clear_failure(api: Api) -> None:
    model_id = api.model()
    body = _optim(model_id, optimizer_params={"type": "dimuon", "version": 1, "learning_rate": 1e-3})
    message = api.failed_future(api.accepted(api.post("/api/v1/optim_step", body)))
    assert "dimuon" in message and "not supported" in message


def test_optimizer_params_in_adam_form_are_accepted(api: Api) -> None:
    model_id = api.model()
    body = _optim(model_id, optimizer_params={"type": "adamw", **adam(learning_rate=3e-4)})
    api.queued(api.accepted(api.post("/api/v1/optim_step", body)))
    bad = _optim(model_id, 2, optimizer_params={"type": "adamw", "learning_rate": "fast"})
    assert "optimizer_params" in api.failed_future(api.accepted(api.post("/api/v1/optim_step", bad)))


def test_no_optimizer_params_at_all_is_a_failed_future(api: Api) -> None:
    model_id = api.model()
    body = {"model_id": model_id, "seq_id": 1, "type": "optim_step"}
    assert "adam_params" in api.failed_future(api.accepted(api.post("/api/v1/optim_step", body)))


@pytest.mark.parametrize("seq", [None, 0, -1], ids=["missing", "zero", "negative"])
def test_missing_or_bad_seq_id_is_400(api: Api, seq: int | None) -> None:
    model_id = api.model()
    assert_error(api.post("/api/v1/optim_step", _optim(model_id, seq)), 400, error="invalid_input", contains="seq_id")


def test_unknown_model_is_404(api: Api) -> None:
    assert_error(api.post("/api/v1/optim_step", _optim("s-nope:train:0")), 404, error="not_found")
    assert_error(api.post("/api/v1/optim_step", {"seq_id": 1, "adam_params": adam()}), 400, contains="model_id")
