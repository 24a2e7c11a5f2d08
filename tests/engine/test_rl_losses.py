"""The RL losses (importance_sampling, ppo, cispo, dro, gspo): values against plain-torch references
computed from the engine's own logprobs, gradients, purity of forward_only, input validation (engine
and API), and a small learning check."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest
import torch

from app.api.validation import check_forward_backward
from app.domain.errors import InvalidInput
from app.domain.ops import AdamParams, Datum, ForwardBackwardOp, OptimStepOp, resolve_loss_config
from app.domain.results import ForwardBackwardResult
from app.domain.tensors import Array
from tests.engine.helpers import ON_GPU, TINY, datum, fb, lora, ref_tol, same_grads, set_micro_batch_tokens
from workers.engine import OpInputError, TorchEngine

SEQ_A = [101, 57, 12, 7, 102, 55, 66, 9, 31]  # 8 positions: 3 "prompt", 5 "response"
SEQ_B = [3, 1000, 151_000, 42, 77]  # 4 positions: 1 "prompt", 3 "response"
PROMPT = {len(SEQ_A): 3, len(SEQ_B): 1}
CONFIGS: dict[str, dict[str, float]] = {
    "importance_sampling": {},
    "ppo": {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1},
    "cispo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.15},
    "dro": {"beta": 0.5},
    "gspo": {"clip_low_threshold": 0.95, "clip_high_threshold": 1.05},
}
RL_LOSSES = sorted(CONFIGS)


# -- builders ---------------------------------------------------------------------------------


def rl_datum(seq: Sequence[int], sampler: Sequence[float], advantages: Sequence[float], **extra: Array) -> Datum:
    inputs = {
        "target_tokens": Array.from_list(list(seq[1:]), "int64"),
        "logprobs": Array.from_list(list(sampler), "float32"),
        "advantages": Array.from_list(list(advantages), "float32"),
        **extra,
    }
    return Datum(tokens=tuple(seq[:-1]), loss_fn_inputs=inputs)


def rl_op(
    loss_fn: str, *data: Datum, forward_only: bool = False, config: Mapping[str, float | str] | None = None
) -> ForwardBackwardOp:
    return ForwardBackwardOp(data=data, loss_fn=loss_fn, loss_fn_config=dict(config or {}), forward_only=forward_only)


def logprobs_of(result: ForwardBackwardResult) -> list[torch.Tensor]:
    return [torch.tensor(out["logprobs"].tolist()) for out in result.outputs]


def model_logprobs(engine: TorchEngine, run: str, *seqs: Sequence[int]) -> list[torch.Tensor]:
    return logprobs_of(engine.forward_backward(run, fb(*(datum(s) for s in seqs), forward_only=True)))


def advantages_for(n: int, seed: int, constant: bool) -> torch.Tensor:
    """0 on the prompt positions; on the response, one value (GRPO-style) or one per token."""
    g = torch.Generator().manual_seed(seed)
    adv = torch.zeros(n)
    response = n - PROMPT[n + 1]
    adv[-response:] = torch.randn(1, generator=g) if constant else torch.randn(response, generator=g)
    return adv


def sampler_for(lp: torch.Tensor, seed: int, spread: float = 0.3) -> torch.Tensor:
    """Sampler logprobs near the model's (ratios around 1, some outside the clip ranges); the prompt
    positions carry 0, as RL data usually does."""
    g = torch.Generator().manual_seed(seed)
    q = lp + spread * torch.randn(lp.shape, generator=g)
    q[: PROMPT[lp.shape[0] + 1]] = 0.0
    return q


def twin_runs(engine: TorchEngine, name: str) -> tuple[str, str]:
    """Two runs with identical weights, LoRA B non-zero so every parameter gets a gradient."""
    runs = (f"{name}:x", f"{name}:y")
    for run in runs:
        engine.create_run(run, TINY, lora(seed=3))
        engine.forward_backward(run, fb(datum([5, 6, 7, 8])))
        engine.optim_step(run, OptimStepOp(adam=AdamParams(learning_rate=1e-2)))
    return runs


def assert_grads_close(got: Mapping[str, torch.Tensor | None], want: Mapping[str, torch.Tensor | None]) -> None:
    assert got.keys() == want.keys()
    for key, g in got.items():
        w = want[key]
        assert g is not None and w is not None, key
        assert torch.isfinite(g).all(), key
        scale = max(float(w.abs().max()), 1e-12)
        # bfloat16 base weights on a GPU: differently batched sums agree to ~1e-3 of the scale.
        tol = 1e-2 if ON_GPU else 1e-4
        torch.testing.assert_close(g, w, atol=tol * scale, rtol=tol)


def all_zero(grads: Mapping[str, torch.Tensor | None]) -> bool:
    return all(g is not None and torch.isfinite(g).all() and not g.any() for g in grads.values())


# -- plain-torch references -------------------------------------------------------------------


def reference(
    loss_fn: str,
    lps: list[torch.Tensor],
    qs: list[torch.Tensor],
    advs: list[torch.Tensor],
    config: Mapping[str, float],
    masks: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss, extra metrics) written straight from the formulas in docs/losses.md.

    GSPO here is the *sequence-level* form (the ratio's gradient goes through the mean over the
    mask); it equals the engine's GSPO-token form in value always, and in gradient when the
    advantage is constant over the mask and zero elsewhere.
    """
    full = resolve_loss_config(loss_fn, config)
    low, high = full.get("clip_low_threshold", 0.0), full.get("clip_high_threshold", 0.0)
    total = torch.zeros(())
    ratio_means, clip_fractions = [], []
    for d, (lp, q, adv) in enumerate(zip(lps, qs, advs, strict=True)):
        active = adv != 0
        if loss_fn == "gspo":
            mask = masks[d].bool() if masks is not None else active
            ratio = torch.exp((lp - q)[mask].mean()) * torch.ones_like(lp)
        else:
            ratio = torch.exp(lp - q)
        if loss_fn == "importance_sampling":
            total = total - (ratio * adv)[active].sum()
        elif loss_fn in ("ppo", "gspo"):
            total = total - torch.min(ratio * adv, ratio.clamp(low, high) * adv)[active].sum()
        elif loss_fn == "cispo":
            total = total - (ratio.clamp(low, high).detach() * adv * lp).sum()
        elif loss_fn == "dro":
            total = total - (lp * adv - 0.5 * full["beta"] * (lp - q) ** 2).sum()
        r = ratio.detach()[active]
        ratio_means.append(float(r.mean()) if active.any() else 1.0)
        outside = ((r < low) | (r > high)).float()
        clip_fractions.append(float(outside.mean()) if active.any() else 0.0)
    metrics = {}
    if loss_fn != "dro":
        metrics["ratio_mean:mean"] = sum(ratio_means) / len(lps)
    if loss_fn in ("ppo", "cispo", "gspo"):
        metrics["clip_fraction:mean"] = sum(clip_fractions) / len(lps)
    return total, metrics


