"""`tuft keys create|list|revoke`: keys are shown once and stored as sha256 hashes."""

from __future__ import annotations

import argparse
import json

from app.auth import create_key, list_keys, revoke_key
from app.config import Settings
from app.db import migrate
from app.db.engine import Database


def run_keys(settings: Settings, args: argparse.Namespace) -> int:
    url = settings.resolved_database_url()
    # An older or a newer schema: migrate.SchemaError, printed as one line by app/cli/main.py (exit 2).
    migrate.require_current(url, "tuft keys")
    db = Database(url, process_name="cli")
    try:
        if args.keys_command == "create":
            with db.write() as s:
                key_id, key = create_key(s, tenant=args.tenant, name=args.name)
            if args.json:
                print(json.dumps({"id": key_id, "key": key, "tenant": args.tenant, "name": args.name}))
            else:
                print(f"created key {key_id} for tenant {args.tenant!r} (shown once, store it now):\n{key}")
            return 0
        if args.keys_command == "list":
            with db.read() as s:
                rows = list_keys(s)
            if args.json:
                print(json.dumps(rows))
            else:
                print(f"{'ID':>4}  {'PREFIX':<12}  {'TENANT':<16}  {'NAME':<20}  STATUS")
                for r in rows:
                    status = "revoked" if r["revoked"] else "active"
                    print(f"{r['id']:>4}  {r['prefix']:<12}  {r['tenant']:<16}  {r['name']:<20}  {status}")
            return 0
        with db.write() as s:
            revoked = revoke_key(s, args.key)
        if args.json:
            print(json.dumps({"revoked": revoked}))
        else:
            print(f"revoked {revoked} key(s)")
        return 0 if revoked else 1
    finally:
        db.dispose()
