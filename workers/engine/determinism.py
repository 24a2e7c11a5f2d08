"""Reproducibility helpers.

The server replays a run's mutating ops after a crash and checks that the recovered adapter is
bitwise equal to the lost one, so every random draw in the engine comes from a generator seeded by
the op or the run config, and the process-wide RNGs are never read or advanced (other code in the
process, e.g. tests, must not perturb us, nor we them).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_configured = False


def configure_determinism(device: torch.device, deterministic: bool = True) -> None:
    """Ask torch for deterministic kernels (or not), once per process.

    On CPU the kernels we use are deterministic already for a fixed thread count (so replay must run
    with the same `torch.get_num_threads()`, which the worker leaves at its default). On CUDA cuBLAS
    needs a fixed workspace (CUBLAS_WORKSPACE_CONFIG must be set before its first use) and a few
    kernels (scatter_add/index_add with atomics) must be swapped for deterministic ones.
    `warn_only=True`: an op without a deterministic implementation should warn, not fail user ops.

    PyTorch's deterministic mode also fills every new tensor with NaN (a debugging aid against
    reading uninitialised memory); on an H100 that was a third of a training step's kernel launches
    and made the step CPU-bound (docs/performance.md). The engine never reads memory it did not
    write, so the fill is switched off.

    deterministic=False (EngineConfig.deterministic "auto" on CUDA): PyTorch's default kernels. On a
    GPU the deterministic ones cost 5-25% of a training step and never made replay bitwise anyway
    (cuDNN's attention backward has no deterministic version); docs/reliability.md, GPU replay.
    """
    global _configured
    if _configured:
        return
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
    _configured = True


@contextmanager
def isolated_rng(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Run a block with all torch RNGs seeded to `seed`, restoring the caller's RNG state after.

    Used around third-party code that draws from the global RNG (model and adapter construction), so
    its draws are reproducible and invisible to the rest of the process.
    """
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def cpu_generator(seed: int) -> torch.Generator:
    """A CPU generator: initial weights are drawn on CPU so they are identical on every machine."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return gen
