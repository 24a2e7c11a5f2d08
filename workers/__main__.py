"""`python -m workers` (what `tuft worker` runs): one worker process per GPU, or one on the CPU.

CUDA_VISIBLE_DEVICES is set before torch is imported, so the process only ever sees its own GPU.
With a Redis URL the process is a Celery worker (solo pool, its own queue plus the shared queue
for unassigned runs) whose single task rings the runner's wake event; without one, the runner
polls the database by itself (the embedded default).
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from app.config import ConfigError, Settings, load_settings
from app.domain.models import BUILTIN_TINY_PATH
from app.queue.submit import NEW_RUNS_QUEUE

if TYPE_CHECKING:
    from workers.engine import EngineConfig

log = logging.getLogger("tuft.worker")

# Exit status after a sticky device error (workers/engine/errors.py, DeviceFatal): nothing of the
# failing op was committed; its runs were released for other workers and the supervisor
# (`tuft launch`, systemd, compose's restart policy) starts a fresh process with a fresh context.
EXIT_DEVICE_FATAL = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tuft worker", description="Run one TuFT GPU/CPU worker.")
    p.add_argument("--gpu", type=int, default=None, help="GPU index to pin (sets CUDA_VISIBLE_DEVICES)")
    p.add_argument("--gpus", default=None, help="several GPUs of this host for one worker, e.g. 0,1 (multi_gpu.py)")
    p.add_argument(
        "--shard",
        default=None,
        choices=["auto", "replicate", "fsdp"],
        help="with --gpus: base models replicated, sharded with FSDP2, or auto (worker_shard)",
    )
    p.add_argument("--device", default=None, help="cpu | cuda | auto (default: settings.worker_device)")
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("--database-url", default=None)
    p.add_argument("--redis-url", default=None)
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--worker-id", default=None)
    return p.parse_args(argv)


def _device(args: argparse.Namespace, settings: Settings) -> str:
    if args.gpus is not None and len(args.gpus) > 1:
        from workers.multi_gpu import pin_gpus

        pin_gpus(args.gpus)
        return "cuda"
    if args.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.gpu)
        return "cuda"
    choice = args.device or settings.worker_device
    if choice == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def engine_config(settings: Settings) -> EngineConfig:
    """The engine's settings as plain values: workers/engine never reads app.config."""
    from workers.engine import EngineConfig

    tokens = settings.micro_batch_tokens
    return EngineConfig(
        micro_batch_tokens=None if tokens == "auto" else tokens,
        activation_checkpointing=settings.activation_checkpointing,
        kernels=settings.engine_kernels,
        batch_runs=settings.engine_batch_runs,
        batch_samples=settings.engine_batch_samples,
        lora_kernel=settings.engine_lora_kernel,
        deterministic=settings.engine_deterministic,
        decode_graphs=settings.engine_decode_graphs,
        decode_cache_bytes=None if settings.engine_decode_cache_bytes == "auto" else settings.engine_decode_cache_bytes,
    )


def _wait_for_schema(settings: Settings, db: object, register: object) -> None:
    """The API (or `tuft db upgrade`) migrates; a worker started first waits for the tables."""
    deadline = time.monotonic() + 120
    while True:
        try:
            register()  # type: ignore[operator]
            return
        except Exception as exc:
            if time.monotonic() > deadline:
                raise
            log.info("waiting for the database schema (%s)", type(exc).__name__)
            time.sleep(1.0)


def _die_with_parent() -> None:
    """Started by `tuft launch`: get SIGTERM when it dies, and stop now if it already has."""
    parent = os.environ.get("TUFT_DIE_WITH_PARENT")
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != int(parent):
        sys.exit(0)


def _warm_builtin_tokenizer(settings: Settings, cache_dir: Path) -> None:
    """Build the built-in model's tokenizer folder now rather than when a run first needs the
    model: get_info points clients' get_tokenizer() at that folder once it exists (app/api/
    catalog.py), and the 0.38 SDK asks right after creating a training client, before any op. The
    build is atomic and shared with the engine's own lazy one (tiny.py), so racing them is fine."""
    if not any(m.model_path == BUILTIN_TINY_PATH for m in settings.models()):
        return
    from workers.engine import build_tiny_tokenizer

    def build() -> None:
        try:
            build_tiny_tokenizer(cache_dir)
        except Exception:  # the engine builds it again when a run needs it, and reports that
            log.exception("could not build the built-in tokenizer cache at startup")

    threading.Thread(target=build, name="tuft-tokenizer-cache", daemon=True).start()


def _api_bell(settings: Settings) -> Callable[[], object]:
    from app import localbell

    return localbell.BellSender(localbell.bell_dir(settings.resolved_data_dir()), localbell.API_SUFFIX).ring


