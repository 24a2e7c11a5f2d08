"""Every supported tinker SDK minor version, 0.25 to 0.38, against one live server; and 0.24,
below the range, refused with a clear error at create_session.

The full e2e suite runs under 0.38 (the main run) and 0.25 (`make test-sdk-old`). The versions in
between get this cheaper pass: tests/e2e/sdk_smoke.py, once per version, with that version's
`tinker` package first on PYTHONPATH (`make` installs each with `pip install --no-deps --target`
into .venv-sdks/<version>; everything else, transformers included, comes from the main virtual
environment). One server serves them all, and two versions run at a time (a 2-core CI machine).

Runs only where TUFT_SDK_MATRIX names the folder of those installs (`make test` sets it; run
`make test-sdk-matrix` for this file alone), so the 0.25 run of the e2e suite skips it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tinker

from app.api import sdk_range
from tests.e2e.server import LiveServer, embedded
from tests.e2e.test_training import new_training

# The first test's setup runs every version (a few minutes on a loaded 2-core machine); each
# version's own process is bounded separately (480 s).
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

KEY = "tml-local-dev-key"
SMOKE = Path(__file__).with_name("sdk_smoke.py")
VERSIONS = [
    line.strip()
    for line in Path(__file__).with_name("sdk_matrix.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]
MATRIX_DIR = os.environ.get("TUFT_SDK_MATRIX")


def minor(version: str) -> tuple[int, int]:
    major, minor_, *_ = version.split(".")
    return int(major), int(minor_)


SUPPORTED = [v for v in VERSIONS if minor(v) >= sdk_range.OLDEST_SUPPORTED]
TOO_OLD = [v for v in VERSIONS if minor(v) < sdk_range.OLDEST_SUPPORTED]


@dataclass
class Outcome:
    version: str
    returncode: int | None
    seconds: float
    result: dict[str, Any] | None
    output: str


@dataclass
class Matrix:
    others_external: str  # made by the 0.38 SDK in this process, in the same tenant
    outcomes: dict[str, Outcome]


def _run(server: LiveServer, version: str, mode: str, others_external: str, work: Path) -> Outcome:
    """One version's smoke, run again once if its process died of a signal: the interpreter itself
    has crashed here under heavy load (SIGBUS/SIGABRT in CI, 0.36 once, its first steps fine), which
    says nothing about the SDK version; an incompatibility fails the same way twice."""
    outcome = _run_once(server, version, mode, others_external, work)
    if outcome.returncode is not None and outcome.returncode < 0:
        first = outcome.output
        outcome = _run_once(server, version, mode, others_external, work)
        outcome.output = f"(first try died of signal {-outcome.returncode}: {first[-2000:]})\n{outcome.output}"
    return outcome


def _run_once(server: LiveServer, version: str, mode: str, others_external: str, work: Path) -> Outcome:
    assert MATRIX_DIR is not None
    target = Path(MATRIX_DIR) / version
    out = work / version / "result.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TINKER_", "TUFT_", "CLOUDFLARE_"))}
    env.update({"PYTHONPATH": str(target), "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"})
    args = [sys.executable, str(SMOKE), "--url", server.url, "--key", KEY, "--out", str(out), "--mode", mode]
    args += ["--others-external", others_external]
    start = time.monotonic()
    try:
        proc = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=480, check=False)
        code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, output = None, f"timed out after {exc.timeout} s: {exc.stdout!r} {exc.stderr!r}"
    result = json.loads(out.read_text()) if out.exists() else None
    return Outcome(version, code, time.monotonic() - start, result, output[-8000:])


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    if MATRIX_DIR is None:
        pytest.skip("the SDK matrix runs under `make test` / `make test-sdk-matrix` (TUFT_SDK_MATRIX unset)")
    missing = [v for v in VERSIONS if not (Path(MATRIX_DIR) / v / "tinker").is_dir()]
    assert not missing, f"SDK versions not installed under {MATRIX_DIR}: {missing} (run `make sdk-matrix`)"
    tmp = tmp_path_factory.mktemp("sdk-matrix")
    server = embedded(tmp).start()
    try:
        # An external checkpoint in the same tenant, made by another client: every version lists
        # the tenant's checkpoints with it present, and only 0.28+ may be shown it.
        training = new_training(tinker.ServiceClient(base_url=server.url, api_key=KEY))
        others_external = training.save_weights_external("from-0.38").result(timeout=120).path
        jobs = [(v, "smoke") for v in SUPPORTED] + [(v, "refused") for v in TOO_OLD]
        with ThreadPoolExecutor(max_workers=2) as pool:
            done = pool.map(lambda job: _run(server, job[0], job[1], others_external, tmp), jobs)
            outcomes = {o.version: o for o in done}
        timings = ", ".join(f"{v} {o.seconds:.0f}s" for v, o in outcomes.items())
        print(f"\nSDK matrix: {timings}")
        yield Matrix(others_external, outcomes)
    finally:
        server.stop()


def _seen(matrix: Matrix, version: str) -> dict[str, Any]:
    outcome = matrix.outcomes[version]
    assert outcome.returncode == 0 and outcome.result is not None, (
        f"sdk_smoke.py under tinker {version} exited {outcome.returncode}:\n{outcome.output}"
    )
    result = outcome.result
    # The version under test, from its own folder, not the main environment's 0.38.
    assert result["version"] == version
    assert result["tinker_file"].startswith(str(Path(MATRIX_DIR or "") / version))
    return result


def test_matrix_covers_the_supported_range() -> None:
    """The versions tested are the range the server announces, one per minor version."""
    assert minor(SUPPORTED[0]) == sdk_range.OLDEST_SUPPORTED and minor(SUPPORTED[-1]) == sdk_range.NEWEST_TESTED
    minors = [minor(v)[1] for v in SUPPORTED]
    assert minors == sorted(set(minors))
    assert set(range(minors[0], minors[-1] + 1)) - set(minors) == {37}, "every minor version (0.37 was never released)"
    assert TOO_OLD, "a version below the range is tested for its refusal"


@pytest.mark.parametrize("version", SUPPORTED)
def test_sdk_version_end_to_end(matrix: Matrix, version: str) -> None:
    seen = _seen(matrix, version)
    lists_external = minor(version) >= sdk_range.EXTERNAL_LISTED_FROM
    model_id = seen["model_id"]

    # Training: a real loss, a real step, and the step carried through save_state into a new run.
    assert math.isfinite(seen["loss_sum"]) and seen["loss_sum"] > 0
    assert seen["logprobs_shape"] == [6]
    assert seen["optim_metrics"]["learning_rate"] == pytest.approx(1e-3)
    assert seen["restored_model_id"] != model_id and seen["restored_model_id"].split(":")[0] == model_id.split(":")[0]
    assert seen["restored_loss_sum"] < seen["loss_sum"], "the restored run starts from the trained weights"
    assert seen["info"] == {"model_id": model_id, "model_name": "tuft/tiny-qwen3", "lora_rank": 8}
    assert seen["run_info"] == model_id

    # Sampling from the saved sampler weights.
    assert len(seen["sample_tokens"]) == 4 and all(isinstance(t, int) for t in seen["sample_tokens"])

    # Listings: the version's own checkpoints, and external ones exactly where it can parse them.
    own = {seen["state"], seen["sampler"]}
    assert seen["state"] == f"tinker://{model_id}/weights/smoke-state"
    assert seen["sampler"] == f"tinker://{model_id}/sampler_weights/smoke-sampler"
    if lists_external:  # 0.28 can also save them
        assert seen["external"] == f"tinker://{model_id}/external_weights/smoke-external"
        own.add(seen["external"])
    assert set(seen["run_checkpoints"]) == own
    assert (matrix.others_external in seen["others_run_checkpoints"]) == lists_external
    assert len(seen["others_run_checkpoints"]) == (1 if lists_external else 0)

    # The CLI: `checkpoint list` (one run, and all), `checkpoint info`, `checkpoint download`.
    for command in ("cli_list", "cli_list_all", "cli_info", "cli_download"):
        assert seen[command]["code"] == 0, (command, seen[command])
    assert seen["cli_list"]["paths"] == sorted(own)
    # Versions run two at a time in one tenant, so the tenant-wide listings differ between calls;
    # what must hold in each: the version's own checkpoints, and external ones only from 0.28.
    for listing in (seen["user_checkpoints"], seen["cli_list_all"]["paths"]):
        assert own <= set(listing)
        assert (matrix.others_external in listing) == lists_external
        assert any("/external_weights/" in p for p in listing) == lists_external
    info = seen["cli_info"]["json"]
    expected_type = "external" if lists_external else "training"
    assert (info["checkpoint_type"], info["tinker_path"]) == (expected_type, seen.get("external", seen["state"]))
    files = {Path(f).name for f in seen["cli_download"]["files"]}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files, seen["cli_download"]


@pytest.mark.parametrize("version", TOO_OLD)
def test_sdk_below_the_range_is_refused_at_create_session(matrix: Matrix, version: str) -> None:
    """0.24 used to get a protobuf error on its first forward_backward, then hang on every later op."""
    seen = _seen(matrix, version)
    assert seen["error_type"] == "BadRequestError", seen
    assert f"tinker SDK {version} is not supported" in seen["error"]
    assert f"tinker {sdk_range.SUPPORTED_RANGE}" in seen["error"] and "0.25 to 0.38" in seen["error"]
    assert seen["seconds"] < 60, "refused at once, not after retries"
