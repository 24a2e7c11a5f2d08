"""Per-token objectives of the built-in losses (docs/losses.md has the formulas and their sources).

Each function maps one micro-batch, flattened datum after datum, to a per-token loss whose sum is
the op's loss (a *sum* over tokens, like cross_entropy). Tensors are flat [M]; `segment[t]` is the
index, within the micro-batch, of the datum that token t belongs to; datums never straddle two
micro-batches, so per-datum quantities (GSPO's sequence ratio) are computed here whole.

Numerics. Importance ratios exp(logp - sampler_logp) can overflow float32, and `inf * 0` is NaN,
in the loss or, worse, in the gradient. So:
- a token with advantage 0 contributes exactly 0 (whatever its ratio): prompt positions usually
  carry sampler logprob 0 and advantage 0, and must not poison the batch;
- a ratio with a gradient is only exponentiated where its branch is the one used (PPO's clipped
  branch and a zero advantage take no gradient), so a clipped-away overflow stays harmless;
- a ratio that is really used and overflows makes the loss infinite, which the caller turns into an
  error before any backward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from app.domain.provenance import RECORDED_LOGPROBS, SAMPLED_MASK

# Metric keys each loss reports besides `loss:sum` (tinker-protocol.md §6.3: `name:reduction`).
RATIO_MEAN = "ratio_mean:mean"
CLIP_FRACTION = "clip_fraction:mean"
EXTRA_METRICS: Mapping[str, tuple[str, ...]] = {
    "cross_entropy": (),
    "importance_sampling": (RATIO_MEAN,),
    "ppo": (RATIO_MEAN, CLIP_FRACTION),
    "cispo": (RATIO_MEAN, CLIP_FRACTION),
    "dro": (),
    "gspo": (RATIO_MEAN, CLIP_FRACTION),
    "stable_reinforce": (RATIO_MEAN, CLIP_FRACTION),
}


@dataclass(frozen=True)
class Terms:
    token_loss: torch.Tensor  # [M]; its sum is the micro-batch's loss
    # Per datum [G], detached, for the metrics: the mean importance ratio over the datum's tokens
    # with a non-zero advantage (1 if none), and the fraction of those tokens whose ratio lies
    # outside [clip_low_threshold, clip_high_threshold] (0 if none).
    ratio_mean: torch.Tensor | None = None
    clip_fraction: torch.Tensor | None = None


@dataclass(frozen=True)
class Batch:
    """One micro-batch: the model's logprobs (with grad unless forward-only) and the inputs."""

    logprobs: torch.Tensor  # float32 [M]
    inputs: Mapping[str, torch.Tensor]  # float32 [M] each, by loss_fn_inputs name
    segment: torch.Tensor  # int64 [M]
    datums: int  # G
    config: Mapping[str, float]


def _zeros(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like)


def _per_datum_mean(values: torch.Tensor, where: torch.Tensor, b: Batch, empty: float) -> torch.Tensor:
    """Mean of `values` over the tokens selected by `where`, per datum [G]; `empty` where none."""
    picked = torch.where(where, values, _zeros(values))
    sums = values.new_zeros(b.datums).index_add_(0, b.segment, picked)
    counts = values.new_zeros(b.datums).index_add_(0, b.segment, where.to(values.dtype))
    return torch.where(counts > 0, sums / counts.clamp_min(1.0), torch.full_like(sums, empty))


def _ratio_stats(ratio: torch.Tensor, active: torch.Tensor, b: Batch, clip: bool) -> dict[str, torch.Tensor]:
    stats = {"ratio_mean": _per_datum_mean(ratio, active, b, empty=1.0)}
    if clip:
        low, high = b.config["clip_low_threshold"], b.config["clip_high_threshold"]
        outside = ((ratio < low) | (ratio > high)).to(ratio.dtype)
        stats["clip_fraction"] = _per_datum_mean(outside, active, b, empty=0.0)
    return stats


def cross_entropy(b: Batch) -> Terms:
    return Terms(token_loss=-(b.logprobs * b.inputs["weights"]))


def importance_sampling(b: Batch) -> Terms:
    """-Σ_t r_t · A_t with r_t = exp(logp_t - q_t), unclipped; the gradient flows through r_t."""
    logp, q, adv = b.logprobs, b.inputs["logprobs"], b.inputs["advantages"]
    active = adv != 0
    log_ratio = logp - q
    live = torch.exp(torch.where(active, log_ratio, _zeros(log_ratio)))
    token_loss = -torch.where(active, live * adv, _zeros(adv))
    return Terms(token_loss, **_ratio_stats(torch.exp(log_ratio.detach()), active, b, clip=False))


