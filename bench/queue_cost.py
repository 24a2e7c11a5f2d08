"""The queue's own cost (issue 11): how long a tiny op takes from the SDK's call to its result, and
how many such ops the server turns round per second, in both shapes, with the real `tinker` SDK.

- `pg`: a fresh PostgreSQL database, `tuft db upgrade`, `tuft api` and one `tuft worker` on the CPU,
  woken through Redis (its own database number, so other users' queues are not touched);
- `embedded`: `tuft launch` (SQLite, one worker process, the local datagram doorbell).

The op is `optim_step` on the built-in tiny model (after one forward_backward, so it has gradients
to apply): its engine time is about a millisecond, so what is measured is the queue: HTTP, the
submit transaction, the wake-up, the claim, the fenced commit, the push to the long-poll and the
delivery. Phases, each after a warm-up:

- `1 run`: one client, one op at a time (`.result()` before the next): p50 / p99 latency;
- `N runs` (32): N training clients in `--procs` processes, each one op at a time, for
  `--seconds`: ops/s over all of them and p99 latency.

It prints each shape's absolutes, the embedded/deployment ratios and the issue's targets, with the
load average before and after each phase (the machine is shared: read the numbers with it), and
writes the rows as JSON (`--out`). Servers are stopped at the end, also on an error or Ctrl-C.

    python bench/queue_cost.py                       # both shapes, writes bench/results/<date>-queue-cost.json
    python bench/queue_cost.py --shapes embedded --ops 100 --runs 8 --seconds 10
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
SERVER_REPO = REPO  # --repo: the servers run from there (python -m puts its cwd first on sys.path)
TUFT = [sys.executable, "-m", "app.cli.main"]
KEY = "tml-local-dev-key"
BASE_MODEL = "tuft/tiny-qwen3"
TARGETS = {"p50_1run_ms": 10.0, "p99_1run_ms": 50.0, "ops_per_s_32": 300.0, "p99_32_ms": 250.0, "embedded_ratio": 1.5}


# ---- servers ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUFT_")}
    env.update(PYTHONUNBUFFERED="1", TINKER_TELEMETRY="0", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


class Servers:
    """Processes this bench started, each in its own process group, stopped on exit."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, args: list[str], name: str) -> None:
        with open(self.work / f"{name}.log", "ab") as log:
            self.procs.append(
                subprocess.Popen(
                    [*TUFT, *args],
                    cwd=SERVER_REPO,
                    env=_env(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def wait_ready(self, url: str, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"a server exited with {proc.returncode}:\n{self.logs()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"not ready after {timeout:.0f}s:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.work.glob("*.log"))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=60)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        self.procs.clear()


@contextlib.contextmanager
def embedded(work: Path, extra_config: str = "") -> Iterator[tuple[str, str, Meters]]:
    servers = Servers(work)
    port = free_port()
    args = ["launch", "--port", str(port), "--data-dir", str(work / "data"), "--device", "cpu"]
    if extra_config:
        (work / "tuft.yaml").write_text(extra_config)
        args += ["--config", str(work / "tuft.yaml")]
    try:
        servers.spawn(args, "launch")
        url = f"http://127.0.0.1:{port}"
        servers.wait_ready(url)
        db_url = f"sqlite:///{work / 'data' / 'tuft.db'}"
        yield url, db_url, Meters({"launch": servers.procs[0].pid}, db_url, None)
    finally:
        servers.stop()


@contextlib.contextmanager
def deployment(
    work: Path, admin_url: str, redis_url: str, extra_config: str = "", workers: int = 1
) -> Iterator[tuple[str, str, Meters]]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    name = f"tuft_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    servers = Servers(work)
    try:
        url = admin_url.rpartition("/")[0] + f"/{name}"
        config = work / "tuft.yaml"
        config.write_text(f"api_keys:\n  - key: {KEY}\n    tenant: default\n{extra_config}")
        common = ["--config", str(config), "--data-dir", str(work / "data"), "--database-url", url]
        common += ["--redis-url", redis_url]
        subprocess.run([*TUFT, "db", "upgrade", *common], cwd=SERVER_REPO, env=_env(), check=True, capture_output=True)
        port = free_port()
        servers.spawn(["api", "--port", str(port), *common], "api")
        for i in range(workers):
            servers.spawn(["worker", "--device", "cpu", *common], f"worker{i or ''}")
        api = f"http://127.0.0.1:{port}"
        servers.wait_ready(api)
        procs = {"api": servers.procs[0].pid} | {f"worker{i or ''}": p.pid for i, p in enumerate(servers.procs[1:])}
        yield api, url, Meters(procs, url, redis_url)
    finally:
        servers.stop()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _tree(pid: int) -> list[int]:
    """pid and its descendants (tuft launch's worker is its child)."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
    return pids


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


class Meters:
    """Per-phase costs: each server process's CPU, and on PostgreSQL the WAL written and Redis
    commands processed (both server-wide: other users of a shared server add to them)."""

    def __init__(self, procs: dict[str, int], db_url: str, redis_url: str | None) -> None:
        self.procs, self.db_url, self.redis_url = procs, db_url, redis_url

    def read(self) -> dict[str, float]:
        values = {f"cpu_s_{name}": cpu_seconds(_tree(pid)) for name, pid in self.procs.items()}
        if self.db_url.startswith("postgresql"):
            from sqlalchemy import create_engine, text

            engine = create_engine(self.db_url)
            with engine.connect() as conn:
                values["wal_bytes"] = float(conn.execute(text("SELECT pg_current_wal_lsn() - '0/0'")).scalar_one())
            engine.dispose()
        if self.redis_url:
            import redis

            info = redis.Redis.from_url(self.redis_url).info("stats")
            values["redis_commands"] = float(info["total_commands_processed"])
        return values

    @staticmethod
    def per_op(before: dict[str, float], after: dict[str, float], ops: int) -> dict[str, float]:
        out = {}
        for key, value in after.items():
            delta = (value - before[key]) / max(ops, 1)
            name = key.replace("cpu_s_", "cpu_ms_") if key.startswith("cpu_s_") else key
            out[f"{name}_per_op"] = round(delta * 1000.0 if key.startswith("cpu_s_") else delta, 2)
        return out


# ---- clients ---------------------------------------------------------------------------------


def _training_client(service: Any) -> Any:
    from tinker import types

    made = service.create_lora_training_client(base_model=BASE_MODEL, rank=8, seed=0)
    client = made.result() if hasattr(made, "result") else made
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([101, 57, 12, 7]),
        loss_fn_inputs={"target_tokens": [57, 12, 7, 102]},
    )
    client.forward_backward([datum], "cross_entropy").result()
    return client


def _op_loop(client: Any, count: int | None, until: float | None, warmup: int) -> list[float]:
    from tinker import types

    adam = types.AdamParams(learning_rate=1e-4)
    for _ in range(warmup):
        client.optim_step(adam).result()
    latencies: list[float] = []
    while (count is not None and len(latencies) < count) or (until is not None and time.time() < until):
        start = time.perf_counter()
        client.optim_step(adam).result()
        latencies.append(time.perf_counter() - start)
    return latencies


def _runs_process(url: str, runs: int, barrier: Any, seconds: float, warmup: int, out: Any) -> None:
    """One client process: `runs` training clients, each in a thread, one op at a time."""
    import tinker

    service = tinker.ServiceClient(base_url=url, api_key=KEY)
    clients = [_training_client(service) for _ in range(runs)]
    for client in clients:
        _op_loop(client, warmup, None, 0)
    results: list[list[float]] = [[] for _ in clients]
    barrier.wait()  # every process has its clients built and warm
    until = time.time() + seconds

    def drive(i: int) -> None:
        results[i] = _op_loop(clients[i], None, until, 0)

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put([x for r in results for x in r])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000.0


def one_run(url: str, ops: int, warmup: int, meters: Meters) -> dict[str, Any]:
    import tinker

    load_before = os.getloadavg()
    client = _training_client(tinker.ServiceClient(base_url=url, api_key=KEY))
    _op_loop(client, warmup, None, 0)
    before = meters.read()
    latencies = _op_loop(client, ops, None, 0)
    cost = Meters.per_op(before, meters.read(), len(latencies))
    return {
        "cost": cost,
        "phase": "1 run",
        "ops": len(latencies),
        "p50_ms": round(pct(latencies, 0.5), 2),
        "p99_ms": round(pct(latencies, 0.99), 2),
        "mean_ms": round(statistics.fmean(latencies) * 1000.0, 2),
        "ops_per_s": round(len(latencies) / sum(latencies), 1),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }


def many_runs(url: str, runs: int, procs: int, seconds: float, warmup: int, meters: Meters) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    shares = [n for n in (runs // procs + (1 if i < runs % procs else 0) for i in range(procs)) if n > 0]
    barrier = ctx.Barrier(len(shares) + 1)
    workers = [ctx.Process(target=_runs_process, args=(url, n, barrier, seconds, warmup, out)) for n in shares]
    for w in workers:
        w.start()
    barrier.wait(timeout=900)
    load_before = os.getloadavg()
    before = meters.read()
    latencies: list[float] = []
    for _ in workers:
        latencies += out.get(timeout=seconds + 600)
    cost = Meters.per_op(before, meters.read(), len(latencies))
    load_after = os.getloadavg()
    for w in workers:
        w.join(timeout=60)
    return {
        "phase": f"{runs} runs",
        "cost": cost,
        "runs": runs,
        "client_processes": len(workers),
        "seconds": seconds,
        "ops": len(latencies),
        "ops_per_s": round(len(latencies) / seconds, 1),
        "p50_ms": round(pct(latencies, 0.5), 2),
        "p99_ms": round(pct(latencies, 0.99), 2),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in load_after],
    }


def stages(db_url: str) -> dict[str, float]:
    """Where the 1-run ops' time went, from the ops rows (the database clock): median ms of
    committed -> claimed, claimed -> result committed, result committed -> delivered."""
    from sqlalchemy import create_engine, text

    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT created_at, started_at, finished_at, delivered_at FROM ops WHERE kind = 'optim_step' "
                    "AND delivered_at IS NOT NULL ORDER BY created_at"
                )
            ).all()
    finally:
        engine.dispose()
    spans = {
        "committed_to_claimed": [r[1] - r[0] for r in rows],
        "claimed_to_result": [r[2] - r[1] for r in rows],
        "result_to_delivered": [r[3] - r[2] for r in rows],
    }
    return {k: round(statistics.median(v) * 1000.0, 2) for k, v in spans.items() if v}


# ---- main ------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    from importlib.metadata import version

    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=SERVER_REPO, capture_output=True, text=True)
    return {
        "tinker": version("tinker"),
        "python": platform.python_version(),
        "cpus": str(os.cpu_count()),
        "commit": git.stdout.strip(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="pg,embedded", help="pg, embedded, or both (comma-separated)")
    p.add_argument("--ops", type=int, default=300, help="ops timed at 1 run")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--runs", type=int, default=32)
    p.add_argument("--procs", type=int, default=4, help="client processes for the many-runs phase")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument(
        "--pg-admin-url",
        default=os.environ.get("TUFT_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"),
    )
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/7")
    p.add_argument("--repo", type=Path, default=REPO, help="the TuFT tree whose server is measured (a baseline)")
    p.add_argument("--label", default="", help="a note stored with the rows (e.g. the code's state)")
    p.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / f"{time.strftime('%Y-%m-%d')}-queue-cost.json"
    )
    args = p.parse_args()
    global SERVER_REPO
    SERVER_REPO = args.repo.resolve()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    rows: list[dict[str, Any]] = []
    for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        with tempfile.TemporaryDirectory(prefix=f"tuft-queue-cost-{shape}-") as tmp:
            work = Path(tmp)
            server = embedded(work) if shape == "embedded" else deployment(work, args.pg_admin_url, args.redis_url)
            with server as (url, db_url, meters):
                single = one_run(url, args.ops, args.warmup, meters)
                single["stages_ms"] = stages(db_url)
                for row in (single, many_runs(url, args.runs, args.procs, args.seconds, args.warmup, meters)):
                    row.update(shape=shape, label=args.label)
                    rows.append(row)
                    print(json.dumps(row), flush=True)

    summary = summarise(rows)
    print(summary["text"])
    record = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": platform.node(),
        "versions": versions(),
    }
    record.update(rows=rows, targets=TARGETS, ratios=summary["ratios"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(args.out.read_text()) if args.out.exists() else []
    args.out.write_text(json.dumps([*existing, record], indent=1) + "\n")
    print(f"written to {args.out}")


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by = {(r["shape"], r["phase"].split()[0] == "1"): r for r in rows}
    lines = [f"{'shape':10} {'phase':8} {'p50 ms':>8} {'p99 ms':>8} {'ops/s':>8}  load (1/5/15 min) before -> after"]
    for r in rows:
        lines.append(
            f"{r['shape']:10} {r['phase']:8} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {r['ops_per_s']:8.1f}  "
            f"{r['load_before']} -> {r['load_after']}"
        )
    ratios: dict[str, float] = {}
    pg1, em1 = by.get(("pg", True)), by.get(("embedded", True))
    pgn, emn = by.get(("pg", False)), by.get(("embedded", False))
    if pg1 and em1:
        ratios["embedded/pg p50 1 run"] = round(em1["p50_ms"] / pg1["p50_ms"], 2)
        ratios["embedded/pg p99 1 run"] = round(em1["p99_ms"] / pg1["p99_ms"], 2)
    if pgn and emn:
        ratios["pg/embedded ops/s many runs"] = round(pgn["ops_per_s"] / emn["ops_per_s"], 2)
        ratios["embedded/pg p99 many runs"] = round(emn["p99_ms"] / pgn["p99_ms"], 2)
    for r in rows:
        one = r["phase"] == "1 run"
        if one:
            ratios[f"{r['shape']} p50 / target"] = round(r["p50_ms"] / TARGETS["p50_1run_ms"], 2)
            ratios[f"{r['shape']} p99 / target"] = round(r["p99_ms"] / TARGETS["p99_1run_ms"], 2)
        else:
            ratios[f"{r['shape']} ops/s / target"] = round(r["ops_per_s"] / TARGETS["ops_per_s_32"], 2)
            ratios[f"{r['shape']} p99 many / target"] = round(r["p99_ms"] / TARGETS["p99_32_ms"], 2)
    lines += [f"{k}: {v}" for k, v in ratios.items()]
    return {"text": "\n".join(lines), "ratios": ratios}


if __name__ == "__main__":
    main()
