"""An expired checkpoint is unusable before the sweeper deletes it (split from
test_checkpoint_lifecycle.py, whose helpers it shares)."""

from __future__ import annotations

from tinker import types

from tests.api.helpers import Api, assert_error, sweeper_held
from tests.api.test_checkpoint_lifecycle import call, copy, expire_now, listed, make, set_ttl, url


def test_expired_checkpoint_is_invisible_before_the_sweep(api: Api) -> None:
    with sweeper_held(api):
        _expired_checkpoint_is_invisible(api)


def _expired_checkpoint_is_invisible(api: Api) -> None:
    model = api.model()
    keep = make(api, model, "keep")
    gone = make(api, model, "gone")
    make(api, model, "gone-sampler", kind="sampler")
    sampler_gone = f"tinker://{model}/sampler_weights/gone-sampler"
    expire_now(api, gone)
    expire_now(api, sampler_gone)
    listing = listed(api, keep)
    assert [c["tinker_path"] for c in listing["checkpoints"]] == [keep]
    assert listing["cursor"]["total_count"] == 1
    mine = {c["tinker_path"] for c in api.get("/api/v1/checkpoints?limit=1000").json()["checkpoints"]}
    assert keep in mine and gone not in mine and sampler_gone not in mine
    run = types.TrainingRun.model_validate(api.get(f"/api/v1/training_runs/{model}").json())
    assert run.last_checkpoint is not None and run.last_checkpoint.tinker_path == keep
    assert run.last_sampler_checkpoint is None
    # Unusable for reading and for changes alike (a TTL must not bring it back).
    assert_error(api.post("/api/v1/weights_info", {"tinker_path": gone}), 404, contains="expired")
    assert_error(set_ttl(api, gone, 3600), 404, contains="expired")
    assert_error(call(api, "POST", url(gone, "/publish")), 404, contains="expired")
    assert_error(call(api, "DELETE", url(gone)), 404, contains="expired")
    assert_error(copy(api, gone), 404, contains="expired")
