"""Parametrisations and seeds shared by the scheduler test files."""

import itertools
import zlib

import pytest

# The beta schedules, prediction types and timestep spacings every DDPM/DDIM test sweeps (diffusers' names).
SCHEDULES = {
    "linear": {"beta_schedule": "linear"},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2"},
}
PREDICTIONS = ("epsilon", "sample", "v_prediction")
SPACINGS = ("leading", "trailing", "linspace")


def product_cases(factors: dict, quick_every: int):
    """The full product of ``factors``, every ``quick_every``-th case quick (spread across all values), the rest slow.

    Returns ``(argnames, cases)`` for ``pytest.mark.parametrize``.
    """
    names = list(factors)
    cases = []
    for k, values in enumerate(itertools.product(*factors.values())):
        marks = () if k % quick_every == 0 else (pytest.mark.slow,)
        cases.append(pytest.param(*values, marks=marks, id="-".join(str(v) for v in values)))
    return ",".join(names), cases


def stable_seed(request) -> int:
    """Seed of a test's random inputs: a CRC of its id, the same in every run and process (never ``hash()``, which
    changes with PYTHONHASHSEED)."""
    return zlib.crc32(request.node.nodeid.encode())