def _clipped_surrogate(
    b: Batch, ratio: torch.Tensor, live_ratio: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Per-token -min(r·A, clip(r, low, high)·A) given detached ratios `ratio`.

    `live_ratio(mask)` must return a tensor equal to `ratio` where `mask` holds, carrying the
    gradient, and finite elsewhere. Where the clipped branch is the minimum, r lies outside the
    range, so that branch is a constant: no gradient, exactly as in PPO.
    """
    adv = b.inputs["advantages"]
    low, high = b.config["clip_low_threshold"], b.config["clip_high_threshold"]
    active = adv != 0
    clipped = ratio.clamp(low, high)
    take_clipped = active & (clipped * adv < ratio * adv)
    live = active & ~take_clipped
    objective = torch.where(live, live_ratio(live) * adv, torch.where(take_clipped, clipped * adv, _zeros(adv)))
    return -objective


def ppo(b: Batch) -> Terms:
    """-Σ_t min(r_t·A_t, clip(r_t, low, high)·A_t), token-wise (the Tinker docs' PPO)."""
    log_ratio = b.logprobs - b.inputs["logprobs"]
    ratio = torch.exp(log_ratio.detach())

    def live_ratio(mask: torch.Tensor) -> torch.Tensor:
        return torch.exp(torch.where(mask, log_ratio, _zeros(log_ratio)))

    active = b.inputs["advantages"] != 0
    return Terms(_clipped_surrogate(b, ratio, live_ratio), **_ratio_stats(ratio, active, b, clip=True))


def cispo(b: Batch) -> Terms:
    """-Σ_t sg(clip(r_t, low, high)) · A_t · logp_t: the clipped ratio only weighs the log-likelihood."""
    adv = b.inputs["advantages"]
    low, high = b.config["clip_low_threshold"], b.config["clip_high_threshold"]
    ratio = torch.exp((b.logprobs - b.inputs["logprobs"]).detach())
    coefficient = ratio.clamp(low, high) * adv  # finite even where the ratio overflowed
    return Terms(-(coefficient * b.logprobs), **_ratio_stats(ratio, adv != 0, b, clip=True))


def dro(b: Batch) -> Terms:
    """-Σ_t (A_t·logp_t - β/2·(logp_t - q_t)²), the Tinker docs' DRO objective."""
    logp, q, adv = b.logprobs, b.inputs["logprobs"], b.inputs["advantages"]
    beta = b.config["beta"]
    return Terms(-(logp * adv - 0.5 * beta * (logp - q) ** 2))


def gspo(b: Batch) -> Terms:
    """GSPO-token (arXiv 2507.18071 §4.3) with a sum over tokens.

    s = exp(mean over the datum's masked tokens of (logp - q)), one ratio per datum; token t uses
    s_t = sg(s)·exp(logp_t - sg(logp_t)) (value s, gradient s·∇logp_t) in PPO's clipped surrogate.
    The mask is `sequence_ratio_mask`; losses.py fills in, for a datum without one, the tokens with a
    non-zero advantage (prompt positions carry advantage 0 and no meaningful sampler logprob).
    """
    logp, q, adv = b.logprobs, b.inputs["logprobs"], b.inputs["advantages"]
    active = adv != 0
    mask = b.inputs["sequence_ratio_mask"] != 0
    log_ratio = (logp - q).detach()
    sequence_ratio = torch.exp(_per_datum_mean(log_ratio, mask, b, empty=0.0))
    ratio = sequence_ratio[b.segment]
    # exp(logp - sg(logp)) is 1 with gradient ∇logp; only multiplied by a finite s where live.
    unit = torch.exp(logp - logp.detach())

    def live_ratio(live: torch.Tensor) -> torch.Tensor:
        return torch.where(live, ratio, _zeros(ratio)) * unit

    return Terms(_clipped_surrogate(b, ratio, live_ratio), **_ratio_stats(ratio, active, b, clip=True))


def stable_reinforce(b: Batch) -> Terms:
    """TuFT's reading of StableReinforce (docs/losses.md; Tinker has not published its objective).

    REINFORCE on the sampled tokens, each weighted by its importance ratio against the sampler's
    *recorded* logprob q_t (not the client's), truncated at c = clip_high_threshold and without
    gradient, plus β = kl_coeff times the k3 estimate of KL(sampler || policy):

        loss = Σ_t m_t · ( -sg(min(r_t, c)) · A_t · logp_t + β · (r_t - 1 - log r_t) ),  r_t = exp(logp_t - q_t)

    m_t (`sampled_mask`) is 1 on sampled targets. The truncation bounds each token's weight
    however stale the sampler was (a ratio that overflowed weighs c); the penalty's gradient
    β·(r_t - 1)·∇logp_t pulls the policy back towards the sampler and vanishes on-policy.
    """
    logp, q, adv = b.logprobs, b.inputs[RECORDED_LOGPROBS], b.inputs["advantages"]
    sampled = b.inputs[SAMPLED_MASK] != 0
    cap, beta = b.config["clip_high_threshold"], b.config["kl_coeff"]
    log_ratio = torch.where(sampled, logp - q, _zeros(logp))
    ratio = torch.exp(log_ratio.detach())
    weight = ratio.clamp(max=cap)  # finite even where the ratio overflowed
    token_loss = -torch.where(sampled, weight * adv * logp, _zeros(logp))
    if beta > 0:
        # Only here is the ratio exponentiated with a gradient: with β = 0 an overflow is harmless.
        token_loss = token_loss + beta * (torch.exp(log_ratio) - 1.0 - log_ratio)
    active = sampled & (adv != 0)
    return Terms(
        token_loss,
        ratio_mean=_per_datum_mean(ratio, active, b, empty=1.0),
        clip_fraction=_per_datum_mean((ratio > cap).to(ratio.dtype), active, b, empty=0.0),
    )


OBJECTIVES: Mapping[str, Callable[[Batch], Terms]] = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
    "dro": dro,
    "gspo": gspo,
    "stable_reinforce": stable_reinforce,
}
