"""`tuft runs | ops | workers | queue | snapshots`: the operator's view of the queue (docs/admin-cli.md)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from app.config import Settings
from app.db import migrate
from app.db.engine import Database
from app.domain.errors import DomainError, NotFound
from app.metrics import queries
from app.queue import admin
from app.snapshot_manifest import verify


def add_parsers(sub: Any, add_common: Any) -> None:
    runs = sub.add_parser("runs", help="training runs: list, show, resume, pause, cancel")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True)
    p = runs_sub.add_parser("list", help="every run with its lease, progress and pending ops")
    # choices: a typo is refused with the list of states (exit 2), not answered with "(none)".
    p.add_argument("--status", default=None, choices=admin.RUN_STATUSES, help="only runs in this status")
    _add_filters(p)
    p = runs_sub.add_parser("show", help="one run, its snapshots and its latest ops")
    p.add_argument("run_id")
    p = runs_sub.add_parser("resume", help="make a blocked or paused run active again")
    p.add_argument("run_id")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--retry-op", action="store_true", help="run the op at next_seq again")
    action.add_argument("--skip-op", action="store_true", help="fail the op at next_seq and go past it")
    action.add_argument("--fail-op", action="store_true", help="fail the op at next_seq and go past it")
    for name, text in (("pause", "stop taking ops (queued ops wait)"), ("cancel", "stop for good; waiting ops fail")):
        p = runs_sub.add_parser(name, help=text)
        p.add_argument("run_id")
    ops = sub.add_parser("ops", help="ops of a run")
    ops_sub = ops.add_subparsers(dest="ops_command", required=True)
    p = ops_sub.add_parser("list", help="the latest ops of a run, in seq order")
    p.add_argument("run_id")
    p.add_argument("--limit", type=int, default=50)
    workers = sub.add_parser("workers", help="worker processes")
    workers_sub = workers.add_subparsers(dest="workers_command", required=True)
    workers_sub.add_parser("list", help="workers, their heartbeats and how many runs each holds")
    queue = sub.add_parser("queue", help="ops waiting per base model and tenant, with the oldest one's age")
    _add_filters(queue)
    snaps = sub.add_parser("snapshots", help="recovery snapshots")
    snaps_sub = snaps.add_subparsers(dest="snapshots_command", required=True)
    p = snaps_sub.add_parser("verify", help="check every snapshot of a run against its manifest")
    p.add_argument("run_id")
    for parser in [queue, *(p for g in (runs_sub, ops_sub, workers_sub, snaps_sub) for p in g.choices.values())]:
        add_common(parser)
        parser.add_argument("--json", action="store_true", help="machine-readable output")


def _add_filters(p: Any) -> None:
    p.add_argument("--tenant", default=None, help="only this tenant's")
    p.add_argument("--model", default=None, help="only this base model's (as in supported_models)")


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[("-" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


RUN_COLUMNS = ["run_id", "status", "owner_worker", "lease_expires_in", "next_seq", "applied_seq", "pending_ops"]
RUN_COLUMNS += ["optimizer_steps", "last_snapshot_seq"]
OP_COLUMNS = ["seq", "kind", "status", "attempt", "claimed_epoch", "seconds_to_finish", "error"]
WORKER_COLUMNS = ["worker_id", "device", "queue", "heartbeat_age", "runs", "state"]
QUEUE_COLUMNS = ["base_model", "tenant", "status", "ops", "oldest_age_seconds"]


def run_admin(settings: Settings, args: argparse.Namespace) -> int:
    url = settings.resolved_database_url()
    # An older or a newer schema: migrate.SchemaError, printed as one line by app/cli/main.py (exit 2).
    migrate.require_current(url, "tuft")
    db = Database(url, process_name="cli")
    try:
        return _run(settings, db, args)
    except DomainError as exc:
        print(json.dumps({"error": exc.message}) if args.json else f"tuft: {exc.message}")
        return 1
    finally:
        db.dispose()


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, default=str) if args.json else text)


def _run(settings: Settings, db: Database, args: argparse.Namespace) -> int:
    if args.command == "workers":
        with db.read() as s:
            rows = admin.worker_rows(s, settings.lease_ttl_seconds)
        _emit(args, rows, _table(rows, WORKER_COLUMNS))
        return 0
    if args.command == "ops":
        with db.read() as s:
            rows = admin.op_rows(s, args.run_id, args.limit)
        _emit(args, rows, _table(rows, OP_COLUMNS))
        return 0
    if args.command == "snapshots":
        return _verify(settings, db, args)
    if args.command == "queue":
        with db.read() as s:
            rows = queries.queue_depth(s, tenant=args.tenant, base_model=args.model)
        _emit(args, rows, _table(rows, QUEUE_COLUMNS))
        return 0
    command = args.runs_command
    if command == "list":
        with db.read() as s:
            rows = admin.run_rows(s, args.status, tenant=args.tenant, base_model=args.model)
        _emit(args, rows, _table(rows, RUN_COLUMNS))
        return 0
    if command == "show":
        with db.read() as s:
            run = next((r for r in admin.run_rows(s) if r["run_id"] == args.run_id), None)
            if run is None:
                raise NotFound(f"run {args.run_id!r} not found")
            snaps = [
                {"applied_seq": x.applied_seq, "epoch": x.epoch, "bytes": x.size_bytes, "path": x.storage_path}
                for x in admin.snapshot_rows(s, args.run_id)
            ]
            ops = admin.op_rows(s, args.run_id, 10)
        detail = "\n".join(f"{k}: {'-' if v is None else v}" for k, v in run.items())
        text = f"{detail}\n\nsnapshots:\n{_table(snaps, ['applied_seq', 'epoch', 'bytes', 'path'])}"
        text += f"\n\nlatest ops:\n{_table(ops, OP_COLUMNS)}"
        _emit(args, {**run, "snapshots": snaps, "ops": ops}, text)
        return 0
    with db.write() as s:
        if command == "pause":
            admin.pause(s, args.run_id)
            result: dict[str, Any] = {"run_id": args.run_id, "status": "paused"}
        elif command == "cancel":
            result = {"run_id": args.run_id, "status": "cancelled", "failed_ops": admin.cancel(s, args.run_id)}
        else:
            action: admin.OpAction | None = (
                "retry" if args.retry_op else "skip" if args.skip_op else "fail" if args.fail_op else None
            )
            acted = admin.resume(s, args.run_id, action)
            result = {"run_id": args.run_id, "status": "active", "op_action": action, "op": acted}
    _emit(args, result, " ".join(f"{k}={v}" for k, v in result.items() if v is not None))
    return 0


def _verify(settings: Settings, db: Database, args: argparse.Namespace) -> int:
    root = settings.resolved_snapshot_dir()
    with db.read() as s:
        snaps = [(x.applied_seq, x.storage_path, x.manifest_sha256) for x in admin.snapshot_rows(s, args.run_id)]
    rows = []
    for seq, rel, digest in snaps:
        problem = verify(root / rel, digest)
        rows.append({"applied_seq": seq, "path": rel, "ok": problem is None, "problem": problem})
    _emit(args, rows, _table(rows, ["applied_seq", "ok", "problem", "path"]))
    return 0 if all(r["ok"] for r in rows) else 1
