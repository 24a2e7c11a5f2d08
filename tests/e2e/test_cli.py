"""The real `tinker` CLI against a live TuFT: `run list/info`, `checkpoint list/info/publish/
unpublish/set-ttl/delete`, with its JSON output (`tinker -f json ...`). The runs and checkpoints
are made with the SDK first. `checkpoint download` is covered elsewhere. The last test drives
copy_weights through the SDK (0.38 only), since no CLI command copies.

The CLI is the one installed beside the interpreter running the tests, so the SDK matrix (`make
test-sdk-old`) drives 0.25's CLI, which has the same commands and JSON output.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import tinker
from tinker import types

from tests.e2e.server import LiveServer, embedded
from tests.e2e.test_api_surface import _train
from tests.e2e.test_training import greedy, new_training

pytestmark = pytest.mark.e2e

CLI = Path(sys.executable).parent / "tinker"
KEY_A = "tml-local-dev-key"  # the embedded server's dev key, tenant "default"
KEY_B = "tml-cli-tenant-b"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One server for the module: every CLI call is a fresh process (seconds each), so the server
    start is not repeated per test. A second tenant is configured beside the dev key."""
    if not CLI.exists():
        pytest.skip(f"no tinker CLI at {CLI}")
    tmp = tmp_path_factory.mktemp("cli")
    config = tmp / "tuft.yaml"
    config.write_text(f"api_keys:\n  - key: {KEY_B}\n    tenant: tenant-b\n")
    live = embedded(tmp)
    live.args += ["--config", str(config)]
    live.start()
    try:
        yield live
    finally:
        live.stop()


@dataclass
class Run:
    model_id: str
    state: str  # tinker://…/weights/s1, saved with a TTL
    sampler: str  # tinker://…/sampler_weights/w1


def client(server: LiveServer, key: str = KEY_A) -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=server.url, api_key=key)


def rest(server: LiveServer, key: str = KEY_A) -> Any:
    """0.38 builds a RestClient directly (create_rest_client is deprecated there); 0.25 cannot."""
    if hasattr(tinker, "RestClient"):
        return tinker.RestClient(base_url=server.url, api_key=key)
    return client(server, key).create_rest_client()


def make_run(server: LiveServer, state_name: str = "s1", sampler_name: str = "w1") -> Run:
    training = new_training(client(server))
    state = training.save_state(state_name, ttl_seconds=7200).result(timeout=120)
    sampler = training.save_weights_for_sampler(sampler_name).result(timeout=120)
    return Run(training.model_id, state.path, sampler.path)


@pytest.fixture(scope="module")
def run(server: LiveServer) -> Run:
    return make_run(server)


def tinker_cli(server: LiveServer, *args: str, key: str = KEY_A) -> subprocess.CompletedProcess[str]:
    """Run `tinker -f json <args>` as a user would, configured only through the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TINKER_", "TUFT_", "CLOUDFLARE_"))}
    home = server.log_dir / "home"  # no ~/.tinker/credentials.json of the machine's user
    home.mkdir(exist_ok=True)
    env.update({"HOME": str(home), "TINKER_API_KEY": key, "TINKER_BASE_URL": server.url, "TINKER_TELEMETRY": "0"})
    # Should the CLI die of a signal, its threads' stacks go to stderr (written straight to fd 2).
    env["PYTHONFAULTHANDLER"] = "1"
    return subprocess.run(
        [str(CLI), "-f", "json", *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def ok(result: subprocess.CompletedProcess[str]) -> Any:
    """A successful command's JSON output (None for commands that print nothing).

    The SDK's CLI has been seen (once in CI, not reproducible on demand) to abort (SIGABRT) during
    interpreter teardown after printing its complete answer: a client-side shutdown crash, after
    the server had answered. Such a run counts as done when its JSON answer is complete; what a
    command changed is checked separately by every test, so the server's behaviour stays tested."""
    aborted_after_answer = result.returncode == -signal.SIGABRT and _complete_json(result.stdout)
    assert result.returncode == 0 or aborted_after_answer, (result.returncode, result.stdout, result.stderr)
    return json.loads(result.stdout) if result.stdout.strip() else None


