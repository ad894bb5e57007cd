"""Shared test options: ``--quick`` deselects the slow parametrisations; GPU tests skip without CUDA."""

import pytest
import torch

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
