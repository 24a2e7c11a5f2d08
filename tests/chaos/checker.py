"""The one invariant checker run after every scenario (reliability-design.md §5.3).

It reads what the client saw (the driver's outcomes), the queue (ops and runs tables), the
snapshot files and the saved checkpoint, and compares them with a fault-free reference run of the
same script and seed:

(a) no acknowledged future lost: every future the SDK got resolved successfully;
(b) per-run order: the run's ops are seq 1..N, all terminal, and runs.applied_seq == N;
(c) each op applied once: runs.optimizer_steps == number of optim_step ops, and the optimizer
    step reported by optim_step i is i (so the last one reports K);
(d) the saved adapter (and optimizer state) is BITWISE equal to the reference's, losses equal;
(e) a result a client has seen never changes: every stored result is byte-identical to the
    reference's (per seq), and so are the losses the SDK returned.

Plus: every registered snapshot verifies against its manifest, and no replay diverged.

Each check appends one row to the JSON-lines file named by TUFT_CHAOS_REPORT (if set) before
asserting, so a failing scenario still shows in the table.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from app.snapshot_manifest import verify
from tests.chaos.driver import CHECKPOINT_NAME, Driver
from tests.chaos.harness import Cluster

ADAPTER = "adapter_model.safetensors"
OPTIMIZER = "optimizer.safetensors"
FENCED = r"FENCED commit rejected"
DIVERGED = r"gave a different result than the one served"


@dataclass
class Reference:
    """The fault-free run every scenario is compared with."""

    mode: str
    iterations: int
    losses: list[float | None]
    optim_metrics: list[dict[str, float] | None]
    results: dict[int, bytes]
    tensors: dict[str, torch.Tensor]


@dataclass
class Row:
    """One line of the chaos table."""

    scenario: str
    mode: str
    runs: int
    ops: int
    futures_lost: int
    duplicate_applications: int
    zombie_commits_rejected: int
    bitwise_equal: bool | None
    results_equal: bool | None
    faults: str = ""
    recovery_seconds: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _normalise(result: bytes | None, run_id: str) -> bytes | None:
    # Only save_weights results name the run (in the checkpoint's tinker:// path).
    return None if result is None else result.replace(run_id.encode(), b"<run>")


def stored_results(cluster: Cluster, run_id: str) -> dict[int, bytes]:
    rows = cluster.sql("select seq, result from ops where run_id = :r and seq is not null", r=run_id)
    return {int(seq): _normalise(bytes(result), run_id) for seq, result in rows if result is not None}  # type: ignore[misc]


def checkpoint_tensors(cluster: Cluster, run_id: str, name: str = CHECKPOINT_NAME) -> dict[str, torch.Tensor]:
    rows = cluster.sql(
        "select storage_path from checkpoints where run_id = :r and kind = 'training' and name = :n", r=run_id, n=name
    )
    assert rows, f"no training checkpoint {name!r} recorded for {run_id}"
    folder = cluster.data_dir / "checkpoints" / rows[0][0]
    tensors = {f"adapter/{k}": v for k, v in load_file(folder / ADAPTER).items()}
    tensors.update({f"optimizer/{k}": v for k, v in load_file(folder / OPTIMIZER).items()})
    return tensors


def reference_from(cluster: Cluster, driver: Driver, mode: str) -> Reference:
    assert driver.model_id is not None
    assert not driver.failed(), f"the reference run itself failed: {driver.failed()}"
    return Reference(
        mode=mode,
        iterations=driver.iterations,
        losses=driver.losses(),
        optim_metrics=driver.optim_metrics(),
        results=stored_results(cluster, driver.model_id),
        tensors=checkpoint_tensors(cluster, driver.model_id),
    )


def bad_snapshots(cluster: Cluster, run_id: str) -> list[str]:
    root = cluster.data_dir / "snapshots"
    rows = cluster.sql("select applied_seq, storage_path, manifest_sha256 from snapshots where run_id = :r", r=run_id)
    problems = []
    for seq, rel, digest in rows:
        problem = verify(root / rel, digest)
        if problem is not None:
            problems.append(f"snapshot at seq {seq}: {problem}")
    return problems


def report(row: Row) -> None:
    path = os.environ.get("TUFT_CHAOS_REPORT")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps(asdict(row)) + "\n")


def _tensor_diff(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> list[str]:
    if set(ref) != set(got):
        return [f"tensor names differ: {sorted(set(ref) ^ set(got))[:5]}"]
    return [k for k in sorted(ref) if ref[k].dtype != got[k].dtype or not torch.equal(ref[k], got[k])]


def check(
    cluster: Cluster,
    driver: Driver,
    reference: Reference,
    scenario: str,
    *,
    faults: str = "",
    failed_seqs: frozenset[int] = frozenset(),
    recovery_seconds: list[float] | None = None,
) -> Row:
    """Assert every invariant for the driver's run. `failed_seqs` names ops that are expected to
    fail (a poison op): then the bitwise/result comparison with the reference does not apply."""
    run_id = driver.model_id
    assert run_id is not None, "the run was never created"
    k = driver.iterations
    n = driver.expected_ops
    problems: list[str] = []

    # (a) no acknowledged future lost.
    if len(driver.outcomes) != n:
        problems.append(f"the client collected {len(driver.outcomes)} futures, expected {n}")
    failed = {seq for seq, _ in driver.failed()}
    lost = failed - failed_seqs
    for seq, outcome in driver.failed():
        if seq not in failed_seqs:
            problems.append(f"future of seq {seq} ({outcome.kind}) failed: {outcome.error!r}")
    if failed_seqs - failed:
        problems.append(f"futures of seq {sorted(failed_seqs - failed)} were expected to fail and did not")

    # (b) per-run order: seq 1..N, all terminal, applied_seq == N.
    ops = cluster.sql(
        "select seq, kind, status, attempt, error_category from ops where run_id = :r and seq is not null order by seq",
        r=run_id,
    )
    seqs = [int(o.seq) for o in ops]
    if seqs != list(range(1, n + 1)):
        problems.append(f"op seqs are {seqs}, expected 1..{n}")
    for o in ops:
        want = "failed" if o.seq in failed_seqs else "succeeded"
        if o.status != want:
            problems.append(f"op seq {o.seq} ({o.kind}) is {o.status}, expected {want}")
    run = cluster.run_row(run_id)
    if run is None:
        problems.append("the run row is missing")
    else:
        if (run.applied_seq, run.next_seq) != (n, n + 1):
            problems.append(f"applied_seq/next_seq = {run.applied_seq}/{run.next_seq}, expected {n}/{n + 1}")
        if run.status != "active":
            problems.append(f"run status is {run.status}")

    # (c) each op applied once.
    optim_ok = [o for o in ops if o.kind == "optim_step" and o.status == "succeeded"]
    steps_db = int(run.optimizer_steps) if run is not None else -1
    duplicates = max(0, steps_db - len(optim_ok))
    if steps_db != len(optim_ok):
        problems.append(f"runs.optimizer_steps = {steps_db}, but {len(optim_ok)} optim_step ops succeeded")
    reported = [m.get("optimizer_step") if m else None for m in driver.optim_metrics()]
    expected_steps = [float(i + 1) for i in range(len(optim_ok))]
    if [r for r in reported if r is not None] != expected_steps:
        problems.append(f"optim_step futures reported optimizer steps {reported}, expected {expected_steps}")
    seen = [r for r in reported if r is not None]
    if seen:
        duplicates += max(0, int(max(seen)) - len(optim_ok))
    if not failed_seqs and (not seen or seen[-1] != float(k)):
        problems.append(f"the last optim_step reported step {seen[-1] if seen else None}, expected {k}")

    # Snapshots and replays.
    problems += bad_snapshots(cluster, run_id)
    divergences = cluster.log_count(DIVERGED)
    if divergences:
        problems.append(f"{divergences} replayed op(s) gave a different result than the one served")

    # (d) + (e) against the reference (only when every op succeeded).
    bitwise: bool | None = None
    same_results: bool | None = None
    if not failed_seqs:
        assert reference.iterations == k, "scenario and reference must run the same script"
        try:
            diff = _tensor_diff(reference.tensors, checkpoint_tensors(cluster, run_id))
        except (AssertionError, OSError) as exc:
            diff = [f"cannot read the saved checkpoint: {exc}"]
        bitwise = not diff
        if diff:
            problems.append(f"saved tensors differ from the reference: {diff[:5]}")
        stored = stored_results(cluster, run_id)
        changed = sorted(s for s in set(reference.results) | set(stored) if reference.results.get(s) != stored.get(s))
        same_results = not changed and driver.losses() == reference.losses
        if changed:
            problems.append(f"stored results differ from the reference at seqs {changed}")
        if driver.losses() != reference.losses:
            problems.append(f"losses {driver.losses()} != reference {reference.losses}")
        if driver.optim_metrics() != reference.optim_metrics:
            problems.append("optim_step metrics differ from the reference")

    row = Row(
        scenario=scenario,
        mode=cluster.mode,
        runs=1,
        ops=len(ops),
        futures_lost=len(lost) + max(0, n - len(driver.outcomes)),
        duplicate_applications=duplicates,
        zombie_commits_rejected=cluster.log_count(FENCED),
        bitwise_equal=bitwise,
        results_equal=same_results,
        faults=faults,
        recovery_seconds=[round(s, 2) for s in recovery_seconds or []],
        problems=problems,
    )
    report(row)
    assert not problems, "invariants violated:\n  " + "\n  ".join(problems) + f"\n{cluster.logs()}"
    return row


def read_report(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
