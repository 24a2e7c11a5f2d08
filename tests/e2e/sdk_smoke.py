"""One pass through what differs between tinker SDK versions, run under ONE version at a time.

test_sdk_matrix.py runs this file once per supported SDK version, each time with that version's
`tinker` package first on PYTHONPATH (a `pip install --no-deps --target` folder; every other
package comes from the main virtual environment), against one live server. It prints nothing the
test reads: it writes what it saw as JSON to --out, and the test asserts on that.

Standalone on purpose: it must not import the repository (tests/, app/), only the SDK under test.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from typing import Any

# The SDK needs no torch (it is an optional extra) but imports it when it can: hiding the main
# environment's torch saves ~1.5 s of CPU per version, and is how most clients run anyway.
sys.modules["torch"] = None  # type: ignore[assignment]

import tinker  # noqa: E402
from tinker import types  # noqa: E402

BASE_MODEL = "tuft/tiny-qwen3"
PROMPT = [101, 57, 12, 7, 102]


def resolved(client_or_future: Any) -> Any:
    """Newer SDKs return a future of the client (using it directly is deprecated); older ones the client."""
    return client_or_future.result() if hasattr(client_or_future, "result") else client_or_future


def datum() -> types.Datum:
    tokens = [*PROMPT, 1000, 2000]
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": types.TensorData(data=tokens[1:], dtype="int64", shape=[len(tokens) - 1])},
    )


def cli(*args: str) -> dict[str, Any]:
    """`tinker -f json <args>`, in this process: the console script's own entry point (main), so
    the command runs exactly as from a shell, without paying for a second interpreter start."""
    from tinker.cli.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["tinker", "-f", "json", *args]
    code: Any = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.argv = argv
    text = out.getvalue()
    try:
        parsed = json.loads(text) if text.strip() else None
    except ValueError:
        parsed = None
    seen: dict[str, Any] = {"code": code or 0, "json": parsed, "stderr": err.getvalue()[-2000:]}
    if parsed is None:
        seen["stdout"] = text[-2000:]
    return seen


def refused(url: str, key: str) -> dict[str, Any]:
    """For an SDK below the supported range: the first call that needs a session must fail fast."""
    service = tinker.ServiceClient(base_url=url, api_key=key)
    start = time.monotonic()
    try:
        resolved(service.create_lora_training_client(base_model=BASE_MODEL, rank=8, seed=0))
    except Exception as exc:
        return {"error_type": type(exc).__name__, "error": str(exc), "seconds": time.monotonic() - start}
    return {"error_type": None, "error": None, "seconds": time.monotonic() - start}


def smoke(url: str, key: str, others_external: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    service = tinker.ServiceClient(base_url=url, api_key=key)
    training = resolved(service.create_lora_training_client(base_model=BASE_MODEL, rank=8, seed=0))
    seen["model_id"] = training.model_id

    fwdbwd = training.forward_backward([datum()], "cross_entropy").result(timeout=120)
    seen["loss_sum"] = fwdbwd.metrics["loss:sum"]
    seen["logprobs_shape"] = list(fwdbwd.loss_fn_outputs[0]["logprobs"].shape or [])
    seen["optim_metrics"] = training.optim_step(types.AdamParams(learning_rate=1e-3)).result(timeout=120).metrics

    info = training.get_info()
    seen["info"] = {"model_id": info.model_id, "model_name": info.model_data.model_name, "lora_rank": info.lora_rank}

    seen["state"] = training.save_state("smoke-state").result(timeout=120).path
    seen["sampler"] = training.save_weights_for_sampler("smoke-sampler").result(timeout=120).path
    # save_weights_external arrived in 0.28, with the Checkpoint type that can list it.
    if hasattr(training, "save_weights_external"):
        seen["external"] = training.save_weights_external("smoke-external").result(timeout=120).path

    sampling = resolved(service.create_sampling_client(model_path=seen["sampler"]))
    sample = sampling.sample(
        prompt=types.ModelInput.from_ints(PROMPT),
        num_samples=1,
        sampling_params=types.SamplingParams(max_tokens=4, temperature=0.0),
    ).result(timeout=120)
    seen["sample_tokens"] = list(sample.sequences[0].tokens)

    # The load path differs most between versions (0.25 creates the run, then loads; later ones
    # send one load_weights that names the client-computed model id).
    restored = resolved(service.create_training_client_from_state(seen["state"]))
    again = restored.forward_backward([datum()], "cross_entropy").result(timeout=120)
    seen["restored_model_id"] = restored.model_id
    seen["restored_loss_sum"] = again.metrics["loss:sum"]

    rest = (
        tinker.RestClient(base_url=url, api_key=key) if hasattr(tinker, "RestClient") else service.create_rest_client()
    )
    run_listing = rest.list_checkpoints(training.model_id).result()
    seen["run_checkpoints"] = sorted(c.tinker_path for c in run_listing.checkpoints)
    seen["run_checkpoint_types"] = sorted(c.checkpoint_type for c in run_listing.checkpoints)
    user_listing = rest.list_user_checkpoints(limit=1000).result()
    seen["user_checkpoints"] = sorted(c.tinker_path for c in user_listing.checkpoints)
    if others_external:
        others_run = others_external.removeprefix("tinker://").split("/")[0]
        others = rest.list_checkpoints(others_run).result().checkpoints
        seen["others_run_checkpoints"] = sorted(c.tinker_path for c in others)
    seen["run_info"] = rest.get_training_run(training.model_id).result().training_run_id

    # The CLI, configured only through the environment as a user would.
    os.environ.update({"TINKER_API_KEY": key, "TINKER_BASE_URL": url})
    listed = cli("checkpoint", "list", "--run-id", training.model_id)
    seen["cli_list"] = {
        **listed,
        "paths": sorted(c["tinker_path"] for c in (listed["json"] or {}).get("checkpoints", [])),
    }
    everything = cli("checkpoint", "list", "--limit", "0")
    seen["cli_list_all"] = {
        **everything,
        "paths": sorted(c["tinker_path"] for c in (everything["json"] or {}).get("checkpoints", [])),
    }
    target = seen.get("external", seen["state"])
    seen["cli_info"] = cli("checkpoint", "info", target)
    # Until 0.36 the CLI downloads a tar archive of a training or sampler checkpoint; from 0.36 it
    # downloads external weights file by file (and exports a training checkpoint to one first).
    from tinker.cli.commands import checkpoint as cli_checkpoint

    downloads_external = hasattr(cli_checkpoint, "_download_external_weights")
    wanted = seen["external"] if downloads_external else seen["state"]
    where = tempfile.mkdtemp(prefix="download-", dir=os.environ["HOME"])
    seen["cli_download"] = {**cli("checkpoint", "download", wanted, "--output", where), "path": wanted}
    seen["cli_download"]["files"] = sorted(
        os.path.relpath(os.path.join(root, name), where) for root, _, names in os.walk(where) for name in names
    )

    if hasattr(service, "close"):  # 0.27+
        resolved(service.close("success"))
    return seen


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", choices=["smoke", "refused"], default="smoke")
    parser.add_argument("--others-external", default="", help="an external checkpoint another client made")
    args = parser.parse_args()
    # No ~/.tinker/credentials.json of the machine's user may stand in for the key; downloads go
    # there too, beside --out (the test's temporary folder).
    os.environ["HOME"] = tempfile.mkdtemp(prefix="home-", dir=os.path.dirname(os.path.abspath(args.out)))
    os.environ["TINKER_TELEMETRY"] = "0"
    result = {"version": tinker.__version__, "tinker_file": tinker.__file__}
    if args.mode == "refused":
        result.update(refused(args.url, args.key))
    else:
        result.update(smoke(args.url, args.key, args.others_external))
    with open(args.out, "w") as out:
        json.dump(result, out, default=str)


if __name__ == "__main__":
    main()
