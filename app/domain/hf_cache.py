"""Model ids like "Qwen/Qwen3-4B" found in the local Hugging Face cache (stdlib only).

The original TuFT let `model_path` be a Hugging Face id and downloaded it. Our workers never
download (no network on GPU hosts, and a silent download makes startup time unpredictable), but a
model already in the cache (`huggingface-cli download`, or an earlier run of the original TuFT) is
used from there: <hub cache>/models--Org--Name/snapshots/<revision>.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# "org/name" or "name": what the Hub accepts as a repo id (letters, digits, - _ .).
_REPO_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps downloads, in its own order: HF_HUB_CACHE, HF_HOME/hub,
    XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def cached_snapshot(repo_id: str, revision: str = "main") -> Path | None:
    """The cached snapshot folder of `repo_id` holding a config.json, or None."""
    if not _REPO_ID.match(repo_id) or repo_id.startswith((".", "/")):
        return None
    repo_dir = hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo_dir / "refs" / revision
    if ref.is_file():
        pinned = snapshots / ref.read_text().strip()
        if (pinned / "config.json").is_file():
            return pinned
    # No ref (a cache copied by hand): the most recently written complete snapshot.
    candidates = [d for d in snapshots.iterdir() if (d / "config.json").is_file()]
    return max(candidates, key=lambda d: d.stat().st_mtime) if candidates else None


def resolve_model_path(model_path: str) -> str:
    """`model_path` itself when it is a folder here (or not a Hub id); else its cached snapshot
    when the cache has one; else unchanged, so the error names what the config said."""
    if model_path.startswith("builtin:") or Path(model_path).expanduser().exists():
        return model_path
    snapshot = cached_snapshot(model_path)
    return str(snapshot) if snapshot is not None else model_path
