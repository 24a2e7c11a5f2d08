"""The three ways an engine call can fail, as the worker runner needs to tell them apart.

- `OpInputError`: the op itself is bad (token id out of range, unknown loss, rank mismatch...). The
  runner fails the op with category "user"; the run's state is untouched because every op validates
  all of its input before it changes anything.
- `OutOfMemory`: the device ran out of memory. forward_backward first retries inside the engine
  with smaller micro-batches (microbatch.py) and raises this only when a single sequence does not
  fit; other verbs raise it at once. The op may have half-applied, so the runner discards the
  run's in-memory state, frees what other runs and cached models hold (`TorchEngine.free_memory`),
  rebuilds the run and retries the op once.
- `DeviceFatal`: a sticky device error (illegal memory access, ECC...). The CUDA context is unusable;
  the runner commits nothing for the op and the process exits (status 3) for its supervisor to
  restart it, while other workers take its runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")


class OpInputError(Exception):
    """The op's input is invalid; retrying it cannot succeed."""


class OutOfMemory(Exception):
    """The device ran out of memory while running the op."""


class DeviceFatal(Exception):
    """The device is in an unrecoverable state; the process should exit."""


# Fragments of messages torch raises (as plain RuntimeError on older versions, AcceleratorError on
# newer ones) once the CUDA context is poisoned; any later CUDA call fails the same way.
_FATAL_MARKERS = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "device-side assert", "NCCL error")


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA and other accelerators), or the CPU allocator's plain
    RuntimeError."""
    if isinstance(exc, torch.OutOfMemoryError):  # torch.cuda.OutOfMemoryError is the same class
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def translate_device_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Map torch's device exceptions to ours at the engine boundary, so callers need no torch."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (OpInputError, OutOfMemory, DeviceFatal):
            raise
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError too
            if is_out_of_memory(exc):
                raise OutOfMemory(str(exc)) from exc
            if any(marker in str(exc) for marker in _FATAL_MARKERS):
                raise DeviceFatal(str(exc)) from exc
            raise

    return wrapper
