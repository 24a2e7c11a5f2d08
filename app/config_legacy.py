"""Config files of the original TuFT (github.com/agentscope-ai/TuFT, config/tuft_config.example.yaml)
read as ours: keys that mean something here are translated, the rest are dropped and named in
one notice, so a user coming from it starts with their file (docs/migrating-from-tuft.md).

`tuft config convert` writes the translated file, after which the notice goes away.
"""

from __future__ import annotations

import os
import re
from typing import Any

# Top-level keys only the original TuFT has; any of them marks a file as theirs.
LEGACY_KEYS = frozenset(
    {"model_owner", "authorized_users", "persistence", "telemetry", "worker_venv_path", "toy_backend_seed"}
)
# Per-model keys both configs mean the same way (app/domain/models.py ModelSpec).
_MODEL_KEYS = ("model_name", "model_path", "max_model_len", "max_lora_rank")
# Why the rest is dropped, said once per key in the notice.
_WHY = {
    "model_owner": "runs belong to the tenant of the API key that made them",
    "persistence": "all state is in the database (database_url) and survives restarts without it",
    "telemetry": "metrics are Prometheus at /metrics and logs go to stderr (docs/metrics.md)",
    "worker_venv_path": "there is no Ray: workers are `tuft worker` processes",
    "toy_backend_seed": "the built-in tiny model is deterministic",
}
_MODEL_WHY = (
    "vLLM/FSDP/Ray and per-model sampling defaults have no counterpart here: the engine is one "
    "process per GPU, and sampling parameters come from each request"
)
# OmegaConf's `${oc.env:NAME}` / `${oc.env:NAME, default}`, which the original loader resolved.
_OC_ENV = re.compile(r"\$\{oc\.env:\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:,\s*([^}]*))?\}")


def is_legacy(values: dict[str, Any]) -> bool:
    if LEGACY_KEYS & values.keys():
        return True
    models = values.get("supported_models")
    if isinstance(models, list):
        return any(isinstance(m, dict) and set(m) - set(_MODEL_KEYS) - {"vocab_size", "tokenizer_id"} for m in models)
    return False


def _resolve_env(value: Any) -> Any:
    if isinstance(value, str):
        return _OC_ENV.sub(lambda m: os.environ.get(m.group(1), (m.group(2) or "").strip()), value)
    if isinstance(value, list):
        return [_resolve_env(v) for v in value]
    if isinstance(value, dict):
        return {k: _resolve_env(v) for k, v in value.items()}
    return value


def translate(values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Our settings from an original TuFT config, and one line per dropped or changed key."""
    values = _resolve_env(values)
    out: dict[str, Any] = {}
    notes: list[str] = []
    for key, value in values.items():
        if key == "supported_models" and isinstance(value, list):
            out[key], dropped = _models(value)
            if dropped:
                notes.append(f"supported_models[].{{{', '.join(sorted(dropped))}}}: ignored ({_MODEL_WHY})")
        elif key == "authorized_users" and isinstance(value, dict):
            out["api_keys"], notes_keys = _keys(value)
            notes += notes_keys
        elif key == "persistence" and isinstance(value, dict):
            notes.append(f"persistence: ignored ({_WHY['persistence']})")
            if "future_ttl_seconds" in value:
                ttl = value["future_ttl_seconds"]
                # null meant "never expire"; ours says that with 0.
                out["result_retention_seconds"] = 0 if ttl is None else ttl
                notes.append("persistence.future_ttl_seconds -> result_retention_seconds")
        elif key in _WHY:
            notes.append(f"{key}: ignored ({_WHY[key]})")
        else:
            out[key] = value  # ours too (checkpoint_dir) or unknown: our validation names it
    return out, notes


def _models(models: list[Any]) -> tuple[list[Any], set[str]]:
    kept: list[Any] = []
    dropped: set[str] = set()
    for m in models:
        if not isinstance(m, dict):
            kept.append(m)
            continue
        ours = {k: v for k, v in m.items() if k in (*_MODEL_KEYS, "vocab_size", "tokenizer_id")}
        dropped |= set(m) - set(ours)
        kept.append(ours)
    return kept, dropped


def _keys(users: dict[str, str]) -> tuple[list[dict[str, str]], list[str]]:
    keys = [{"key": k, "tenant": str(u)} for k, u in users.items() if str(k).startswith("tml-")]
    notes = ["authorized_users -> api_keys (each user becomes the key's tenant)"]
    refused = [str(k)[:8] for k in users if not str(k).startswith("tml-")]
    if refused:
        # The Tinker SDK refuses a key without this prefix before sending anything
        # (tinker-protocol.md §0.1), so such a key could never have been used by it.
        notes.append(f"authorized_users: keys not starting with 'tml-' dropped ({', '.join(refused)}...)")
    return keys, notes
