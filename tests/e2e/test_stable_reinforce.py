"""StableReinforce through the real tinker SDK (0.38) against a live server, the way
tinker-cookbook 0.6.1's rl_loop recipe does it: sample from
save_weights_and_get_sampling_client(record_stability_info=True), name each sequence by its
sequence_id in Datum.with_provenance, train with loss_fn="stable_reinforce"; the loss matches
the reference computed from the returned logprobs and the sampler's, on- and off-policy."""

from __future__ import annotations

from typing import Any

import pytest
import tinker
import torch
from tinker import types

from tests.e2e.server import LiveServer
from tests.e2e.test_training import PROMPT, client_for, new_training, resolved

pytestmark = pytest.mark.e2e

if not hasattr(types, "SampledProvenanceSpan"):  # SDK 0.25 has neither the loss nor provenance
    pytest.skip("stable_reinforce needs SDK 0.38", allow_module_level=True)


def _datum(sequence: Any, advantage: float) -> types.Datum:
    """rl_loop's layout: prompt + sampled[:-1] in, shifted targets, advantage on sampled targets."""
    sampled = list(sequence.tokens)
    ob = len(PROMPT) - 1
    n = ob + len(sampled)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(PROMPT + sampled[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=PROMPT[1:] + sampled, dtype="int64", shape=[n]),
            "logprobs": types.TensorData(data=[0.0] * ob + list(sequence.logprobs), dtype="float32", shape=[n]),
            "advantages": types.TensorData(data=[0.0] * ob + [advantage] * len(sampled), dtype="float32", shape=[n]),
        },
    )
    sid = sequence.sequence_id
    return datum.with_provenance(
        model_input=[
            types.PromptProvenanceSpan(sequence_id=sid, length=len(PROMPT)),
            types.SampledProvenanceSpan(sequence_id=sid, length=len(sampled) - 1),
        ],
        loss_fn_inputs=[
            types.PromptProvenanceSpan(sequence_id=sid, offset=1, length=ob),
            types.SampledProvenanceSpan(sequence_id=sid, length=len(sampled)),
        ],
    )


def _reference(result: Any, sequences: list[Any], advantages: list[float], cap: float, beta: float) -> float:
    """docs/losses.md: Σ over sampled targets of -min(r, c)·A·logp + β·(r - 1 - log r)."""
    total = 0.0
    for out, seq, adv in zip(result.loss_fn_outputs, sequences, advantages, strict=True):
        lp = out["logprobs"].to_torch()[len(PROMPT) - 1 :]
        log_r = lp - torch.tensor(seq.logprobs, dtype=torch.float32)
        r = torch.exp(log_r)
        total += float((-torch.clamp(r, max=cap) * adv * lp + beta * (r - 1 - log_r)).sum())
    return total


def test_cookbook_rl_loop_flow_with_stable_reinforce(embedded_server: LiveServer) -> None:
    training = new_training(client_for(embedded_server))
    sampler = resolved(training.save_weights_and_get_sampling_client(record_stability_info=True))
    out = sampler.sample(
        prompt=types.ModelInput.from_ints(PROMPT),
        num_samples=2,
        sampling_params=types.SamplingParams(max_tokens=4, temperature=1.0, seed=5, stop=[]),
    ).result(timeout=60)
    sequences = list(out.sequences)
    assert len({s.sequence_id for s in sequences}) == 2
    advantages = [1.0, -0.5]
    data = [_datum(s, a) for s, a in zip(sequences, advantages, strict=True)]

    # On-policy (the sampler holds the training weights): ratios ~1, plain REINFORCE.
    first = training.forward_backward(data, "stable_reinforce").result(timeout=60)
    assert set(first.metrics) == {"loss:sum", "ratio_mean:mean", "clip_fraction:mean"}
    assert first.metrics["ratio_mean:mean"] == pytest.approx(1.0, abs=1e-3)
    assert first.metrics["loss:sum"] == pytest.approx(_reference(first, sequences, advantages, 2.0, 0.0), abs=1e-4)
    training.optim_step(types.AdamParams(learning_rate=5e-2)).result(timeout=60)

    # Off-policy now: the same sequences, the recorded logprobs are the old sampler's.
    config = {"clip_high_threshold": 1.05, "kl_coeff": 0.2}
    second = training.forward_backward(data, "stable_reinforce", config).result(timeout=60)
    assert second.metrics["ratio_mean:mean"] != pytest.approx(1.0, abs=1e-4)
    want = _reference(second, sequences, advantages, 1.05, 0.2)
    assert second.metrics["loss:sum"] == pytest.approx(want, rel=1e-4, abs=1e-4)

    # A sequence id the server never recorded fails the future and names it.
    bogus = types.SampledSequence(
        stop_reason="length",
        sequence_id="req-bogus:0",
        _tokens_list=list(sequences[0].tokens),
        _logprobs_list=list(sequences[0].logprobs),
    )
    with pytest.raises(tinker.RequestFailedError, match=r"req-bogus:0.*no stability record"):
        training.forward_backward([_datum(bogus, 1.0)], "stable_reinforce").result(timeout=60)
    # So does one sampled without record_stability_info.
    plain = resolved(training.save_weights_and_get_sampling_client())
    unrecorded = plain.sample(
        prompt=types.ModelInput.from_ints(PROMPT), num_samples=1, sampling_params=types.SamplingParams(max_tokens=2)
    ).result(timeout=60)
    with pytest.raises(tinker.RequestFailedError, match="no stability record"):
        training.forward_backward([_datum(unrecorded.sequences[0], 1.0)], "stable_reinforce").result(timeout=60)


