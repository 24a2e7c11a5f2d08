"""1,000 simulated runs against one API (issue 11 item 4): does the server stay correct and fair
when a thousand training runs talk to it at once, and what does it cost?

Starts one `tuft api` and `--workers` `tuft worker`s on a fresh PostgreSQL database with Redis
(`pg`), and/or `tuft launch` (`embedded`, SQLite), through bench/queue_cost.py's helpers, then
simulates `--runs` runs with asyncio + httpx in `--procs` client processes, speaking the wire
protocol as the tinker SDK does (../shared/docs/tinker-protocol.md): each run opens a session,
creates a LoRA training run of the built-in tiny model and runs its first op (all runs at once:
that burst is part of the test), heartbeats its session every 10 s, and for `--seconds` submits an `optim_step` and
long-polls `retrieve_future` until the result comes (re-polling at once on `try_again`, as the
SDK does), optionally pausing `--think` seconds (exponentially distributed) between ops. The
engine's cost is not the point: an `optim_step` of the tiny model is about a millisecond.

Reported (and appended as JSON to bench/results/<date>-load-1000.json): errors by kind (any
non-200 reply, transport error, failed future or op still unfinished DRAIN_S after the end; must
be 0), latency percentiles from submit to result, ops/s, ops per run (min / median / max: a run
starved by the others shows as min 0), the setup burst's duration, the API's and workers' CPU,
PostgreSQL connections of the test database (peak), the API's open file descriptors and threads
(peak) and the load average. The machine is shared: read the numbers with the load average.

    python bench/load_1000.py                                   # pg, 1,000 runs, 90 s
    python bench/load_1000.py --shapes pg,embedded --seconds 60
    python bench/load_1000.py --runs 200 --seconds 20 --think 1 # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import queue_cost as qc  # bench/ is a folder of scripts, not a package

# The adapter on the output layer only: all adapters of a worker live in one PEFT model, where adding
# or stepping one walks every resident adapter's layers (workers/engine/adapters.py), so with the
# attention and MLP targets too 1,000 runs on one CPU worker spend minutes in the engine alone.
# --lora-all puts them back.
LORA: dict[str, Any] = {"rank": 8, "seed": 0, "train_attn": False, "train_mlp": False, "train_unembed": True}
# An op still running this long after the end is counted as an error (a lost or stuck op); a backlog
# of 1,000 ops at ~20 ops/s takes ~50 s to drain, so less would count mere queueing.
DRAIN_S = 300.0
HEARTBEAT_S = 10.0  # the SDK's session heartbeat period (tinker-protocol.md §2.5)
SUBMIT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
POLL_TIMEOUT = httpx.Timeout(45.0, connect=10.0)  # the SDK's retrieve_future read timeout


# ---- one simulated run -----------------------------------------------------------------------


class Tally:
    """One client process's counts."""

    def __init__(self) -> None:
        self.errors: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.setup: list[float] = []
        self.ops_per_run: list[int] = []
        self.polls = 0
        self.try_agains = 0
        self.heartbeats = 0


async def post(client: httpx.AsyncClient, tally: Tally, path: str, body: dict[str, Any], limit: httpx.Timeout) -> Any:
    """POST, retried like the SDK (5xx, 408, 429 and transport errors, with backoff); every retry
    is counted as an error, since the test's bar is zero of them."""
    for attempt in range(8):
        try:
            resp = await client.post(path, json=body, timeout=limit)
        except httpx.HTTPError as exc:
            tally.errors[f"{path} {type(exc).__name__}"] += 1
        else:
            if resp.status_code == 200:
                return resp.json()
            tally.errors[f"{path} HTTP {resp.status_code}"] += 1
            if resp.status_code < 500 and resp.status_code not in (408, 429):
                raise RuntimeError(f"{path}: HTTP {resp.status_code} {resp.text[:200]}")
        await asyncio.sleep(min(0.5 * 2**attempt, 8.0))
    raise RuntimeError(f"{path}: gave up after retries")


