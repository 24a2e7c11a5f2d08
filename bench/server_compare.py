"""What the server costs: the TuFT engine in process against TuFT through the server with the real
`tinker` SDK, same model, same ops, same machine, one after the other (issue 8 item 3).

    python bench/server_compare.py --device cpu --ops 2x64,4x64,4x128 --steps 12
    python bench/server_compare.py --device cuda --shape qwen3-0.6b --ops 8x1024 --steps 10

A step is one forward_backward (cross-entropy over `n` sequences of `seq` tokens) and one
optim_step. For each op shape, after `--warmup` steps, it times `--steps` steps three ways:

- engine: TorchEngine.forward_backward + optim_step on a run, in this process (no HTTP, no queue);
- waiting: the SDK calls forward_backward(...).result(), then optim_step(...).result();
- pipelined: the SDK submits every step's forward_backward and optim_step, then waits for all.

and prints one JSON line per op shape: seconds per step and tokens/s of each (the median step of
all rounds; also the best round's whole run) and the server's ratios to the engine.
The model is a random-weight Qwen3-shaped model saved to a temporary folder and served through a
`supported_models` entry by `tuft launch` (embedded: SQLite, one worker process) on a free port;
the server is always stopped at the end. The engine runs first and is freed before the server
starts: the two would otherwise share the CPU cores or the GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.domain.models import ModelSpec
from app.domain.ops import AdamParams, Datum, ForwardBackwardOp, LoraConfig, OptimStepOp
from app.domain.tensors import Array
from bench.train_compare import SHAPES, build_model, clear, parse_ops, save_model_folder
from workers.engine import TorchEngine

REPO = Path(__file__).resolve().parents[1]
# Small Qwen3 shapes for a CPU: hidden, layers, heads, kv heads, head_dim, intermediate, vocab.
# The vocabulary is cut from Qwen's 151,936: a full-size unembedding would be most of a CPU op.
CPU_SHAPES = {
    "cpu-256x4": (256, 4, 4, 2, 64, 768, 16_384),
}
API_KEY = "tml-local-dev-key"  # the embedded server's dev key
LEARNING_RATE = 1e-5


def cpu_model(shape: str) -> Qwen3ForCausalLM:
    hidden, layers, heads, kv, head_dim, inter, vocab = CPU_SHAPES[shape]
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        intermediate_size=inter,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    return Qwen3ForCausalLM(config)


def make_folder(shape: str, device: str, work: Path) -> tuple[Path, int]:
    """The model folder and its vocabulary size. GPU shapes are built on the GPU (bf16)."""
    folder = work / shape
    model = cpu_model(shape) if device == "cpu" else build_model(shape)
    vocab = int(model.config.vocab_size)
    save_model_folder(model, folder, work / "cache")
    del model
    free_device(device)
    return folder, vocab


def free_device(device: str) -> None:
    gc.collect()
    if device == "cuda":
        clear()


def token_rows(n: int, seq: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(seq + 1)] for _ in range(n)]


def domain_op(rows: list[list[int]]) -> ForwardBackwardOp:
    """The op the server's worker builds from the SDK's datums (sdk_data) for the same rows."""
    data = tuple(
        Datum(
            tokens=tuple(row[:-1]),
            loss_fn_inputs={
                "target_tokens": Array.from_list(row[1:], "int64"),
                "weights": Array.from_list([1.0] * (len(row) - 1), "float32"),
            },
        )
        for row in rows
    )
    return ForwardBackwardOp(data=data, loss_fn="cross_entropy")


def sdk_data(rows: list[list[int]]) -> list[Any]:
    from tinker import types

    return [
        types.Datum(
            model_input=types.ModelInput.from_ints(row[:-1]),
            loss_fn_inputs={"target_tokens": row[1:], "weights": [1.0] * (len(row) - 1)},
        )
        for row in rows
    ]


# ---- the engine in process ------------------------------------------------------------------


def time_engine(
    folder: Path, name: str, device: str, work: Path, shapes: list[tuple[int, int]], args: Any, vocab: int
) -> dict[str, dict[str, Any]]:
    spec = ModelSpec(model_name=name, model_path=str(folder), max_model_len=args.max_len)
    engine = TorchEngine([spec], device=device, cache_dir=work / "cache")
    optim = OptimStepOp(adam=AdamParams(learning_rate=LEARNING_RATE))
    out: dict[str, dict[str, Any]] = {}
    for n, seq in shapes:
        # A fresh run per op shape, as the server side gets a fresh training client: the first
        # losses of both sides must then be equal (the same adapter seed, the same data).
        engine.create_run("bench", name, LoraConfig(rank=args.rank, seed=0))
        op = domain_op(token_rows(n, seq, vocab))
        first_loss = None
        for _ in range(args.warmup):
            result = engine.forward_backward("bench", op)
            engine.optim_step("bench", optim)
            first_loss = result.metrics["loss:sum"] if first_loss is None else first_loss
        sync(device)
        ends = [time.perf_counter()]
        for _ in range(args.steps):
            engine.forward_backward("bench", op)
            engine.optim_step("bench", optim)
            sync(device)
            ends.append(time.perf_counter())
        out[f"{n}x{seq}"] = {"engine": ends, "first_loss": first_loss}
        engine.drop_run("bench")
    del engine
    free_device(device)
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---- the server ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def launched(folder: Path, name: str, device: str, work: Path, max_len: int, threads: int = 0) -> Iterator[str]:
    """`tuft launch` in its own process group (it starts a worker process): stopped with SIGTERM,
    then SIGKILL, whatever happens in between (an error, Ctrl-C)."""
    config = work / "tuft.yaml"
    entry = {"model_name": name, "model_path": str(folder), "max_model_len": max_len}
    config.write_text(json.dumps({"supported_models": [entry], "include_builtin_model": False}))  # JSON is YAML
    port = free_port()
    log_path = work / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUFT_")}
    env.update(PYTHONUNBUFFERED="1", TINKER_TELEMETRY="0")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "app.cli.main", "launch", "--config", str(config), "--port", str(port)]
    cmd += ["--data-dir", str(work / "data"), "--device", device]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, log_path)
        yield url
    except BaseException:
        print(f"--- server log (tail)\n{log_path.read_text(errors='replace')[-4000:]}", file=sys.stderr)
        raise
    finally:
        stop(proc)


def wait_ready(proc: subprocess.Popen[bytes], url: str, log_path: Path, timeout: float = 600.0) -> None:
    """/readyz: the embedded worker is registered and heartbeating (app/api/readiness.py)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tuft launch exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"tuft launch not ready after {timeout:.0f}s:\n{log_path.read_text()[-4000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
    # Whatever is left of the group (a worker the supervisor had not reaped yet).
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def time_server(url: str, name: str, shapes: list[tuple[int, int]], args: Any, vocab: int) -> dict[str, Any]:
    import tinker

    service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
    try:
        return {f"{n}x{seq}": _time_sdk(service, name, n, seq, args, vocab) for n, seq in shapes}
    finally:
        # Finishes the session; else its heartbeat goes on complaining once the server is gone.
        with contextlib.suppress(Exception):
            service.close("success").result()


