"""stable_reinforce in the engine: value, metrics and gradient against a plain-torch reference
written from docs/losses.md, the recorded logprobs (not the client's) being what counts, the
overflow and forward-only rules, and the engine's own checks of the server-filled inputs."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from app.domain.ops import Datum, resolve_loss_config
from app.domain.provenance import RECORDED_LOGPROBS, SAMPLED_MASK
from app.domain.tensors import Array
from tests.engine.helpers import TINY, datum, fb, lora, same_grads
from tests.engine.test_rl_losses import (
    SEQ_A,
    SEQ_B,
    advantages_for,
    assert_grads_close,
    logprobs_of,
    model_logprobs,
    rl_op,
    sampler_for,
    twin_runs,
)
from workers.engine import OpInputError, TorchEngine


def sr_datum(
    seq: Sequence[int], recorded: Sequence[float], advantages: Sequence[float], mask: Sequence[float], **extra: Array
) -> Datum:
    """A datum as the API leaves it once provenance is resolved (app/queue/stability.py)."""
    inputs = {
        "target_tokens": Array.from_list(list(seq[1:]), "int64"),
        "advantages": Array.from_list(list(advantages), "float32"),
        RECORDED_LOGPROBS: Array.from_list(list(recorded), "float32"),
        SAMPLED_MASK: Array.from_list(list(mask), "float32"),
        **extra,
    }
    return Datum(tokens=tuple(seq[:-1]), loss_fn_inputs=inputs)


def reference(
    lps: list[torch.Tensor],
    qs: list[torch.Tensor],
    advs: list[torch.Tensor],
    masks: list[torch.Tensor],
    config: dict[str, float],
) -> tuple[torch.Tensor, dict[str, float]]:
    """loss = Σ_t m_t·(-sg(min(r_t, c))·A_t·logp_t + β·(r_t - 1 - log r_t)), straight from the doc."""
    full = resolve_loss_config("stable_reinforce", config)
    cap, beta = full["clip_high_threshold"], full["kl_coeff"]
    total = torch.zeros(())
    ratio_means, clip_fractions = [], []
    for lp, q, adv, m in zip(lps, qs, advs, masks, strict=True):
        sampled = m.bool()
        log_r = lp[sampled] - q[sampled]
        r = torch.exp(log_r)
        weight = torch.clamp(r.detach(), max=cap)
        total = total + (-weight * adv[sampled] * lp[sampled] + beta * (r - 1 - log_r)).sum()
        active = adv[sampled] != 0
        rd = r.detach()[active]
        ratio_means.append(float(rd.mean()) if active.any() else 1.0)
        clip_fractions.append(float((rd > cap).float().mean()) if active.any() else 0.0)
    n = len(lps)
    return total, {"ratio_mean:mean": sum(ratio_means) / n, "clip_fraction:mean": sum(clip_fractions) / n}


def masks_for(lps: list[torch.Tensor], prompt: Sequence[int]) -> list[torch.Tensor]:
    out = []
    for lp, p in zip(lps, prompt, strict=True):
        m = torch.ones_like(lp)
        m[:p] = 0.0
        out.append(m)
    return out


@pytest.mark.parametrize(
    "config",
    [{}, {"clip_high_threshold": 1.1, "kl_coeff": 0.3}],
    ids=["defaults", "clipped_with_kl"],
)
def test_value_metrics_and_gradient_match_the_reference(engine: TorchEngine, config: dict[str, float]) -> None:
    run, twin = twin_runs(engine, f"sr:{len(config)}")
    lps = model_logprobs(engine, run, SEQ_A, SEQ_B)
    advs = [advantages_for(lp.shape[0], seed=i, constant=False) for i, lp in enumerate(lps)]
    qs = [sampler_for(lp, seed=20 + i, spread=0.2) for i, lp in enumerate(lps)]
    masks = masks_for(lps, (3, 1))
    # The client's `logprobs` is accepted and ignored: a nonsense value must change nothing.
    data = [
        sr_datum(s, q.tolist(), a.tolist(), m.tolist(), logprobs=Array.from_list([-50.0] * len(q), "float32"))
        for s, q, a, m in zip((SEQ_A, SEQ_B), qs, advs, masks, strict=True)
    ]

    forward = engine.forward_backward(run, rl_op("stable_reinforce", *data, forward_only=True, config=config))
    leaves = [lp.clone().requires_grad_(True) for lp in lps]
    want_loss, want_metrics = reference(leaves, qs, advs, masks, config)
    assert forward.metrics.keys() == {"loss:sum", *want_metrics}
    assert forward.metrics["loss:sum"] == pytest.approx(float(want_loss.detach()), rel=1e-5, abs=1e-5)
    for key, value in want_metrics.items():
        assert forward.metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for got, lp in zip(logprobs_of(forward), lps, strict=True):
        assert torch.equal(got, lp)
    if config:
        assert 0 < forward.metrics["clip_fraction:mean"] < 1  # truncated and untruncated tokens

    trained = engine.forward_backward(run, rl_op("stable_reinforce", *data, config=config))
    assert trained.metrics == forward.metrics
    want_loss.backward()
    weights = [-(leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)) for leaf in leaves]
    assert any(w.abs().sum() > 0 for w in weights)
    engine.forward_backward(twin, fb(*(datum(s, w.tolist()) for s, w in zip((SEQ_A, SEQ_B), weights, strict=True))))
    assert_grads_close(engine.adapter_grads(run), engine.adapter_grads(twin))


def test_on_policy_it_is_reinforce(engine: TorchEngine) -> None:
    """Recorded logprobs equal to the model's: every weight is 1, the penalty 0, so the loss is
    -Σ A_t·logp_t over the sampled tokens, whatever kl_coeff is."""
    engine.create_run("sr:on", TINY, lora(seed=2))
    (lp,) = model_logprobs(engine, "sr:on", SEQ_A)
    adv = advantages_for(lp.shape[0], seed=3, constant=True)
    (mask,) = masks_for([lp], (3,))
    d = sr_datum(SEQ_A, lp.tolist(), adv.tolist(), mask.tolist())
    out = engine.forward_backward("sr:on", rl_op("stable_reinforce", d, forward_only=True, config={"kl_coeff": 1.0}))
    assert out.metrics["loss:sum"] == pytest.approx(float(-(adv * lp * mask).sum()), rel=1e-5, abs=1e-5)
    assert out.metrics["ratio_mean:mean"] == pytest.approx(1.0)
    assert out.metrics["clip_fraction:mean"] == 0.0


def test_an_overflowing_ratio_weighs_the_cap_without_kl(engine: TorchEngine) -> None:
    engine.create_run("sr:inf", TINY, lora(seed=2))
    (lp,) = model_logprobs(engine, "sr:inf", SEQ_A)
    mask = [0.0] * 3 + [1.0] * (lp.shape[0] - 3)
    adv = [0.0] * 3 + [1.0] * (lp.shape[0] - 3)
    recorded = (lp - 200.0).tolist()  # exp(200) overflows float32
    d = sr_datum(SEQ_A, recorded, adv, mask)
    out = engine.forward_backward("sr:inf", rl_op("stable_reinforce", d))
    want = -2.0 * sum(float(v) for v, m in zip(lp.tolist(), mask, strict=True) if m)
    assert out.metrics["loss:sum"] == pytest.approx(want, rel=1e-5)
    assert out.metrics["clip_fraction:mean"] == 1.0
    # With the KL penalty the overflow is really used: the op fails, nothing applied.
    digest, grads = engine.state_digest("sr:inf"), engine.adapter_grads("sr:inf")
    with pytest.raises(OpInputError, match="not finite"):
        engine.forward_backward("sr:inf", rl_op("stable_reinforce", d, config={"kl_coeff": 0.1}))
    assert engine.state_digest("sr:inf") == digest
    assert same_grads(grads, engine.adapter_grads("sr:inf"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({SAMPLED_MASK: Array.from_list([0.0, 0.5, 1.0], "float32")}, "sampled_mask values must be 0 or 1"),
        ({"advantages": Array.from_list([1.0, 0.0, 0.0], "float32")}, "trains only sampled tokens"),
        ({RECORDED_LOGPROBS: None}, "needs loss_fn_inputs\\['recorded_logprobs'\\]"),
        ({"weights": Array.from_list([1.0, 1.0, 1.0], "float32")}, "does not use loss_fn_inputs"),
    ],
)
def test_engine_checks_the_resolved_inputs(engine: TorchEngine, change: dict[str, Array | None], message: str) -> None:
    run = f"sr:bad:{message}"
    engine.create_run(run, TINY, lora(seed=2))
    inputs = {
        "target_tokens": Array.from_list([2, 3, 4], "int64"),
        "advantages": Array.from_list([0.0, 1.0, 1.0], "float32"),
        RECORDED_LOGPROBS: Array.from_list([0.0, -1.0, -2.0], "float32"),
        SAMPLED_MASK: Array.from_list([0.0, 1.0, 1.0], "float32"),
    }
    for key, value in change.items():
        if value is None:
            inputs.pop(key)
        else:
            inputs[key] = value
    digest = engine.state_digest(run)
    with pytest.raises(OpInputError, match=message):
        engine.forward_backward(run, rl_op("stable_reinforce", Datum(tokens=(1, 2, 3), loss_fn_inputs=inputs)))
    assert engine.state_digest(run) == digest


def test_config_is_checked() -> None:
    assert resolve_loss_config("stable_reinforce", {}) == {"clip_high_threshold": 2.0, "kl_coeff": 0.0}
    for bad, message in (
        ({"kl_coeff": -1.0}, "kl_coeff >= 0"),
        ({"clip_high_threshold": 0.0}, "clip_high_threshold > 0"),
        ({"clip_low_threshold": 0.5}, "not used by stable_reinforce"),
    ):
        with pytest.raises(ValueError, match=message):
            resolve_loss_config("stable_reinforce", bad)