# -- values and gradients ---------------------------------------------------------------------


@pytest.mark.parametrize("loss_fn", RL_LOSSES)
def test_loss_metrics_and_gradient_match_the_reference(engine: TorchEngine, loss_fn: str) -> None:
    run, twin = twin_runs(engine, f"ref:{loss_fn}")
    lps = model_logprobs(engine, run, SEQ_A, SEQ_B)
    # GSPO-token and sequence-level GSPO share gradients only for per-sequence advantages.
    advs = [advantages_for(lp.shape[0], seed=i, constant=loss_fn == "gspo") for i, lp in enumerate(lps)]
    qs = [sampler_for(lp, seed=10 + i, spread=0.15) for i, lp in enumerate(lps)]
    data = [rl_datum(s, q.tolist(), a.tolist()) for s, q, a in zip((SEQ_A, SEQ_B), qs, advs, strict=True)]
    config = CONFIGS[loss_fn]

    forward = engine.forward_backward(run, rl_op(loss_fn, *data, forward_only=True, config=config))
    leaves = [lp.clone().requires_grad_(True) for lp in lps]
    want_loss, want_metrics = reference(loss_fn, leaves, qs, advs, config)
    assert forward.metrics.keys() == {"loss:sum", *want_metrics}
    assert forward.metrics["loss:sum"] == pytest.approx(float(want_loss.detach()), rel=1e-5, abs=1e-5)
    for key, value in want_metrics.items():
        assert forward.metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for got, lp in zip(logprobs_of(forward), lps, strict=True):
        assert torch.equal(got, lp)
    if loss_fn in ("ppo", "cispo"):
        assert 0 < forward.metrics["clip_fraction:mean"] < 1  # both branches exercised

    # forward_backward reports exactly what forward reported ...
    trained = engine.forward_backward(run, rl_op(loss_fn, *data, config=config))
    assert trained.metrics == forward.metrics
    # ... and its gradient is the reference's, pushed through the logprobs: cross_entropy with
    # weights -dL/dlogp (the SDK's custom-loss trick) accumulates the same gradient on the twin.
    want_loss.backward()
    weights = [-(leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)) for leaf in leaves]
    assert any(w.abs().sum() > 0 for w in weights)
    engine.forward_backward(twin, fb(*(datum(s, w.tolist()) for s, w in zip((SEQ_A, SEQ_B), weights, strict=True))))
    assert_grads_close(engine.adapter_grads(run), engine.adapter_grads(twin))