def _complete_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def failed(result: subprocess.CompletedProcess[str], title: str) -> str:
    """A refused command: exit 1 and the CLI's error title. The 0.25 CLI also aborts (SIGABRT)
    during its teardown after printing the whole error (reproduced in CI on 2026-12-07, as `ok`
    describes): that counts when the error it printed is complete."""
    aborted_after_error = result.returncode == -signal.SIGABRT and "\nDetails: " in result.stderr
    assert result.returncode == 1 or aborted_after_error, (result.returncode, result.stdout, result.stderr)
    assert result.stderr.startswith(f"Error: {title}"), result.stderr
    return result.stderr


def when(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def test_run_list_and_info(server: LiveServer, run: Run) -> None:
    runs = {r["training_run_id"]: r for r in ok(tinker_cli(server, "run", "list"))["runs"]}
    listed = runs[run.model_id]
    assert (listed["base_model"], listed["model_owner"], listed["is_lora"], listed["lora_rank"]) == (
        "tuft/tiny-qwen3",
        "default",
        True,
        8,
    )
    assert listed["last_checkpoint"]["tinker_path"] == run.state
    info = ok(tinker_cli(server, "run", "info", run.model_id))
    assert info["training_run_id"] == run.model_id
    assert info["last_checkpoint"]["tinker_path"] == run.state
    assert info["last_sampler_checkpoint"]["tinker_path"] == run.sampler
    assert info["corrupted"] is False
    # Another tenant's run is not found (and the CLI says so, exit status 1).
    assert "not found" in failed(tinker_cli(server, "run", "info", run.model_id, key=KEY_B), "Resource not found")


def test_checkpoint_list_and_info(server: LiveServer, run: Run) -> None:
    everything = ok(tinker_cli(server, "checkpoint", "list"))["checkpoints"]
    mine = {c["tinker_path"]: c for c in everything}
    assert {run.state, run.sampler} <= set(mine)
    times = [when(c["time"]) for c in everything]
    assert times == sorted(times, reverse=True)  # type: ignore[type-var]
    by_run = ok(tinker_cli(server, "checkpoint", "list", "--run-id", run.model_id))
    assert by_run["run_id"] == run.model_id
    # Newest first: the sampler weights were saved after the state.
    assert [c["tinker_path"] for c in by_run["checkpoints"]] == [run.sampler, run.state]
    state, sampler = by_run["checkpoints"][1], by_run["checkpoints"][0]
    assert (state["checkpoint_id"], state["checkpoint_type"]) == ("weights/s1", "training")
    assert (sampler["checkpoint_id"], sampler["checkpoint_type"]) == ("sampler_weights/w1", "sampler")
    assert state["size_bytes"] > 0 and sampler["size_bytes"] > 0
    assert state["public"] is False and sampler["expires_at"] is None
    # The TTL given to save_state is the checkpoint's expiry.
    created, expires = when(state["time"]), when(state["expires_at"])
    assert created is not None and expires is not None
    assert (expires - created).total_seconds() == pytest.approx(7200, abs=1)

    info = ok(tinker_cli(server, "checkpoint", "info", run.state))
    assert (info["tinker_path"], info["checkpoint_id"], info["is_lora"], info["lora_rank"]) == (
        run.state,
        "weights/s1",
        True,
        8,
    )
    assert when(info["expires_at"]) == expires
    # The other tenant's listing does not show them.
    theirs = ok(tinker_cli(server, "checkpoint", "list", key=KEY_B))["checkpoints"]
    assert not {run.state, run.sampler} & {c["tinker_path"] for c in theirs}


def test_publish_ttl_unpublish_delete(server: LiveServer) -> None:
    own = make_run(server, "keep", "gone")
    rest_b = rest(server, KEY_B)

    assert ok(tinker_cli(server, "checkpoint", "publish", own.state)) is None
    assert ok(tinker_cli(server, "checkpoint", "set-ttl", own.state, "--ttl", "3600")) is None
    started = datetime.now(UTC)
    shown = {
        c["tinker_path"]: c
        for c in ok(tinker_cli(server, "checkpoint", "list", "--run-id", own.model_id))["checkpoints"]
    }
    assert shown[own.state]["public"] is True and shown[own.sampler]["public"] is False
    remaining = (when(shown[own.state]["expires_at"]) - started).total_seconds()  # type: ignore[operator]
    assert 3000 < remaining <= 3600  # the new TTL counts from the set-ttl call, not from the save
    # Published: the other tenant can read it, but not change it.
    assert rest_b.get_weights_info_by_tinker_path(own.state).result(timeout=30).lora_rank == 8
    for command in (["publish"], ["unpublish"], ["set-ttl", "--remove"]):
        refused = failed(tinker_cli(server, "checkpoint", *command, own.state, key=KEY_B), "Resource not found")
        assert "not found" in refused
    # Bad input is the CLI's "Invalid request" with the server's reason.
    assert "ttl_seconds" in failed(
        tinker_cli(server, "checkpoint", "set-ttl", own.state, "--ttl", "0"), "Invalid request"
    )

    assert ok(tinker_cli(server, "checkpoint", "unpublish", own.state)) is None
    assert ok(tinker_cli(server, "checkpoint", "set-ttl", own.state, "--remove")) is None
    info = ok(tinker_cli(server, "checkpoint", "info", own.state))
    assert info["public"] is False and info["expires_at"] is None
    with pytest.raises(Exception, match="not found"):
        rest_b.get_weights_info_by_tinker_path(own.state).result(timeout=30)

    missing = own.state.replace("/weights/keep", "/weights/never-saved")
    # Files are stored per kind and name, one folder per save: checkpoints/<run>/<kind>/<name>/<save>.
    assert list(server.data_dir.glob("checkpoints/*/sampler/gone/*/adapter_model.safetensors"))
    result = ok(tinker_cli(server, "checkpoint", "delete", "--yes", own.sampler, missing))
    assert result["deleted_count"] == 1
    assert [f["tinker_path"] for f in result["failed"]] == [missing]
    assert "not found" in result["failed"][0]["error"]
    listed = rest(server).list_checkpoints(own.model_id).result(timeout=30).checkpoints
    assert [c.tinker_path for c in listed] == [own.state]
    # The deleted checkpoint's folder is gone, its name's folder with it; the other stays.
    assert not list(server.data_dir.glob("checkpoints/*/sampler/gone"))
    assert list(server.data_dir.glob("checkpoints/*/training/keep/*/adapter_model.safetensors"))


def test_copy_weights_through_the_sdk(server: LiveServer) -> None:
    """copy_weights (0.38 only; docs/checkpoints.md): the copy is the caller's own checkpoint with
    the same weights, in a run of its own, and carries the TTL given to the copy."""
    if not hasattr(tinker.ServiceClient, "copy_weights"):
        pytest.skip(f"tinker {tinker.__version__} has no copy_weights")
    service = tinker.ServiceClient(base_url=server.url, api_key=KEY_A, project_id="archive")
    training = new_training(service)
    _train(training, 3)
    source = training.save_weights_for_sampler("to-copy").result(timeout=120).path
    copied = service.copy_weights(source, ttl_seconds=3600).result(timeout=60)
    parsed = types.ParsedCheckpointTinkerPath.from_tinker_path(copied)
    assert parsed.checkpoint_id == "sampler_weights/to-copy" and parsed.training_run_id != training.model_id
    original = greedy(service.create_sampling_client(model_path=source).result(timeout=60))
    assert greedy(service.create_sampling_client(model_path=copied).result(timeout=60)) == original
    (listed,) = rest(server).list_checkpoints(parsed.training_run_id).result(timeout=30).checkpoints
    assert listed.tinker_path == copied and listed.checkpoint_type == "sampler" and listed.expires_at is not None