def test_cookbook_multi_turn_data_trains_with_stable_reinforce(embedded_server: LiveServer) -> None:
    """tinker-cookbook 0.6.1's own code builds the data: its TinkerTokenCompleter (which keeps each
    sample's sequence_id) plays two turns, and rl.data_processing.trajectory_to_data merges them
    into one datum with provenance naming both sequences, as its async RL does."""
    pytest.importorskip("tinker_cookbook", reason="tinker-cookbook is not installed here (make cookbook)")
    import asyncio
    import dataclasses

    from tinker_cookbook.completers import TinkerTokenCompleter
    from tinker_cookbook.rl.data_processing import trajectory_to_data
    from tinker_cookbook.rl.types import Trajectory, Transition

    training = new_training(client_for(embedded_server))
    sampler = resolved(training.save_weights_and_get_sampling_client(record_stability_info=True))
    completer = TinkerTokenCompleter(sampling_client=sampler, max_tokens=3)
    ob1 = types.ModelInput.from_ints(PROMPT)
    ac1 = asyncio.run(completer(ob1, []))
    ob2 = types.ModelInput.from_ints([*PROMPT, *ac1.tokens, 9])
    ac2 = asyncio.run(completer(ob2, []))
    assert ac1.sequence_id and ac2.sequence_id and ac1.sequence_id != ac2.sequence_id
    trajectory = Trajectory(
        transitions=[
            Transition(ob=ob1, ac=ac1, reward=0.0, episode_done=False),
            Transition(ob=ob2, ac=ac2, reward=1.0, episode_done=True),
        ],
        final_ob=types.ModelInput.from_ints([]),
    )
    (datum,) = trajectory_to_data(trajectory, traj_advantage=0.75)
    assert datum.loss_fn_input_spans is not None
    assert {span.sequence_id for span in datum.loss_fn_input_spans} == {ac1.sequence_id, ac2.sequence_id}
    # The cookbook's train step drops its "mask" input before sending (rl/train.py::_remove_mask).
    datum = dataclasses.replace(datum, loss_fn_inputs={k: v for k, v in datum.loss_fn_inputs.items() if k != "mask"})

    result = training.forward_backward([datum], "stable_reinforce").result(timeout=60)
    lp = result.loss_fn_outputs[0]["logprobs"].to_torch()
    adv = torch.tensor(datum.loss_fn_inputs["advantages"].data)
    sampled = adv != 0  # the cookbook puts the advantage on exactly the sampled targets here
    q = torch.tensor(datum.loss_fn_inputs["logprobs"].data)  # the sampler's logprobs, as recorded
    assert int(sampled.sum()) == len(ac1.tokens) + len(ac2.tokens)
    r = torch.exp(lp - q)[sampled]
    want = float((-torch.clamp(r, max=2.0) * adv[sampled] * lp[sampled]).sum())
    assert result.metrics["loss:sum"] == pytest.approx(want, rel=1e-4, abs=1e-4)
    assert result.metrics["ratio_mean:mean"] == pytest.approx(1.0, abs=1e-3)
