"""`tuft config convert`: an original TuFT config file rewritten as ours (docs/migrating-from-tuft.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from app.config import ConfigError, load_settings
from app.config_legacy import is_legacy, translate


def add_parser(sub: Any) -> None:
    config = sub.add_parser("config", help="configuration files")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    convert = config_sub.add_parser("convert", help="write our config from an original TuFT config")
    convert.add_argument("source", type=Path, help="the original TuFT YAML file")
    convert.add_argument("-o", "--output", type=Path, default=None, help="where to write (default: stdout)")
    convert.add_argument("--force", action="store_true", help="overwrite --output if it exists")


def convert_text(source: Path) -> str:
    """The converted file: what was dropped and why as comments, then the settings."""
    loaded = yaml.safe_load(source.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{source} must hold a mapping at the top level")
    values, notes = translate(loaded) if is_legacy(loaded) else (loaded, [])
    header = [f"# Converted by `tuft config convert` from {source} (docs/migrating-from-tuft.md)."]
    header += [f"# {line}" for line in notes]
    return "\n".join(header) + "\n" + yaml.safe_dump(values, sort_keys=False, default_flow_style=False)


def run_config(args: argparse.Namespace) -> int:
    try:
        text = convert_text(args.source)
    except (OSError, yaml.YAMLError, ConfigError) as exc:
        print(f"tuft config convert: {exc}", file=sys.stderr)
        return 2
    if args.output is None:
        sys.stdout.write(text)
        return 0
    if args.output.exists() and not args.force:
        print(f"tuft config convert: {args.output} exists (--force to overwrite)", file=sys.stderr)
        return 2
    args.output.write_text(text)
    try:
        load_settings(args.output)  # the file we wrote must load as it is
    except ConfigError as exc:
        print(f"tuft config convert: wrote {args.output}, but it does not load yet: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}", file=sys.stderr)
    return 0
