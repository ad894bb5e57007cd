"""Backend choice: one predicate per op decides between a Triton kernel and the reference.

Backends: ``reference`` (plain PyTorch, runs anywhere), ``triton`` (the kernels in ``kernels/``; on the CPU
only under ``TRITON_INTERPRET=1``), ``auto`` (Triton on CUDA tensors where the kernel supports the input,
the reference elsewhere). ``FASTDIFF_BACKEND`` sets the default for ``backend=None``.

Fallbacks are deliberate and visible: ``auto`` logs each fallback reason at debug level, and
``fallback_counts()`` reports them (``fastdiff info`` and the benchmarks print it). An explicit
``triton`` never falls back: input the kernel cannot take raises ``ValueError`` naming the reason.
"""

from __future__ import annotations

import collections
import functools
import logging
import os

import torch

log = logging.getLogger("fastdiff.ops")

BACKENDS = ("auto", "reference", "triton")
_fallbacks: collections.Counter = collections.Counter()


def default_backend() -> str:
    name = os.environ.get("FASTDIFF_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"FASTDIFF_BACKEND={name!r} is not one of {BACKENDS}")
    return name


def check_backend(name: str | None) -> str:
    name = default_backend() if name is None else name
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not one of {BACKENDS}")
    return name


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str | None:
    """None when Triton imports, else why not."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # any import failure means "no Triton", never a crash
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def triton_device_problem(tensor: torch.Tensor) -> str | None:
    """None when a Triton kernel can run on ``tensor``'s device, else the reason."""
    err = triton_import_error()
    if err:
        return err
    if tensor.is_cuda:
        return None
    if tensor.device.type == "cpu" and interpreter_enabled():
        return None
    return f"tensors on {tensor.device.type} need CUDA (or TRITON_INTERPRET=1 on the CPU)"


def use_triton(op: str, backend: str | None, tensor: torch.Tensor, input_problem: str | None) -> bool:
    """Decide one call. ``input_problem`` is the kernel's own reason for refusing this input, if any."""
    backend = check_backend(backend)
    if backend == "reference":
        return False
    problem = triton_device_problem(tensor) or input_problem
    if backend == "triton":
        if problem:
            raise ValueError(f"{op}: the triton backend cannot run this call: {problem}")
        return True
    # auto: Triton on CUDA only; the interpreter is for tests, never chosen implicitly.
    if not tensor.is_cuda:
        return False
    if problem:
        _fallbacks[(op, problem)] += 1
        log.debug("%s: falling back to the reference: %s", op, problem)
        return False
    return True


def fallback_counts() -> dict:
    """{(op, reason): count} of the auto backend's fallbacks on CUDA tensors in this process."""
    return dict(_fallbacks)