def test_gspo_with_per_token_advantages_and_an_explicit_mask(engine: TorchEngine) -> None:
    engine.create_run("gspo:mask", TINY, lora())
    (lp,) = model_logprobs(engine, "gspo:mask", SEQ_A)
    adv = advantages_for(lp.shape[0], seed=4, constant=False)
    q = sampler_for(lp, seed=5, spread=0.05)
    mask = torch.tensor([0, 0, 0, 1, 1, 0, 1, 1], dtype=torch.float32)  # not the advantage's support
    d = rl_datum(SEQ_A, q.tolist(), adv.tolist(), sequence_ratio_mask=Array.from_list(mask.tolist(), "float32"))
    config = {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}
    got = engine.forward_backward("gspo:mask", rl_op("gspo", d, forward_only=True, config=config))
    want, metrics = reference("gspo", [lp], [q], [adv], config, masks=[mask])
    assert got.metrics["loss:sum"] == pytest.approx(float(want), rel=1e-5, abs=1e-6)
    assert got.metrics["ratio_mean:mean"] == pytest.approx(metrics["ratio_mean:mean"], rel=1e-6)
    # Without the mask the ratio is over the advantage's support: a different value.
    default = engine.forward_backward(
        "gspo:mask", rl_op("gspo", rl_datum(SEQ_A, q.tolist(), adv.tolist()), config=config)
    )
    assert default.metrics["ratio_mean:mean"] != got.metrics["ratio_mean:mean"]


def test_config_defaults_are_the_documented_ones(engine: TorchEngine) -> None:
    engine.create_run("defaults", TINY, lora())
    lps = model_logprobs(engine, "defaults", SEQ_A, SEQ_B)
    advs = [advantages_for(lp.shape[0], seed=i, constant=False) for i, lp in enumerate(lps)]
    qs = [sampler_for(lp, seed=20 + i, spread=0.5) for i, lp in enumerate(lps)]
    data = [rl_datum(s, q.tolist(), a.tolist()) for s, q, a in zip((SEQ_A, SEQ_B), qs, advs, strict=True)]
    documented = {
        "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
        "cispo": {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0},
        "dro": {"beta": 0.01},
        "gspo": {"clip_low_threshold": 0.9997, "clip_high_threshold": 1.0004},
    }
    for loss_fn, config in documented.items():
        implicit = engine.forward_backward("defaults", rl_op(loss_fn, *data, forward_only=True))
        explicit = engine.forward_backward("defaults", rl_op(loss_fn, *data, forward_only=True, config=config))
        assert implicit.metrics == explicit.metrics, loss_fn
        want, _ = reference(loss_fn, lps, qs, advs, {})
        assert implicit.metrics["loss:sum"] == pytest.approx(float(want.detach()), rel=1e-5, abs=1e-5), loss_fn