def _time_sdk(service: Any, name: str, n: int, seq: int, args: Any, vocab: int) -> dict[str, Any]:
    from tinker import types

    # A fresh training client per op shape, as the engine side gets a fresh run.
    client = service.create_lora_training_client(base_model=name, rank=args.rank, seed=0)
    adam = types.AdamParams(learning_rate=LEARNING_RATE)
    data = sdk_data(token_rows(n, seq, vocab))
    first_loss = None
    for _ in range(args.warmup):
        result = client.forward_backward(data, "cross_entropy").result()
        client.optim_step(adam).result()
        first_loss = result.metrics["loss:sum"] if first_loss is None else first_loss
    waiting = [time.perf_counter()]
    for _ in range(args.steps):
        client.forward_backward(data, "cross_entropy").result()
        client.optim_step(adam).result()
        waiting.append(time.perf_counter())
    pipelined = [time.perf_counter()]
    futures = []
    for _ in range(args.steps):
        futures.append((client.forward_backward(data, "cross_entropy"), client.optim_step(adam)))
    for fwd_bwd, optim in futures:
        # Results come in seq order, so the time each step's last result arrives marks its end.
        fwd_bwd.result()
        optim.result()
        pipelined.append(time.perf_counter())
    return {"waiting": waiting, "pipelined": pipelined, "first_loss": first_loss}


