"""Where the kernel tests run: compiled kernels on the GPU when there is one, else the Triton interpreter on the CPU.

``DEVICE`` is ``"cuda"`` when CUDA is available and the process was not started with ``TRITON_INTERPRET=1``;
otherwise ``"cpu"``, with ``TRITON_INTERPRET=1`` set. Triton (checked on 3.9) reads ``TRITON_INTERPRET`` when
``@triton.jit`` decorates a function: for fastdiff's kernels when ``kernels/*_kernels.py`` is first imported,
for Triton's own jit helpers (``tl.randint4x``, ``tl.sigmoid`` ...) when ``triton`` is first imported. Both
must see the same setting: interpreted kernels calling compiled-mode helpers fail with "Cannot call
@triton.jit'd outside of the scope of a kernel". So tests/conftest.py imports this module before any test
module is collected (diffusers, for one, imports Triton), and this module imports Triton and the kernel
modules itself, right after choosing, failing at once if they were already imported in the other mode: a GPU
run can never quietly test the interpreter, nor a CPU run reach a compiled kernel.
"""

import importlib
import os
import sys

import pytest
import torch

_KERNEL_MODULES = {"fastdiff.kernels.group_norm_kernels": "_gn_single_kernel",
                   "fastdiff.kernels.update_step_kernels": "_update_step_kernel"}


def _is_true(value) -> bool:
    return value is not None and value.strip().lower() in ("1", "true", "on", "yes")  # Triton's reading


def _started_with_interpreter() -> bool:
    """TRITON_INTERPRET as the process was started with it.

    Another test module may set it in ``os.environ`` at import (tests/test_compile_check.py does, and is
    collected first); that must not turn a GPU run into an interpreter run. On Linux /proc/self/environ keeps
    the environment the process started with (later putenv calls do not show there, see proc(5)); elsewhere
    ``os.environ`` is all there is.
    """
    try:
        with open("/proc/self/environ", "rb") as f:
            entries = f.read().split(b"\0")
    except OSError:
        return _is_true(os.environ.get("TRITON_INTERPRET"))
    for entry in entries:
        key, _, value = entry.partition(b"=")
        if key == b"TRITON_INTERPRET":
            return _is_true(value.decode(errors="replace"))
    return False


if torch.cuda.is_available() and not _started_with_interpreter():
    DEVICE = "cuda"
    os.environ.pop("TRITON_INTERPRET", None)  # undo what another module set in-process: compile for the GPU
else:
    DEVICE = "cpu"
    os.environ["TRITON_INTERPRET"] = "1"

INTERPRETED = DEVICE == "cpu"

# Relative (Frobenius) error allowed between float32 Philox noise from the kernel and fastdiff/ops/noise.py's
# torch reference (alone, or inside an update step); RTOL[float32] = 1e-5 stays the outer bound.
# Interpreter (numpy's log2/sin/cos/sqrt in float32): measured 1.8e-7 (max abs 2.2e-6 over 786k values, from the
# angle: the kernel forms 2*pi*u - pi in one fma, the reference rounds 2*pi*u). GPU (not measured here): the
# kernel's lg2/sin/cos/sqrt.approx (absolute errors about 2**-22 for log2 u, 2**-21 for sin and cos) and
# CUDA's logf/sinf/cosf (1-2 ulp) in the reference: at most about 7e-7 in the norm from sin/cos (rad * 2**-21,
# E[rad^2] = 2) and 3.3e-7 from log2 (2 ln 2 * 2**-22 / (2 rad) with E[1/rad^2] about 4 where log2 is used:
# within 2**-11 of u = 1 the kernel takes a series in 1 - u instead, so no radius below 0.044 carries log2's
# absolute error, and no value errs by more than about 6e-6), so 2e-6 holds with room.
# A wrong counter, stream or lane errs by O(1), so the looser GPU bound loses no power.
PHILOX_F32_RTOL = 1e-6 if INTERPRETED else 2e-6

import triton  # noqa: E402  (after TRITON_INTERPRET is settled)
import triton.language  # noqa: E402

if isinstance(triton.language.random.randint4x, triton.runtime.JITFunction) == INTERPRETED:
    raise RuntimeError(
        f"triton was imported {'without' if INTERPRETED else 'under'} TRITON_INTERPRET before tests/kernel_device.py "
        f"chose {DEVICE!r}; tests/conftest.py must import kernel_device before anything imports triton")

for _name, _kernel in _KERNEL_MODULES.items():
    _already = _name in sys.modules
    _interpreted = not isinstance(getattr(importlib.import_module(_name), _kernel), triton.runtime.JITFunction)
    if _interpreted != INTERPRETED:
        raise RuntimeError(
            f"{_name} was imported {'under' if _interpreted else 'without'} TRITON_INTERPRET before "
            f"tests/kernel_device.py chose {DEVICE!r}; import kernel_device before anything imports the kernels"
            if _already else f"{_name} did not pick up TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}")


def gpu_only(test):
    """Mark a test only the real GPU can afford (realistic shapes): skipped without CUDA (the gpu marker) and
    also on a GPU machine run under the interpreter, where it would take many minutes."""
    test = pytest.mark.skipif(DEVICE != "cuda", reason="needs compiled kernels on a CUDA GPU")(test)
    return pytest.mark.gpu(test)


def randn(*shape, dtype=torch.float32, mean=0.0, std=1.0) -> torch.Tensor:
    """Fresh standard normal values (times std, plus mean) on DEVICE, drawn in float32 and rounded to dtype."""
    return (torch.randn(shape, device=DEVICE) * std + mean).to(dtype)