def test_micro_batching_does_not_change_the_result(engine: TorchEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    run, twin = twin_runs(engine, "micro")
    lps = model_logprobs(engine, run, SEQ_A, SEQ_B)
    advs = [advantages_for(lp.shape[0], seed=i, constant=False) for i, lp in enumerate(lps)]
    qs = [sampler_for(lp, seed=30 + i) for i, lp in enumerate(lps)]
    data = [rl_datum(s, q.tolist(), a.tolist()) for s, q, a in zip((SEQ_A, SEQ_B), qs, advs, strict=True)]
    config = CONFIGS["gspo"]
    together = engine.forward_backward(run, rl_op("gspo", *data, config=config))
    set_micro_batch_tokens(monkeypatch, engine, 8)  # one datum per micro-batch
    apart = engine.forward_backward(twin, rl_op("gspo", *data, config=config))
    assert apart.metrics == pytest.approx(together.metrics, rel=1e-5, abs=ref_tol(0.0))
    assert_grads_close(engine.adapter_grads(twin), engine.adapter_grads(run))


# -- gradients where clipping or zero advantages switch them off --------------------------------


def test_zero_advantages_give_a_zero_gradient_even_with_overflowing_ratios(engine: TorchEngine) -> None:
    engine.create_run("is:zero", TINY, lora(seed=2))
    (lp,) = model_logprobs(engine, "is:zero", SEQ_A)
    n = lp.shape[0]
    for sampler in (lp - 0.3, lp - 200.0):  # exp(200) overflows float32
        d = rl_datum(SEQ_A, sampler.tolist(), [0.0] * n)
        result = engine.forward_backward("is:zero", rl_op("importance_sampling", d))
        assert result.metrics["loss:sum"] == 0.0
        assert result.metrics["ratio_mean:mean"] == 1.0  # no token with an advantage
        assert all_zero(engine.adapter_grads("is:zero"))


@pytest.mark.parametrize(
    ("shift", "advantage", "clipped"),
    [
        (-1.0, 1.0, True),  # ratio e > 1.2, A > 0: min takes 1.2·A, a constant
        (-200.0, 1.0, True),  # the same with a ratio that overflows float32
        (1.0, -1.0, True),  # ratio 1/e < 0.8, A < 0: min takes 0.8·A
        (-1.0, -1.0, False),  # ratio e, A < 0: min takes r·A, the gradient flows
        (1.0, 1.0, False),  # ratio 1/e, A > 0: min takes r·A
    ],
)
def test_ppo_clipped_branch_has_no_gradient(engine: TorchEngine, shift: float, advantage: float, clipped: bool) -> None:
    run = f"ppo:clip:{shift}:{advantage}"
    engine.create_run(run, TINY, lora(seed=2))
    (lp,) = model_logprobs(engine, run, SEQ_A)
    n = lp.shape[0]
    d = rl_datum(SEQ_A, (lp + shift).tolist(), [advantage] * n)
    result = engine.forward_backward(run, rl_op("ppo", d))
    grads = engine.adapter_grads(run)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    if clipped:
        bound = 1.2 if advantage > 0 else 0.8
        assert result.metrics["loss:sum"] == pytest.approx(-bound * advantage * n, rel=1e-5)
        assert result.metrics["clip_fraction:mean"] == 1.0
        assert all_zero(grads)
    else:
        expected = -float(torch.exp(-torch.tensor(shift))) * advantage * n
        assert result.metrics["loss:sum"] == pytest.approx(expected, rel=1e-5)
        assert not all_zero(grads)


def test_cispo_never_propagates_through_the_ratio(engine: TorchEngine) -> None:
    """An overflowing ratio is clipped to clip_high_threshold and only weighs ∇logp."""
    run, twin = twin_runs(engine, "cispo:overflow")
    (lp,) = model_logprobs(engine, run, SEQ_A)
    n = lp.shape[0]
    result = engine.forward_backward(run, rl_op("cispo", rl_datum(SEQ_A, (lp - 200.0).tolist(), [0.5] * n)))
    assert result.metrics["loss:sum"] == pytest.approx(-4.0 * 0.5 * float(lp.sum()), rel=1e-5)
    engine.forward_backward(twin, fb(datum(SEQ_A, [4.0 * 0.5] * n)))  # same gradient as CE weights 2
    assert_grads_close(engine.adapter_grads(run), engine.adapter_grads(twin))


# -- non-finite losses, forward_only --------------------------------------------------------


@pytest.mark.parametrize("loss_fn", ["importance_sampling", "ppo", "gspo"])
def test_infinite_loss_fails_and_rolls_back_earlier_micro_batches(
    engine: TorchEngine, monkeypatch: pytest.MonkeyPatch, loss_fn: str
) -> None:
    run = f"inf:{loss_fn}"
    engine.create_run(run, TINY, lora(seed=2))
    good_lp, bad_lp = model_logprobs(engine, run, SEQ_A, SEQ_B)
    # The longer datum runs first (microbatch.py), so `good` is backpropagated before `bad` fails.
    good = rl_datum(SEQ_A, (good_lp - 0.1).tolist(), [1.0] * good_lp.shape[0])
    # A ratio of exp(200) on a token whose advantage is negative: the loss is +inf.
    bad = rl_datum(SEQ_B, (bad_lp - 200.0).tolist(), [-1.0] * bad_lp.shape[0])
    engine.forward_backward(run, fb(datum(SEQ_A)))  # an accumulated gradient to protect
    digest, grads = engine.state_digest(run), engine.adapter_grads(run)
    set_micro_batch_tokens(monkeypatch, engine, 8)  # one datum per micro-batch
    with pytest.raises(OpInputError, match=r"datum 1, token 0: the .* loss is not finite"):
        engine.forward_backward(run, rl_op(loss_fn, good, bad))
    assert engine.state_digest(run) == digest
    assert same_grads(grads, engine.adapter_grads(run))
    # forward_only reports the value instead.
    forward = engine.forward_backward(run, rl_op(loss_fn, good, bad, forward_only=True))
    assert forward.metrics["loss:sum"] == float("inf")
    assert same_grads(grads, engine.adapter_grads(run))


@pytest.mark.parametrize("loss_fn", RL_LOSSES)
def test_forward_only_changes_nothing(engine: TorchEngine, loss_fn: str) -> None:
    run = f"pure:{loss_fn}"
    engine.create_run(run, TINY, lora(seed=2))
    (lp,) = model_logprobs(engine, run, SEQ_A)
    d = rl_datum(SEQ_A, sampler_for(lp, seed=1).tolist(), advantages_for(lp.shape[0], seed=1, constant=True).tolist())
    engine.forward_backward(run, rl_op(loss_fn, d))
    digest, grads = engine.state_digest(run), engine.adapter_grads(run)
    engine.forward_backward(run, rl_op(loss_fn, d, d, forward_only=True))
    assert engine.state_digest(run) == digest
    assert same_grads(grads, engine.adapter_grads(run))


# -- validation: the engine and the API reject the same ops -------------------------------------

F32 = [0.1, 0.2, 0.3]


def _d(**inputs: Array) -> Datum:
    base = {"target_tokens": Array.from_list([2, 3, 4], "int64")}
    return Datum(tokens=(1, 2, 3), loss_fn_inputs={**base, **inputs})


def _f(values: list[float], shape: tuple[int, ...] | None = None) -> Array:
    return Array.from_list(values, "float32", shape=shape)


GOOD = _d(logprobs=_f([-1.0, -2.0, -3.0]), advantages=_f([0.0, 1.0, 1.0]))
NAN = float("nan")
# name -> (loss_fn, loss_fn_config, bad datum, phrase of the error)
BAD_OPS: dict[str, tuple[str, dict[str, float | str], Datum, str]] = {
    "missing advantages": ("importance_sampling", {}, _d(logprobs=_f(F32)), "advantages"),
    "missing logprobs": ("ppo", {}, _d(advantages=_f(F32)), "'logprobs'"),
    "missing targets": (
        "cispo",
        {},
        Datum(tokens=(1, 2, 3), loss_fn_inputs={"logprobs": _f(F32), "advantages": _f(F32)}),
        "target_tokens",
    ),
    "short advantages": ("dro", {}, _d(logprobs=_f(F32), advantages=_f([1.0, 1.0])), "advantages"),
    "long logprobs": ("gspo", {}, _d(logprobs=_f([*F32, 0.0]), advantages=_f(F32)), "logprobs"),
    "nan advantage": ("ppo", {}, _d(logprobs=_f(F32), advantages=_f([1.0, NAN, 1.0])), "advantages"),
    "inf logprob": (
        "importance_sampling",
        {},
        _d(logprobs=_f([0.0, float("-inf"), 0.0]), advantages=_f(F32)),
        "logprobs",
    ),
    "int64 logprobs": (
        "importance_sampling",
        {},
        _d(logprobs=Array.from_list([1, 2, 3], "int64"), advantages=_f(F32)),
        "float32",
    ),
    "weights sent to an RL loss": ("ppo", {}, _d(logprobs=_f(F32), advantages=_f(F32), weights=_f(F32)), "weights"),
    "clip threshold as an input": (
        "ppo",
        {},
        _d(logprobs=_f(F32), advantages=_f(F32), clip_low_threshold=_f(F32)),
        "loss_fn_config",
    ),
    "non-binary sequence mask": (
        "gspo",
        {},
        _d(logprobs=_f(F32), advantages=_f(F32), sequence_ratio_mask=_f([1.0, 0.5, 0.0])),
        "0 or 1",
    ),
    "unknown config key": ("ppo", {"clip_ratio": 0.2}, GOOD, "clip_ratio"),
    "config for importance_sampling": ("importance_sampling", {"beta": 0.1}, GOOD, "beta"),
    "config for cross_entropy": ("cross_entropy", {"beta": 0.1}, GOOD, "beta"),
    "nan config": ("dro", {"beta": NAN}, GOOD, "finite"),
    "string config": ("ppo", {"clip_low_threshold": "0.8"}, GOOD, "number"),
    "low above high": ("cispo", {"clip_low_threshold": 2.0, "clip_high_threshold": 1.0}, GOOD, "clip_low_threshold"),
    "negative low": ("ppo", {"clip_low_threshold": -0.1}, GOOD, "clip_low_threshold"),
    "negative beta": ("dro", {"beta": -1.0}, GOOD, "beta"),
    "negative kl_coeff": ("stable_reinforce", {"kl_coeff": -0.1}, GOOD, "kl_coeff"),
    "server-side custom loss": ("custom", {"loss_id": "abc"}, GOOD, "not supported"),
    "unknown loss": ("grpo", {}, GOOD, "unknown loss"),
}


@pytest.mark.parametrize("case", sorted(BAD_OPS))
def test_bad_rl_op_is_rejected_before_any_state_changes(engine: TorchEngine, case: str) -> None:
    loss_fn, config, bad, phrase = BAD_OPS[case]
    run = "bad-rl"  # one run for every case: each must leave it exactly as it found it
    if not engine.has_run(run):
        engine.create_run(run, TINY, lora())
        engine.forward_backward(run, fb(datum(SEQ_B)))  # some accumulated gradient to protect
    digest, grads = engine.state_digest(run), engine.adapter_grads(run)
    good = GOOD if loss_fn != "cross_entropy" else datum([1, 2, 3, 4])
    with pytest.raises(OpInputError, match=phrase):
        # The good datum comes first: nothing may run until every datum has been validated.
        engine.forward_backward(run, rl_op(loss_fn, good, bad, config=config))
    assert engine.state_digest(run) == digest
    assert same_grads(grads, engine.adapter_grads(run))


@pytest.mark.parametrize("case", sorted(BAD_OPS))
def test_api_rejects_the_same_ops_at_submission(case: str) -> None:
    loss_fn, config, bad, phrase = BAD_OPS[case]
    good = GOOD if loss_fn != "cross_entropy" else datum([1, 2, 3, 4])
    with pytest.raises(InvalidInput, match=phrase):
        check_forward_backward(rl_op(loss_fn, good, bad, config=config), vocab=151_936, max_len=2048, max_datums=8)


def test_api_accepts_valid_rl_ops() -> None:
    mask = _f([0.0, 1.0, 1.0])
    for loss_fn, config in CONFIGS.items():
        check_forward_backward(rl_op(loss_fn, GOOD, config=config), vocab=151_936, max_len=2048, max_datums=8)
    check_forward_backward(
        rl_op("gspo", _d(logprobs=_f(F32), advantages=_f(F32), sequence_ratio_mask=mask)),
        vocab=151_936,
        max_len=2048,
        max_datums=8,
    )
    # cross_entropy stays lenient about inputs it does not read.
    check_forward_backward(rl_op("cross_entropy", GOOD), vocab=151_936, max_len=2048, max_datums=8)


def test_resolve_loss_config() -> None:
    assert resolve_loss_config("ppo", {}) == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    assert resolve_loss_config("ppo", {"clip_high_threshold": 1.5}) == {
        "clip_low_threshold": 0.8,
        "clip_high_threshold": 1.5,
    }
    assert resolve_loss_config("dro", {"beta": 0}) == {"beta": 0.0}
    assert resolve_loss_config("importance_sampling", {}) == {}
    with pytest.raises(ValueError, match=r"\['a', 'b'\] are not used by gspo; it accepts: clip_low_threshold"):
        resolve_loss_config("gspo", {"b": 1.0, "a": 2.0})


# -- learning ---------------------------------------------------------------------------------


def test_importance_sampling_with_positive_advantage_raises_the_sequence_logprob(engine: TorchEngine) -> None:
    engine.create_run("is:learn", TINY, lora(seed=7))
    (start,) = model_logprobs(engine, "is:learn", SEQ_A)
    n, prompt = start.shape[0], PROMPT[len(SEQ_A)]
    advantages = [0.0] * prompt + [1.0] * (n - prompt)
    # Sampled once by the starting policy: the later steps are off-policy, as in real RL.
    d = rl_datum(SEQ_A, [0.0] * prompt + start[prompt:].tolist(), advantages)
    history = []
    for _ in range(4):
        result = engine.forward_backward("is:learn", rl_op("importance_sampling", d))
        history.append(float(logprobs_of(result)[0][prompt:].sum()))
        engine.optim_step("is:learn", OptimStepOp(adam=AdamParams(learning_rate=1e-2)))
    (end,) = model_logprobs(engine, "is:learn", SEQ_A)
    history.append(float(end[prompt:].sum()))
    assert history == sorted(history) and history[-1] > history[0] + 1.0, history