async def result_of(client: httpx.AsyncClient, tally: Tally, request_id: str) -> Any:
    """Long-poll a future as the SDK does: re-poll at once on try_again."""
    while True:
        tally.polls += 1
        reply = await post(client, tally, "/api/v1/retrieve_future", {"request_id": request_id}, POLL_TIMEOUT)
        if reply.get("type") == "try_again":
            tally.try_agains += 1
            continue
        if "error" in reply:
            raise RuntimeError(f"future failed: {reply}")
        return reply


async def heartbeat(client: httpx.AsyncClient, tally: Tally, session_id: str, stop: asyncio.Event) -> None:
    await asyncio.sleep(random.uniform(0, HEARTBEAT_S))  # sessions started together beat apart
    while not stop.is_set():
        with contextlib.suppress(RuntimeError):
            await post(client, tally, "/api/v1/session_heartbeat", {"session_id": session_id}, SUBMIT_TIMEOUT)
            tally.heartbeats += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), HEARTBEAT_S)


async def create_run(client: httpx.AsyncClient, tally: Tally) -> tuple[str, str]:
    start = time.perf_counter()
    session = await post(client, tally, "/api/v1/create_session", {"tags": [], "user_metadata": {}}, SUBMIT_TIMEOUT)
    made = await post(
        client,
        tally,
        "/api/v1/create_model",
        {
            "session_id": session["session_id"],
            "model_seq_id": 0,
            "base_model": qc.BASE_MODEL,
            "lora_config": LORA,
            "optimizer_config": {"type": "adamw"},
        },
        SUBMIT_TIMEOUT,
    )
    model = await result_of(client, tally, made["request_id"])
    # A run's first op builds its adapter on the worker (≈ 0.25 s of CPU for the tiny model): done
    # here, so the timed phase is the steady state of runs already under way.
    warm = await post(client, tally, "/api/v1/optim_step", optim_step(model["model_id"], 1), SUBMIT_TIMEOUT)
    await result_of(client, tally, warm["request_id"])
    tally.setup.append(time.perf_counter() - start)
    return session["session_id"], model["model_id"]


def optim_step(model_id: str, seq: int) -> dict[str, Any]:
    return {"model_id": model_id, "seq_id": seq, "adam_params": {"learning_rate": 1e-4}}


async def drive(client: httpx.AsyncClient, tally: Tally, model_id: str, until: float, think: float) -> None:
    seq, done = 2, 0
    if think > 0:  # runs already under way are out of step: no burst of all of them at once
        await asyncio.sleep(random.uniform(0, think))
    try:
        while time.time() < until:
            start = time.perf_counter()
            submitted = await post(client, tally, "/api/v1/optim_step", optim_step(model_id, seq), SUBMIT_TIMEOUT)
            seq += 1
            await result_of(client, tally, submitted["request_id"])
            tally.latencies.append(time.perf_counter() - start)
            done += 1
            if think > 0:  # a pause never runs past the end: what is still running then is an op
                await asyncio.sleep(max(0.0, min(random.expovariate(1.0 / think), until - time.time())))
    except RuntimeError as exc:
        tally.errors[str(exc)[:120]] += 1
    finally:
        tally.ops_per_run.append(done)


async def simulate(url: str, runs: int, seconds: float, think: float, ready: Any, go: Any, out: Any) -> None:
    tally = Tally()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    headers = {"X-API-Key": qc.KEY}
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits) as client:
        made = await asyncio.gather(*(create_run(client, tally) for _ in range(runs)), return_exceptions=True)
        ok = [m for m in made if isinstance(m, tuple)]
        for m in made:
            if isinstance(m, BaseException):
                tally.errors[f"create_run: {str(m)[:100]}"] += 1
        stop = asyncio.Event()
        beats = [asyncio.create_task(heartbeat(client, tally, session, stop)) for session, _ in ok]
        ready.put(len(ok))
        tally.polls = tally.try_agains = 0  # counted for the timed phase only
        await asyncio.to_thread(go.wait)  # every process has its runs built
        until = time.time() + seconds
        driving = [asyncio.create_task(drive(client, tally, model, until, think)) for _, model in ok]
        _, late = await asyncio.wait(driving, timeout=seconds + DRAIN_S)
        tally.errors[f"op unfinished {DRAIN_S:.0f} s after the end"] += len(late)
        for task in late:
            task.cancel()
        stop.set()
        await asyncio.gather(*beats, *late, return_exceptions=True)
    out.put(
        {
            "errors": dict(+tally.errors),
            "latencies": tally.latencies,
            "setup": tally.setup,
            "ops_per_run": tally.ops_per_run,
            "polls": tally.polls,
            "try_agains": tally.try_agains,
            "heartbeats": tally.heartbeats,
        }
    )


