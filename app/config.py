"""Settings: one object, built once per process and passed down (no import-time globals).

Precedence, lowest first: defaults < YAML config file < TUFT_* environment variables < CLI flags.
Child processes started by `tuft launch` receive the parent's resolved settings as JSON in
TUFT_SETTINGS_JSON, so the API and its worker can never disagree about a path or a URL.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError

from app.config_legacy import is_legacy, translate
from app.domain.hf_cache import resolve_model_path
from app.domain.models import ModelSpec, builtin_tiny_spec

DEV_API_KEY = "tml-local-dev-key"
DEFAULT_PORT = 10610
SETTINGS_ENV = "TUFT_SETTINGS_JSON"


class ConfigError(Exception):
    """The configuration cannot be used; the message says which setting and why."""


class ApiKeyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str
    tenant: str = "default"


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    data_dir: Path = Path("~/.tuft")
    # Defaults to <data_dir>/checkpoints. Must be shared storage when workers run on several hosts.
    checkpoint_dir: Path | None = None
    # Checkpoint folders no row names (a save whose commit never landed, a crash before an
    # overwritten save's cleanup) are removed by the sweeper once untouched this long, and only
    # if the attempt that wrote them can no longer commit (docs/checkpoints.md "Files").
    checkpoint_orphan_grace_seconds: float = Field(3600.0, gt=0)
    # None means the embedded default: SQLite file <data_dir>/tuft.db and no broker.
    database_url: str | None = None
    # PostgreSQL only: the URL of the LISTEN connections (the API's result pushes, each worker's
    # wake-ups; one per process). LISTEN needs a session of its own, so behind a transaction-mode
    # pooler (PgBouncer) point this at PostgreSQL directly, or at a session-mode pool, while
    # database_url goes through the pooler. Unset: database_url.
    database_listen_url: str | None = None
    redis_url: str | None = None

    supported_models: list[ModelSpec] = Field(default_factory=list)
    # The built-in tiny model is listed first unless switched off.
    include_builtin_model: bool = True

    api_keys: list[ApiKeyConfig] = Field(default_factory=list)
    # None: the dev key is accepted only in the embedded default (no database_url).
    dev_key_enabled: bool | None = None
    # `tuft launch` / `tuft api` refuse to serve the dev key on a non-loopback address (anyone who
    # reaches the port could use it) unless this says it is meant (docs/deployment.md).
    allow_dev_key_on_network: bool = False
    # Told to every SDK in /api/v1/client/config: build the client's HTTP on the pyqwest (Rust)
    # transport (the SDK's default) or on httpx's own. Off: our CI saw SDK processes die of
    # SIGSEGV/SIGBUS in native threads while clients talked to a server over pyqwest, and a
    # self-hosted server on a LAN gains little from it (docs/configuration.md).
    client_pyqwest_transport: bool = False

    # retrieve_future is held at most this long, then answered try_again: well under the SDK's
    # 45 s read timeout (tinker-protocol.md §1.7, §3.4).
    long_poll_seconds: float = 25.0
    # How often the API's single poller looks for finished futures while someone waits, when no
    # push came: results wake waiting polls at once (PostgreSQL NOTIFY, or a datagram from the
    # workers of the API's host; app/api/pushes.py), so this is only the safety net (issue 11).
    future_poll_interval: float = 0.25
    # PostgreSQL connections the API keeps open (as many again may be opened for bursts and closed
    # after): at least the number of requests it serves at once, or it opens and closes
    # connections all the time. Through PgBouncer, its pool is what bounds the server's.
    db_pool_size: int = Field(32, ge=1)

    # Leases: a worker renews its runs every heartbeat; another worker may take a run over once its
    # lease is older than the TTL (judged by the database clock).
    lease_ttl_seconds: float = 15.0
    heartbeat_seconds: float = 2.0
    # Worker poll tick: a safety net behind the wake-ups (Redis, or app/localbell.py without it).
    worker_poll_seconds: float = 0.1
    # `tuft launch` kills and restarts its worker once the worker's heartbeat is this old (None:
    # twice lease_ttl_seconds, so a heartbeat late on a loaded machine is not taken for a hang;
    # 0: never). A worker that cannot beat has lost its leases anyway, and with
    # SQLite one paused inside a write transaction holds the database's only write lock: nothing
    # else could ever commit until it resumes (app/cli/serve.py).
    worker_watchdog_seconds: float | None = Field(None, ge=0)

    # Recovery snapshots (docs/reliability.md): after an optim_step, once this many ops or seconds
    # have passed since the last one. Replay after a crash is bounded by the interval; each
    # snapshot costs a copy of the adapter and optimizer off the GPU plus a background write.
    snapshot_every_ops: int = 20
    snapshot_every_seconds: float = 120.0
    snapshots_kept: int = 2
    # Defaults to <data_dir>/snapshots; must be shared storage when runs can move between hosts.
    snapshot_dir: Path | None = None

    # Worker memory (docs/configuration.md): a worker keeps at most `max_resident_runs` runs'
    # training state (adapter + optimizer, on the GPU) and evicts runs idle for
    # `run_idle_evict_seconds`, least recently used first; 0 turns either limit off. An evicted run
    # is snapshotted (when it holds no pending gradients), its lease released, and rebuilt from
    # snapshot + replay by whichever worker runs its next op. A base model that no resident run
    # uses and nothing sampled from for `model_idle_unload_seconds` is unloaded.
    max_resident_runs: int = Field(32, ge=0)
    run_idle_evict_seconds: float = Field(600.0, ge=0)
    model_idle_unload_seconds: float = Field(600.0, ge=0)

    # An op whose execution killed its worker this many times is failed (category server);
    # poison_policy then says whether the run goes on ("continue") or waits for an admin ("block").
    max_op_attempts: int = 3
    poison_policy: Literal["continue", "block"] = "continue"
    # Sweeper cadence: expired leases, lost wake-ups, abandoned samples.
    sweep_interval_seconds: float = 2.0
    # Results stay in the database until delivered, then this long (0 keeps them forever).
    result_retention_seconds: float = 86400.0
    # A finished run (its session finished, or the run cancelled) keeps its op payloads and its
    # recovery snapshots this long, then they are dropped (app/queue/retention.py); its op rows,
    # results and checkpoints stay. 0 keeps them forever.
    finished_run_retention_seconds: float = 7 * 86400.0
    # A session not heard from for this long is reported `expired`; it keeps its runs and futures
    # and revives on its next heartbeat or request (docs/sessions.md). The SDK heartbeats every 10 s.
    session_timeout_seconds: float = Field(600.0, gt=10)

    # Request limits (HTTP 413 above them).
    max_request_bytes: int = 64 * 1024 * 1024
    max_decompressed_bytes: int = 256 * 1024 * 1024
    max_datums_per_request: int = 4096
    # Tokens in one forward_backward, all datums together (each datum is also bounded by the
    # model's max_model_len); checked on the message's lengths before anything is built.
    max_tokens_per_request: int = Field(2 * 1024 * 1024, ge=1)
    # Request bodies are decoded off the event loop (docs/robustness.md): at most
    # `decode_threads` at once per API process, half of them at most for one tenant, whose
    # requests beyond `decode_queue_per_tenant` (decoding or waiting) are answered 429.
    decode_threads: int = Field(2, ge=1)
    decode_queue_per_tenant: int = Field(8, ge=1)
    max_samples_per_request: int = 64
    # Backpressure (docs/sampling.md): while this many sample ops are queued or running, asample
    # answers 429 and the SDK backs off and re-submits. Deployment-wide, and per tenant; 0 is off.
    max_queued_samples: int = Field(256, ge=0)
    max_queued_samples_per_tenant: int = Field(0, ge=0)
    # Fair share (docs/sampling.md): while the queue is full, a tenant holding less than
    # max(min_queued_samples_per_tenant, max_queued_samples / tenants with samples pending) is
    # still admitted, so one tenant retrying on 429 cannot keep the others out.
    fair_sample_queue: bool = True
    min_queued_samples_per_tenant: int = Field(8, ge=1)

    # Prometheus metrics (docs/metrics.md). GET /metrics on the API port answers only requests
    # carrying `Authorization: Bearer <metrics_token>` (404 while unset: the numbers name every
    # tenant, so they are an operator's, not an API key's). metrics_port serves the same page
    # without authentication on a separate listener (metrics_host, loopback by default), for a
    # scraper on a private network. Numbers read from the database are cached metrics_cache_seconds:
    # computing them scans the ops table (~2.4 s per million ops here, bench/metrics_cost.py), so
    # the default is a usual scrape interval, not less.
    metrics_token: str | None = None
    metrics_port: int | None = Field(None, ge=1, le=65535)
    metrics_host: str = "127.0.0.1"
    metrics_cache_seconds: float = Field(15.0, ge=0)
    # Each worker's own numbers (GPU memory and utilisation, snapshot writes) on this port of its
    # host, plus its GPU index (two workers of one host never clash); unset, no listener.
    worker_metrics_port: int | None = Field(None, ge=1, le=65535)
    worker_metrics_host: str = "0.0.0.0"
    # Log lines: "text" (time, level, logger, [request id], message) or "json" (one object per
    # line with the same fields), for a log shipper that parses them (docs/metrics.md "Logs").
    log_format: Literal["text", "json"] = "text"
    # Lowest level logged (the original TuFT's `--log-level`; uvicorn's too).
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"

    # Device for `tuft launch`'s own worker: "auto" picks cuda:0 when available.
    worker_device: str = "auto"
    # GPUs of this host for `tuft worker` started without --gpu/--gpus/--device: two or more make
    # one worker over them (data-parallel forward_backward; docs/architecture.md "Several GPUs
    # per worker"). Unset: one GPU (or the CPU) per worker.
    worker_gpus: list[int] | None = None
    # How such a worker holds its base models: "replicate" = whole on every GPU (data parallel);
    # "fsdp" = each GPU holds 1/N of the decoder layers (FSDP2), for a model larger than one GPU;
    # "auto" = fsdp when the largest model's bf16 weights exceed half of one GPU's memory.
    worker_shard: Literal["auto", "replicate", "fsdp"] = "auto"
    # forward_backward in micro-batches (docs/performance.md "Large batches"): padded tokens per
    # micro-batch, "auto" = from free GPU memory (8192 on CPU); halved after an out-of-memory error.
    micro_batch_tokens: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    # Recompute decoder layers' activations in backward: "auto" = on CUDA, only when micro-batches
    # would otherwise be tiny; "on" / "off" force it.
    activation_checkpointing: Literal["auto", "on", "off"] = "auto"
    # Fused GPU kernels for the decoder (workers/engine/kernels.py): "auto" = Liger-Kernel's
    # RMSNorm/SwiGLU/RoPE on CUDA when liger-kernel is installed (`pip install 'tuft[gpu]'`) and
    # knows the model type; "liger" requires it; "torch" = the model's own modules.
    engine_kernels: Literal["auto", "liger", "torch"] = "auto"
    # Ready forward_backward ops of several runs on one base model share one pass, each row with
    # its own run's adapter (workers/train_batch.py): "auto" = on CUDA only (on the CPU each op
    # runs alone, so replay stays bitwise there); "on" / "off" force it.
    engine_batch_runs: Literal["auto", "on", "off"] = "auto"
    # Queued samples of one base model decoded as one batch, each row with its own adapter, seed
    # and parameters (workers/sample_batch.py): "auto" = on CUDA only (the same seed gives the same
    # tokens alone or batched; on the CPU each sample runs alone all the same); "on" / "off".
    engine_batch_samples: Literal["auto", "on", "off"] = "auto"
    # A LoRA linear layer's arithmetic with one adapter active: "fused" (auto) = one autograd node
    # with a hand-written backward (workers/engine/lora_fused.py); "peft" = PEFT's own forward.
    engine_lora_kernel: Literal["auto", "fused", "peft"] = "auto"
    # PyTorch's deterministic algorithms: "auto" = on for the CPU, off on CUDA (they cost 5-25% of
    # a GPU training step and cannot make a GPU replay bitwise; docs/reliability.md, GPU replay).
    engine_deterministic: Literal["auto", "on", "off"] = "auto"
    # A batched decode runs a static-shape step captured in CUDA graphs (workers/engine/decode_graph.py):
    # "auto" = on CUDA only; "on" on the CPU runs the same step uncaptured; "off" = the step shaped
    # to the live rows (workers/engine/decode.py).
    engine_decode_graphs: Literal["auto", "on", "off"] = "auto"
    # The most memory the static decode step's buffers and graphs may keep between sample calls
    # (workers/engine/decode_state.py), in bytes: "auto" = a quarter of the GPU (1 GiB on the
    # CPU); 0 = keep nothing (every call builds its own, as before they were kept).
    engine_decode_cache_bytes: Literal["auto"] | NonNegativeInt = "auto"

    # Checkpoint downloads (docs/downloads.md): signed, time-limited links served without the API
    # key. Every API process must sign with the same key; unset, one is generated once and kept in
    # <checkpoint_dir>/.download-signing-key, which they all see anyway.
    download_signing_key: str | None = None
    download_link_ttl_seconds: int = 900
    # Base of the absolute download links (e.g. https://tuft.example.com behind a proxy); unset,
    # links use the base URL of the request that asked for them.
    public_base_url: str | None = None
    # Peers whose X-Forwarded-Proto/-Host/-For headers are believed (addresses or networks, "*"
    # for any): the reverse proxies in front of the API (app/api/proxy.py).
    trusted_proxies: list[str] = Field(default_factory=lambda: ["127.0.0.1", "::1"])
    # Tenants whose keys see every tenant's runs, checkpoints and queue in the read-only web
    # dashboard (docs/dashboard.md); any other key sees its own tenant only.
    dashboard_admin_tenants: list[str] = Field(default_factory=list)

    @property
    def embedded(self) -> bool:
        return self.database_url is None

    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()

    def resolved_checkpoint_dir(self) -> Path:
        if self.checkpoint_dir is not None:
            return self.checkpoint_dir.expanduser().resolve()
        return self.resolved_data_dir() / "checkpoints"

    def resolved_snapshot_dir(self) -> Path:
        if self.snapshot_dir is not None:
            return self.snapshot_dir.expanduser().resolve()
        return self.resolved_data_dir() / "snapshots"

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.resolved_data_dir() / 'tuft.db'}"

    def models(self) -> list[ModelSpec]:
        specs = list(self.supported_models)
        if self.include_builtin_model and all(s.model_name != builtin_tiny_spec().model_name for s in specs):
            specs.insert(0, builtin_tiny_spec())
        return specs

    def dev_key_active(self) -> bool:
        return self.embedded if self.dev_key_enabled is None else self.dev_key_enabled

    def configured_keys(self) -> dict[str, str]:
        """Plain-text keys from the config file (and the dev key) -> tenant."""
        keys = {k.key: k.tenant for k in self.api_keys}
        if self.dev_key_active():
            keys.setdefault(DEV_API_KEY, "default")
        return keys


_ENV_FIELDS = {
    "TUFT_DATA_DIR": "data_dir",
    "TUFT_CHECKPOINT_DIR": "checkpoint_dir",
    "TUFT_DATABASE_URL": "database_url",
    "TUFT_DATABASE_LISTEN_URL": "database_listen_url",
    "TUFT_REDIS_URL": "redis_url",
    "TUFT_HOST": "host",
    "TUFT_PORT": "port",
    "TUFT_DOWNLOAD_SIGNING_KEY": "download_signing_key",
    "TUFT_DEV_KEY_ENABLED": "dev_key_enabled",
    "TUFT_ALLOW_DEV_KEY_ON_NETWORK": "allow_dev_key_on_network",
    "TUFT_PUBLIC_BASE_URL": "public_base_url",
    "TUFT_TRUSTED_PROXIES": "trusted_proxies",
    "TUFT_METRICS_TOKEN": "metrics_token",
    "TUFT_METRICS_PORT": "metrics_port",
    "TUFT_WORKER_METRICS_PORT": "worker_metrics_port",
    "TUFT_LOG_FORMAT": "log_format",
    "TUFT_LOG_LEVEL": "log_level",
}


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build Settings from an optional YAML file, TUFT_* variables and explicit overrides."""
    inherited = os.environ.get(SETTINGS_ENV)
    if inherited and config_file is None and not overrides:
        return Settings.model_validate_json(inherited)

    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            loaded = yaml.safe_load(Path(config_file).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {config_file} must hold a mapping at the top level")
        if is_legacy(loaded):
            loaded, notes = translate(loaded)
            # Once per process: children of `tuft launch` get the resolved settings, not the file.
            logging.getLogger("tuft").warning(
                "%s is an original TuFT config; read with these changes (write a clean file with "
                "`tuft config convert %s`; docs/migrating-from-tuft.md):\n  %s",
                config_file,
                config_file,
                "\n  ".join(notes),
            )
        values.update(loaded)
    for env, field in _ENV_FIELDS.items():
        if os.environ.get(env):
            values[field] = os.environ[env]
    if isinstance(values.get("trusted_proxies"), str):  # TUFT_TRUSTED_PROXIES: comma-separated
        values["trusted_proxies"] = [p.strip() for p in values["trusted_proxies"].split(",") if p.strip()]
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        settings = Settings.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from exc
    settings.supported_models = [_from_hf_cache(m) for m in settings.supported_models]
    _check(settings)
    return settings


def _from_hf_cache(spec: ModelSpec) -> ModelSpec:
    """A Hugging Face id as model_path: its snapshot in the local cache when there is one. Clients
    are still told the id (tokenizer_id), which they can load; the local folder they cannot."""
    path = resolve_model_path(spec.model_path)
    if path == spec.model_path:
        return spec
    return spec.model_copy(update={"model_path": path, "tokenizer_id": spec.tokenizer_id or spec.model_path})


def _check(settings: Settings) -> None:
    names = [m.model_name for m in settings.models()]
    if len(set(names)) != len(names):
        raise ConfigError(f"supported_models lists a model name twice: {names}")
    if not names:
        raise ConfigError("no models: list supported_models or keep include_builtin_model on")
    for key in settings.configured_keys():
        if not key.startswith("tml-"):
            # The SDK refuses any key without this prefix before sending a byte (tinker-protocol.md §0.1).
            raise ConfigError(f"API key {key[:8]}... must start with 'tml-'")
    if settings.database_listen_url is not None and not (
        settings.database_listen_url.startswith("postgres") and (settings.database_url or "").startswith("postgres")
    ):
        raise ConfigError("database_listen_url needs a PostgreSQL database_url and is a PostgreSQL URL itself")
    if settings.long_poll_seconds >= 40:
        raise ConfigError("long_poll_seconds must stay below the SDK's 45 s read timeout")
    if settings.download_signing_key is not None and len(settings.download_signing_key) < 32:
        raise ConfigError("download_signing_key must be at least 32 characters (e.g. `openssl rand -hex 32`)")
    if settings.download_link_ttl_seconds < 1:
        raise ConfigError("download_link_ttl_seconds must be at least 1")
    if settings.public_base_url is not None and not settings.public_base_url.startswith(("http://", "https://")):
        raise ConfigError("public_base_url must be an absolute http:// or https:// URL")
    for proxy in settings.trusted_proxies:
        try:
            if proxy != "*":
                ipaddress.ip_network(proxy, strict=False)
        except ValueError as exc:
            raise ConfigError(f"trusted_proxies: {proxy!r} is not an IP address or network ({exc})") from exc


def is_loopback(host: str) -> bool:
    """Whether a bind address is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name, or "" (every interface)


def check_exposure(settings: Settings, command: str) -> None:
    """Refuse to serve the well-known dev key where others can reach it, unless told to."""
    if settings.dev_key_active() and not is_loopback(settings.host) and not settings.allow_dev_key_on_network:
        raise ConfigError(
            f"{command}: refusing to serve on {settings.host} with the dev key {DEV_API_KEY} enabled: anyone "
            "who can reach this port could use it. Bind to 127.0.0.1, or turn the dev key off "
            "(dev_key_enabled: false, TUFT_DEV_KEY_ENABLED=0) and create a key with `tuft keys create "
            "--tenant NAME`, or, if this is really meant, set allow_dev_key_on_network: true "
            "(TUFT_ALLOW_DEV_KEY_ON_NETWORK=1)"
        )


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment for a child process that must see exactly these settings."""
    return {SETTINGS_ENV: settings.model_dump_json()}


def dump_settings(settings: Settings) -> str:
    return json.dumps(json.loads(settings.model_dump_json()), indent=2)
