"""Negative controls: the checker's comparisons do see a one-ulp change in one weight or one
changed byte in one stored result (a checker that cannot fail proves nothing)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from tests.chaos.checker import Reference, _tensor_diff

pytestmark = [pytest.mark.chaos, pytest.mark.e2e]


def test_checker_sees_one_ulp_and_one_byte(references: Callable[[str], Reference]) -> None:
    reference = references("embedded")
    assert _tensor_diff(reference.tensors, dict(reference.tensors)) == []
    name = next(k for k in sorted(reference.tensors) if k.startswith("adapter/") and reference.tensors[k].numel())
    nudged = dict(reference.tensors)
    flat = reference.tensors[name].clone().reshape(-1)
    flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf"), dtype=flat.dtype))
    nudged[name] = flat.reshape(reference.tensors[name].shape)
    assert _tensor_diff(reference.tensors, nudged) == [name]

    # Every op of the script stored a result, and they differ from one another.
    assert sorted(reference.results) == list(range(1, 2 * reference.iterations + 2))
    losses = [loss for loss in reference.losses if loss is not None]
    assert len(set(losses)) == len(losses) == reference.iterations
    assert losses[-1] < 0.1 * losses[0], "the reference run did not learn"


@pytest.mark.postgres
@pytest.mark.redis
def test_reference_runs_agree_across_modes(references: Callable[[str], Reference]) -> None:
    """SQLite + polling worker and PostgreSQL + Redis + Celery workers compute the same run."""
    embedded, distributed = references("embedded"), references("distributed")
    assert embedded.losses == distributed.losses
    assert embedded.results == distributed.results
    assert _tensor_diff(embedded.tensors, distributed.tensors) == []
