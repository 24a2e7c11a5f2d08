"""A worker over several GPUs of one host (`tuft worker --gpus 0,1`; docs/architecture.md, "Several
GPUs per worker").

The worker process is rank 0 and stays the only one that talks to the database, Celery and the
lease table; it starts ranks 1..N-1 as engine-only processes (workers/engine/data_parallel.py) and
hands the runner a DataParallelEngine in place of a TorchEngine. With one GPU, or on the CPU, none
of this runs: the worker is exactly the single-process one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.domain.models import ModelSpec
    from workers.engine import EngineConfig


def parse_gpus(text: str | Sequence[int] | None) -> list[int] | None:
    """ "0,1,3" (the CLI) or [0, 1, 3] (the config file) -> [0, 1, 3]; None or empty -> None.
    Refuses duplicates and negative indices (two ranks on one GPU would only slow each other)."""
    if text is None:
        return None
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            gpus = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"--gpus takes GPU indices separated by commas, e.g. 0,1; got {text!r}") from None
    else:
        gpus = [int(g) for g in text]
    if not gpus:
        return None
    if len(set(gpus)) != len(gpus) or min(gpus) < 0:
        raise ValueError(f"GPU indices must be distinct and >= 0, got {gpus}")
    return gpus


def pin_gpus(gpus: Sequence[int]) -> None:
    """Before torch is imported: the process sees exactly its GPUs, so rank r is cuda:r (the ranks
    it spawns inherit the variable)."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)


def make_engine(
    models: list[ModelSpec],
    device: str,
    cache_dir: Path,
    config: EngineConfig,
    ranks: int,
    timeout_s: float | None = None,
) -> Any:
    """A TorchEngine for one rank; with ranks > 1 (on CUDA) the data-parallel engine over `ranks`
    GPUs, its followers started and joined before this returns."""
    from workers.engine import TorchEngine

    if ranks <= 1:
        return TorchEngine(models, device=device, cache_dir=cache_dir, config=config)
    from workers.engine.data_parallel import DEFAULT_TIMEOUT_SECONDS, EngineArgs, launch

    args = EngineArgs(models, device=device, cache_dir=cache_dir, config=config)
    return launch(args, ranks, DEFAULT_TIMEOUT_SECONDS if timeout_s is None else timeout_s)