# ---- main ----------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    import peft
    import tinker
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "tinker": tinker.__version__,
    }


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through `launched`, which stops the server


def main() -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shape", default="", help=f"cpu: {sorted(CPU_SHAPES)}; cuda: {sorted(SHAPES)}")
    p.add_argument("--ops", default="", help="op shapes, sequences x tokens (cpu: 1x64,2x64,4x64; cuda: 8x1024)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (forward_backward + optim_step) per mode")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="engine-then-server rounds (median step over all of them)")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="cpu: torch threads of the engine and of the worker")
    p.add_argument("--max-len", type=int, default=8192)
    p.add_argument("--out", default="", help="append the JSON lines to this file")
    args = p.parse_args()
    device = args.device
    shape = args.shape or ("cpu-256x4" if device == "cpu" else "qwen3-0.6b")
    if shape not in (CPU_SHAPES if device == "cpu" else SHAPES):
        p.error(f"--shape {shape} is not a {device} shape")
    shapes = parse_ops(args.ops or ("1x64,2x64,4x64" if device == "cpu" else "8x1024"))
    name = f"bench/{shape}"
    # On the CPU the engine and the worker get the same torch threads. One by default: with two
    # on a 2-core machine that other programs also use, OpenMP's barriers made steps 5-20x slower
    # in bursts (measured), which drowned what this compares.
    threads = args.threads if device == "cpu" else 0
    if threads:
        torch.set_num_threads(threads)
    machine = (
        f"cpu ({os.cpu_count()} cores, {threads} torch threads)" if device == "cpu" else torch.cuda.get_device_name(0)
    )

    timings: dict[str, list[dict[str, Any]]] = {f"{n}x{seq}": [] for n, seq in shapes}
    with tempfile.TemporaryDirectory(prefix="tuft-server-compare-") as tmp:
        work = Path(tmp)
        folder, vocab = make_folder(shape, device, work)
        for _ in range(args.rounds):
            engine = time_engine(folder, name, device, work, shapes, args, vocab)
            with launched(folder, name, device, work, args.max_len, threads) as url:
                server = time_server(url, name, shapes, args, vocab)
            for op, times in timings.items():
                times.append(
                    {**engine[op], **server[op], "first_loss": (engine[op]["first_loss"], server[op]["first_loss"])}
                )

    rows = [summarise(op, times, args, machine, shape) for op, times in timings.items()]
    for row in rows:
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


def summarise(op: str, rounds: list[dict[str, Any]], args: Any, machine: str, shape: str) -> dict[str, Any]:
    n, seq = (int(x) for x in op.split("x"))
    row: dict[str, Any] = {
        "bench": "server_compare",
        "device": machine,
        "shape": shape,
        "op": op,
        "rank": args.rank,
        "steps": args.steps,
        "rounds": args.rounds,
    }
    for mode in ("engine", "pipelined", "waiting"):
        # Each mode's time stamps: the start, then the end of every step. The median step of all
        # rounds is the headline (other loads on a shared machine come in bursts that a median
        # ignores); the whole-run time of the best round is kept beside it.
        steps = [b - a for r in rounds for a, b in itertools.pairwise(r[mode])]
        median = statistics.median(steps)
        best = min(r[mode][-1] - r[mode][0] for r in rounds) / args.steps
        row[f"{mode}_tokens_per_s"] = round(n * seq / median, 1)
        row[f"{mode}_s_per_step"] = round(median, 4)
        row[f"{mode}_best_run_s_per_step"] = round(best, 4)
    for mode in ("pipelined", "waiting"):
        row[f"{mode}_ratio"] = round(row["engine_s_per_step"] / row[f"{mode}_s_per_step"], 3)
        row[f"{mode}_best_run_ratio"] = round(row["engine_best_run_s_per_step"] / row[f"{mode}_best_run_s_per_step"], 3)
    # The same first step both ways (same adapter seed, same data): the server ran what the engine ran.
    row["first_loss"] = {"engine": rounds[0]["first_loss"][0], "server": rounds[0]["first_loss"][1]}
    row["versions"] = versions()
    return row


if __name__ == "__main__":
    main()