def main(argv: list[str] | None = None) -> int:
    _die_with_parent()
    # `kill -USR1 <pid>` prints every thread's stack to the worker's stderr: how an operator (or a
    # failing chaos test) sees where a worker that makes no progress is waiting. Under Celery its
    # own SIGUSR1 handler replaces this one and prints the same.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.config or args.database_url or args.redis_url or args.data_dir:
            settings = load_settings(
                args.config, database_url=args.database_url, redis_url=args.redis_url, data_dir=args.data_dir
            )
        else:
            settings = load_settings()
    except ConfigError as exc:
        print(f"tuft worker: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    from app import logcontext

    logcontext.configure(settings.log_format)  # log_format: text or JSON lines (docs/metrics.md)
    logging.getLogger().setLevel(settings.log_level.upper())
    from workers.multi_gpu import parse_gpus

    try:
        # --gpus, else worker_gpus unless --gpu/--device chose; one GPU is the plain --gpu worker.
        args.gpus = parse_gpus(args.gpus) or (
            parse_gpus(settings.worker_gpus) if args.gpu is None and args.device is None else None
        )
    except ValueError as exc:
        print(f"tuft worker: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    if args.gpus is not None and len(args.gpus) == 1:
        args.gpu, args.gpus = args.gpus[0], None
    device = _device(args, settings)
    # Refuse a schema this release does not know (a newer release migrated the database) before
    # anything runs; an older one is waited for (the API or `tuft db upgrade` migrates it).
    from app.db.migrate import SchemaError, wait_for_current

    try:
        wait_for_current(settings.resolved_database_url(), "tuft worker", timeout=120)
    except SchemaError as exc:
        print(exc, file=sys.stderr)  # noqa: T201
        return 2

    # Imported only now: torch must not see CUDA before CUDA_VISIBLE_DEVICES is set.
    from app import localbell
    from app.db.engine import Database, DbTimeouts
    from app.queue import leases
    from workers.engine import DeviceFatal, OpInputError, OutOfMemory
    from workers.heartbeat import Heartbeat
    from workers.runner import Runner

    host = socket.gethostname()
    worker_id = args.worker_id or f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    queue = f"gpu.{host}.{args.gpu}" if args.gpu is not None else f"{device}.{host}.{os.getpid()}"
    if args.gpus is not None:
        queue = f"gpu.{host}.{'-'.join(str(g) for g in args.gpus)}"
    db = Database(
        settings.resolved_database_url(),
        process_name=f"worker-{worker_id}",
        timeouts=DbTimeouts.for_lease(settings.lease_ttl_seconds),  # bounds a paused transaction
    )
    cache_dir = settings.resolved_data_dir() / "cache"
    from workers.multi_gpu import make_engine

    # With --gpus, ranks 1..N-1 start here (each loads its replica or shard lazily, like rank 0).
    ranks = len(args.gpus) if args.gpus is not None else 1
    shard = args.shard or settings.worker_shard
    engine = make_engine(settings.models(), device, cache_dir, engine_config(settings), ranks, shard=shard)
    _warm_builtin_tokenizer(settings, cache_dir)
    runner = Runner(
        settings,
        db,
        engine,
        worker_id=worker_id,
        user_errors=(OpInputError,),
        fatal_errors=(DeviceFatal,),
        oom_errors=(OutOfMemory,),
        # Under Celery the main thread is the consumer: a SIGTERM to ourselves is its warm shutdown.
        on_fatal=(lambda: os.kill(os.getpid(), signal.SIGTERM)) if settings.redis_url else None,
        # SQLite has no NOTIFY (app/queue/notify.py): a datagram to this host's APIs after each
        # commit wakes their waiting long-polls (issue 11).
        on_commit=_api_bell(settings) if db.sqlite else (lambda: None),
    )

    def register() -> None:
        with db.write() as s:
            leases.register_worker(s, worker_id=worker_id, host=host, device=device, queue=queue, pid=os.getpid())

    _wait_for_schema(settings, db, register)
    from workers.metrics import serve_metrics

    # GPU and snapshot numbers (docs/metrics.md); a worker over several GPUs listens at its first's port.
    serve_metrics(settings, worker_id, device, args.gpu if args.gpus is None else args.gpus[0])
    log.info(
        "worker %s on %s serving %s (queue %s)",
        worker_id,
        device,
        [m.model_name for m in settings.models()],
        queue,
    )
    heartbeat = Heartbeat(
        db,
        worker_id,
        interval=settings.heartbeat_seconds,
        ttl=settings.lease_ttl_seconds,
        states=runner.states,
        stop=runner.stop,
        on_renewed=lambda t: setattr(runner, "last_renewal", t),
    )
    heartbeat.start()
    if not db.sqlite:
        from workers.pglisten import WorkListener

        WorkListener(
            settings.database_listen_url or db.url, queue, runner.wake, runner.stop, db=db, worker_id=worker_id
        ).start()

    def _stop(*_: object) -> None:
        runner.stop.set()
        runner.wake.set()

    code = 0
    try:
        if settings.redis_url:
            from workers.celery_app import make_celery

            loop = threading.Thread(target=runner.run_forever, name="tuft-runner", daemon=True)
            loop.start()
            celery = make_celery(settings.redis_url, runner.wake)
            celery.worker_main(
                [
                    "worker",
                    "--pool=solo",
                    "--concurrency=1",
                    f"--queues={queue},{NEW_RUNS_QUEUE}",
                    f"--hostname={worker_id}@{host}",
                    "--without-gossip",
                    "--without-mingle",
                    "--loglevel=INFO",
                ]
            )
            _stop()
            loop.join(timeout=30)
        else:
            signal.signal(signal.SIGTERM, _stop)
            signal.signal(signal.SIGINT, _stop)
            # No broker: the API rings this host's workers directly (app/localbell.py).
            bell = localbell.listen(settings.resolved_data_dir(), runner.wake)
            try:
                runner.run_forever()
            finally:
                if bell is not None:
                    bell.close()
    except SystemExit as exc:  # Celery ends its worker with sys.exit
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        _stop()
        heartbeat.join(timeout=10)  # no renewal may land after the release below
        runner.snapshots.close()
        if hasattr(engine, "close"):
            engine.close()  # the data-parallel engine's ranks (multi_gpu.py)
        try:
            with db.write() as s:
                leases.release_all(s, worker_id)
            log.info("worker %s released its runs", worker_id)
        except Exception as exc:
            log.warning("could not release runs on exit: %s", exc)
        db.dispose()
    if runner.fatal is not None:
        log.critical("worker %s exits after a device error: %s", worker_id, runner.fatal)
        return EXIT_DEVICE_FATAL
    return code


if __name__ == "__main__":
    sys.exit(main())
