"""The `tuft` command: launch (embedded default), api, worker, db, keys.

Options mirror the original TuFT's `tuft launch --port --config`. The worker is always a separate
process (`python -m workers`): the API side never imports torch or the worker code.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from app.config import DEFAULT_PORT, ConfigError, Settings, load_settings

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        help="YAML config file, ours or the original TuFT's (default: $TUFT_CONFIG; docs/configuration.md)",
    )
    p.add_argument("--data-dir", type=Path, default=None, help="data directory (default ~/.tuft)")
    p.add_argument("--database-url", default=None, help="PostgreSQL URL; default: SQLite in the data dir")
    p.add_argument("--redis-url", default=None, help="Redis URL for the Celery doorbell; default: none")


def _add_server(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("-p", "--port", type=int, default=None, help=f"port (default {DEFAULT_PORT})")
    # The original TuFT's `tuft launch` flags, so its users' commands keep working.
    p.add_argument("--log-level", default=None, choices=LOG_LEVELS, help="lowest level logged (default info)")
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="checkpoints (default <data-dir>/checkpoints)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuft", description="TuFT: a durable, self-hosted Tinker-compatible server")
    sub = parser.add_subparsers(dest="command", required=True)

    launch = sub.add_parser("launch", help="migrate, start one worker and serve the API (embedded default)")
    _add_common(launch)
    _add_server(launch)
    launch.add_argument("--device", default=None, help="worker device: auto | cpu | cuda")

    api = sub.add_parser("api", help="serve the API only (deployments)")
    _add_common(api)
    _add_server(api)
    api.add_argument("--migrate", action="store_true", help="run database migrations before serving")

    worker = sub.add_parser("worker", help="run one worker (one per GPU)")
    _add_common(worker)
    worker.add_argument("--gpu", type=int, default=None, help="GPU index to pin")
    worker.add_argument("--gpus", default=None, help="several GPUs of this host for one worker, e.g. 0,1")
    worker.add_argument(
        "--shard", default=None, choices=["auto", "replicate", "fsdp"], help="with --gpus: base models sharded or not"
    )
    worker.add_argument("--device", default=None, help="cpu | cuda | auto")

    db = sub.add_parser("db", help="database schema")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    for name, text in (("upgrade", "apply all migrations"), ("check", "fail if models and schema differ")):
        p = db_sub.add_parser(name, help=text)
        _add_common(p)

    keys = sub.add_parser("keys", help="API keys (stored hashed)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key and print it once")
    _add_common(create)
    create.add_argument("--tenant", required=True)
    create.add_argument("--name", default="")
    lst = keys_sub.add_parser("list", help="list keys (prefixes only)")
    _add_common(lst)
    revoke = keys_sub.add_parser("revoke", help="revoke a key by id or prefix")
    _add_common(revoke)
    revoke.add_argument("key", help="key id (from `tuft keys list`) or the key's prefix")
    for p in (create, lst, revoke):
        p.add_argument("--json", action="store_true", help="machine-readable output")
    from app.cli.admin import add_parsers

    add_parsers(sub, _add_common)
    from app.cli.health import add_parser as add_health_parser

    add_health_parser(sub, _add_common)
    from app.cli.config_cmd import add_parser as add_config_parser

    add_config_parser(sub)
    return parser


def config_path(args: argparse.Namespace) -> Path | None:
    """--config, else TUFT_CONFIG (as in the original TuFT), else none."""
    given: Path | None = getattr(args, "config", None)
    if given is None and os.environ.get("TUFT_CONFIG"):
        return Path(os.environ["TUFT_CONFIG"])
    return given


def settings_from(args: argparse.Namespace) -> Settings:
    return load_settings(
        config_path(args),
        checkpoint_dir=getattr(args, "checkpoint_dir", None),
        log_level=getattr(args, "log_level", None),
        data_dir=getattr(args, "data_dir", None),
        database_url=getattr(args, "database_url", None),
        redis_url=getattr(args, "redis_url", None),
        host=getattr(args, "host", None),
        port=getattr(args, "port", None),
        worker_device=getattr(args, "device", None),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "config":
        from app.cli.config_cmd import run_config

        return run_config(args)
    if hasattr(args, "config"):
        args.config = config_path(args)
    if args.command == "worker":
        # Replace this process with the worker so signals and exit codes are the worker's own.
        cmd = [sys.executable, "-m", "workers"]
        for flag in ("config", "data_dir", "database_url", "redis_url", "gpu", "gpus", "shard", "device"):
            value = getattr(args, flag)
            if value is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(value)]
        os.execv(sys.executable, cmd)
    try:
        settings = settings_from(args)
    except ConfigError as exc:
        print(f"tuft: {exc}", file=sys.stderr)
        return 2
    from sqlalchemy.exc import OperationalError

    from app.db.migrate import SchemaError

    try:
        return _dispatch(args, settings)
    except SchemaError as exc:
        # A schema this release does not know (or one not yet upgraded): one clear line, exit 2.
        print(exc, file=sys.stderr)
        return 2
    except OperationalError as exc:
        # A wrong URL, a stopped server or a missing SQLite file: say so in one line.
        print(f"tuft: cannot use the database: {exc.orig}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "launch":
        from app.cli.serve import launch

        return launch(settings)
    if args.command == "api":
        from app.cli.serve import serve_api

        return serve_api(settings, run_migrations=args.migrate)
    if args.command == "db":
        from app.db import migrate

        url = settings.resolved_database_url()
        if args.db_command == "upgrade":
            settings.resolved_data_dir().mkdir(parents=True, exist_ok=True)
            migrate.safe_upgrade(url)
            print(f"database at head: {migrate.redact(url)}")
        else:
            migrate.check(url)
            print("schema matches the models")
        return 0
    if args.command == "keys":
        from app.cli.keys import run_keys

        return run_keys(settings, args)
    if args.command == "worker-health":
        from app.cli.health import worker_health

        return worker_health(settings, args)
    if args.command in ("runs", "ops", "workers", "queue", "snapshots"):
        from app.cli.admin import run_admin

        return run_admin(settings, args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