def client_process(
    url: str, runs: int, seconds: float, think: float, ready: Any, go: Any, out: Any, lora_all: bool
) -> None:
    if lora_all:
        LORA.update(train_attn=True, train_mlp=True)
    asyncio.run(simulate(url, runs, seconds, think, ready, go, out))


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def gather(procs: list[Any], q: Any, deadline: float, servers: list[int]) -> list[Any]:
    """One item from each client process, in short waits (so Ctrl-C and SIGTERM get through), and
    failing as soon as a client or server process dies instead of waiting for the deadline."""
    import queue

    items: list[Any] = []
    while len(items) < len(procs):
        try:
            items.append(q.get(timeout=1.0))
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                raise RuntimeError("a client process died") from None
            if not all(alive(pid) for pid in servers):
                raise RuntimeError("a server process died (its log is in the work folder)") from None
            if time.monotonic() > deadline:
                raise RuntimeError("timed out waiting for the client processes") from None
    return items


# ---- the server side, sampled while the test runs ---------------------------------------------


class Sampler(threading.Thread):
    """Every second: load average, the test database's PostgreSQL connections, the API's open
    file descriptors and threads."""

    def __init__(self, db_url: str, api_pid: int) -> None:
        super().__init__(daemon=True)
        self.db_url, self.api_pid = db_url, api_pid
        self.samples: list[dict[str, float]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        engine = None
        if self.db_url.startswith("postgresql"):
            from sqlalchemy import create_engine

            engine = create_engine(self.db_url, pool_size=1)
        while not self.halt.wait(1.0):
            sample: dict[str, float] = {"load1": os.getloadavg()[0]}
            with contextlib.suppress(OSError):
                sample["api_fds"] = len(os.listdir(f"/proc/{self.api_pid}/fd"))
                sample["api_threads"] = len(os.listdir(f"/proc/{self.api_pid}/task"))
            if engine is not None:
                from sqlalchemy import text

                with contextlib.suppress(Exception), engine.connect() as conn:
                    rows = conn.execute(
                        text(
                            "SELECT state, count(*) FROM pg_stat_activity WHERE datname = current_database() "
                            "AND pid <> pg_backend_pid() GROUP BY state"
                        )
                    ).all()
                    sample["db_connections"] = float(sum(n for _, n in rows))
                    sample["db_active"] = float(sum(n for s, n in rows if s == "active"))
            self.samples.append(sample)
        if engine is not None:
            engine.dispose()

    def summary(self) -> dict[str, float]:
        keys = {k for s in self.samples for k in s}
        out: dict[str, float] = {}
        for k in sorted(keys):
            values = [s[k] for s in self.samples if k in s]
            out[f"{k}_max"] = round(max(values), 2)
            out[f"{k}_mean"] = round(statistics.fmean(values), 2)
        return out


def load_test(url: str, db_url: str, meters: qc.Meters, args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out, ready, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    shares = [args.runs // args.procs + (1 if i < args.runs % args.procs else 0) for i in range(args.procs)]
    sampler = Sampler(db_url, next(iter(meters.procs.values())))
    sampler.start()
    setup_start = time.perf_counter()
    procs = [
        ctx.Process(
            target=client_process,
            args=(url, n, args.seconds, args.think, ready, go, out, args.lora_all),
            daemon=True,
        )
        for n in shares
    ]
    for p in procs:
        p.start()
    servers = list(meters.procs.values())
    built = sum(gather(procs, ready, time.monotonic() + 1800, servers))
    setup_s = time.perf_counter() - setup_start
    before, load_before, t0 = meters.read(), os.getloadavg(), time.perf_counter()
    go.set()
    parts = gather(procs, out, time.monotonic() + args.seconds + DRAIN_S + 120, servers)
    elapsed = time.perf_counter() - t0
    cost = qc.Meters.per_op(before, meters.read(), sum(len(p["latencies"]) for p in parts))
    load_after = os.getloadavg()
    sampler.halt.set()
    sampler.join(timeout=10)
    for p in procs:
        p.join(timeout=60)
    latencies = [x for p in parts for x in p["latencies"]]
    per_run = sorted(n for p in parts for n in p["ops_per_run"])
    errors: Counter[str] = Counter()
    for p in parts:
        errors.update(p["errors"])
    setup = [x for p in parts for x in p["setup"]]
    return {
        "runs": args.runs,
        "client_processes": args.procs,
        "seconds": args.seconds,
        "think_s": args.think,
        "lora": {**LORA, **({"train_attn": True, "train_mlp": True} if args.lora_all else {})},
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "runs_built": built,
        "setup_s": round(setup_s, 1),
        "create_run_p50_ms": round(qc.pct(setup, 0.5), 1) if setup else None,
        "create_run_max_ms": round(max(setup) * 1000.0, 1) if setup else None,
        "ops": len(latencies),
        "ops_per_s": round(len(latencies) / args.seconds, 1),
        "p50_ms": round(qc.pct(latencies, 0.5), 1) if latencies else None,
        "p90_ms": round(qc.pct(latencies, 0.9), 1) if latencies else None,
        "p99_ms": round(qc.pct(latencies, 0.99), 1) if latencies else None,
        "max_ms": round(max(latencies) * 1000.0, 1) if latencies else None,
        "ops_per_run_min_median_max": [per_run[0], statistics.median(per_run), per_run[-1]] if per_run else None,
        "runs_with_no_op": sum(1 for n in per_run if n == 0),
        "polls_per_op": round(sum(p["polls"] for p in parts) / max(len(latencies), 1), 2),
        "try_agains": sum(p["try_agains"] for p in parts),
        "heartbeats_per_s": round(sum(p["heartbeats"] for p in parts) / elapsed, 1),
        "cost": cost,
        "server": sampler.summary(),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in load_after],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="pg", help="pg, embedded, or both (comma-separated)")
    p.add_argument("--runs", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=90.0, help="how long the runs submit ops")
    p.add_argument("--think", type=float, default=0.0, help="mean pause between a run's ops, seconds")
    p.add_argument("--procs", type=int, default=2, help="client processes")
    p.add_argument("--workers", type=int, default=1, help="tuft workers (pg shape)")
    p.add_argument("--lora-all", action="store_true", help="adapters on attention and MLP too (see LORA)")
    p.add_argument(
        "--server-config",
        default="max_resident_runs: 0\n",
        help="YAML added to the servers' config (default: every run stays resident, so the tiny "
        "model's engine is not thrashed by evictions; the queue is what is measured)",
    )
    p.add_argument(
        "--pg-admin-url",
        default=os.environ.get("TUFT_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"),
    )
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/7")
    p.add_argument("--repo", type=Path, default=qc.REPO, help="the TuFT tree whose server is measured")
    p.add_argument("--label", default="")
    p.add_argument(
        "--out", type=Path, default=qc.REPO / "bench" / "results" / f"{time.strftime('%Y-%m-%d')}-load-1000.json"
    )
    args = p.parse_args()
    qc.SERVER_REPO = args.repo.resolve()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    rows = []
    for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        with tempfile.TemporaryDirectory(prefix=f"tuft-load-{shape}-") as tmp:
            work = Path(tmp)
            if shape == "embedded":
                server = qc.embedded(work, args.server_config)
            else:
                server = qc.deployment(work, args.pg_admin_url, args.redis_url, args.server_config, args.workers)
            with server as (url, db_url, meters):
                row = load_test(url, db_url, meters, args)
                row.update(shape=shape, label=args.label, server_config=args.server_config, workers=args.workers)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if row["errors"]:
                    print(qc.Servers(work).logs()[-6000:], file=sys.stderr)
    record = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": qc.platform.node(),
        "versions": qc.versions(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(args.out.read_text()) if args.out.exists() else []
    args.out.write_text(json.dumps([*existing, record], indent=1) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
