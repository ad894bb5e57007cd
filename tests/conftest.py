"""Shared test options: ``--quick`` deselects the slow parametrisations; GPU tests skip without CUDA."""

import os

import pytest
import torch

# Without CUDA the Triton kernels run in the interpreter. Triton reads TRITON_INTERPRET when a @triton.jit function
# is defined, its own standard library (triton.language) included, and a test module's imports (diffusers, for
# one) may import that before tests/kernel_device.py runs: settle it here, before any test module is imported.
# (kernel_device.py makes the same choice, and undoes it on a GPU machine.)
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Tiny test tensors run fastest single-threaded; pytest-xdist supplies the parallelism.
torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="skip tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is available on this machine")
    quick = config.getoption("--quick")
    deselected, kept = [], []
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if quick and "slow" in item.keywords:
            deselected.append(item)
        else:
            kept.append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


@pytest.fixture
def no_tf32():
    """float32 convolutions and matmuls in full float32 on CUDA for the test (cuDNN's TF32 is on by default and
    errs by about 1e-3 relative, within reach of float32 equivalence tolerances); restored afterwards."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
