"""Render the rows the chaos tests append to $TUFT_CHAOS_REPORT as a markdown table.

TUFT_CHAOS_REPORT=/tmp/chaos.jsonl pytest tests/chaos -m chaos
python -m tests.chaos.report /tmp/chaos.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

COLUMNS = [
    ("scenario", "scenario"),
    ("mode", "mode"),
    ("runs x ops", None),
    ("futures lost", "futures_lost"),
    ("duplicate applications", "duplicate_applications"),
    ("zombie commits rejected", "zombie_commits_rejected"),
    ("bitwise = reference", "bitwise_equal"),
    ("recovery s", "recovery_seconds"),
    ("faults injected", "faults"),
]


def _cell(row: dict[str, Any], key: str | None) -> str:
    if key is None:
        return f"{row['runs']} x {row['ops']}"
    value = row.get(key)
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "-"
    return str(value).replace("|", "/")


def render(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| " + " | ".join(title for title, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, key) for _, key in COLUMNS) + " |")
        if row.get("problems"):
            lines.append("|  | **violations:** " + "; ".join(row["problems"])[:500].replace("|", "/") + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    rows = [json.loads(line) for line in Path(argv[1]).read_text().splitlines() if line.strip()]
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
