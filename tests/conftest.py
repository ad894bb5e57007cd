"""Shared test set-up: the Triton mode, test dependencies, ``--quick``, GPU skips.

* Triton mode: ``kernel_device`` is imported first, before any test module is collected, so
  ``TRITON_INTERPRET`` is settled (the interpreter on a machine without CUDA, compiled kernels on a GPU)
  before anything imports Triton or the kernel modules, whatever the collection order. diffusers imports
  Triton; a module importing diffusers collected before the kernel tests used to leave Triton's own jit
  helpers compiled-mode while the kernels were interpreted.
* Test dependencies: where the environment variable ``CI`` is set (CI runs with CI=true), a missing one is an
  error before collection; elsewhere (e.g. the GPU machine image, which lacks diffusers) the tests that need
  it skip with a reason naming the package.
* ``--quick`` deselects the slow parametrisations; GPU tests skip without CUDA.
"""

import importlib.util
import os

import kernel_device  # noqa: F401  (first: sets TRITON_INTERPRET before anything imports Triton)
import pytest
import torch

# Tiny test tensors run fastest single-threaded; pytest-xdist supplies the parallelism.
torch.set_num_threads(1)

# Import name -> package name of the optional test dependencies (pyproject.toml's [test] extra).
TEST_DEPENDENCIES = {"diffusers": "diffusers", "sklearn": "scikit-learn", "scipy": "scipy",
                     "hypothesis": "hypothesis", "matplotlib": "matplotlib"}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def missing_test_dependencies() -> list[str]:
    return [package for module, package in TEST_DEPENDENCIES.items() if importlib.util.find_spec(module) is None]


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="skip tests marked slow")


def pytest_configure(config):
    missing = missing_test_dependencies()
    if missing and in_ci():
        raise pytest.UsageError(
            f"CI is set and test dependencies are missing: {', '.join(missing)} "
            "(pip install -e '.[test]'); outside CI the tests needing them would skip")


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
