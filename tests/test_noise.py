"""Counter-based Philox noise: statistics, reproducibility and batch/layout independence, for the Triton
kernel (compiled on a CUDA GPU when there is one, else under the interpreter: tests/kernel_device.py) and for
the reference specification (fastdiff/ops/noise.py), both on the same device.

Statistical thresholds: each check allows 6 standard errors (or a p-value of 1e-6), so a correct generator
fails with negligible probability even though seeds are fresh every run, while a broken mapping (a wrong
counter, a reused stream, a Box-Muller slip) moves the statistics by far more. Kernel against reference:
kernel_device.PHILOX_F32_RTOL (1e-6 under the interpreter, 2e-6 on the GPU) and 1e-5 absolute.
"""

# first: settles TRITON_INTERPRET before the kernel modules load
from kernel_device import DEVICE, PHILOX_F32_RTOL, randn

import math

import numpy as np
import pytest
import torch

from fastdiff import kernels, ops
from fastdiff.ops import reference
from fastdiff.ops.noise import gaussian_noise_reference
from fastdiff.testing import assert_close

IMAGE = (3, 32, 32)  # 3072 values an image


def fresh_seeds(n):
    return torch.randint(-(2**63), 2**63 - 1, (n,), dtype=torch.int64, device="cpu").to(DEVICE)


def to_numpy(z):
    return z.cpu().numpy()


@pytest.fixture(scope="module")
def kernel_noise():
    """8 images x 3072 values from the kernel (the statistical sample), with their seeds and stream."""
    seeds = fresh_seeds(8)
    stream = int(torch.randint(0, 2**32, (), device="cpu").item())  # a host int
    return seeds, stream, kernels.gaussian_noise(seeds, stream, IMAGE)


def check_standard_normal(z: np.ndarray, what: str):
    stats = pytest.importorskip("scipy.stats", reason="scipy missing: the normality tests need scipy.stats")
    n = z.size
    assert abs(z.mean()) < 6 / math.sqrt(n), f"{what}: mean {z.mean():.4f}"
    assert abs(z.var() - 1) < 6 * math.sqrt(2 / n), f"{what}: variance {z.var():.4f}"
    assert abs(stats.skew(z)) < 6 * math.sqrt(6 / n), f"{what}: skewness {stats.skew(z):.4f}"
    assert abs(stats.kurtosis(z)) < 6 * math.sqrt(24 / n), f"{what}: excess kurtosis {stats.kurtosis(z):.4f}"
    p = stats.kstest(z, "norm").pvalue
    assert p > 1e-6, f"{what}: Kolmogorov-Smirnov p = {p:.2e}"


def assert_uncorrelated(a: np.ndarray, b: np.ndarray, what: str):
    r = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    assert abs(r) < 6 / math.sqrt(a.size), f"{what}: correlation {r:.4f}"


# ---- statistics ------------------------------------------------------------------------------------------------


def test_kernel_noise_is_standard_normal(kernel_noise):
    _, _, z = kernel_noise
    check_standard_normal(to_numpy(z).ravel(), "kernel noise")
    # each of the four Box-Muller outputs (element e takes n[e % 4]) on its own
    flat = to_numpy(z.reshape(z.shape[0], -1))
    for lane in range(4):
        check_standard_normal(flat[:, lane::4].ravel(), f"kernel noise lane {lane}")


def test_reference_noise_is_standard_normal():
    z = to_numpy(gaussian_noise_reference(fresh_seeds(16), 3, (4, 64, 64))).ravel()
    check_standard_normal(z, "reference noise")


def test_kernel_noise_neighbours_uncorrelated(kernel_noise):
    _, _, z = kernel_noise
    flat = to_numpy(z.reshape(z.shape[0], -1))
    for lag in (1, 2, 3, 4, 32):  # within a Philox call (1-3), across counters (4), across rows (32)
        assert_uncorrelated(flat[:, :-lag], flat[:, lag:], f"lag {lag}")
    # the two outputs of one Box-Muller pair share a radius: their squares must not be correlated either
    assert_uncorrelated(flat[:, 0::4] ** 2, flat[:, 1::4] ** 2, "squares of a Box-Muller pair")


def test_kernel_noise_uncorrelated_across_images_and_streams(kernel_noise):
    seeds, stream, z = kernel_noise
    flat = to_numpy(z.reshape(z.shape[0], -1))
    for i in range(flat.shape[0] - 1):
        assert_uncorrelated(flat[i], flat[i + 1], f"images {i} and {i + 1}")
    # adjacent seeds are a worst case for a counter-based generator
    adjacent = to_numpy(kernels.gaussian_noise(torch.tensor([41, 42], device=DEVICE), stream, IMAGE).reshape(2, -1))
    assert_uncorrelated(adjacent[0], adjacent[1], "seeds 41 and 42")
    next_stream = to_numpy(kernels.gaussian_noise(seeds, (stream + 1) % 2**32, IMAGE).reshape(seeds.shape[0], -1))
    assert_uncorrelated(flat, next_stream, "streams s and s + 1")


# ---- equality with the specification ---------------------------------------------------------------------


def test_kernel_equals_reference(kernel_noise):
    seeds, stream, z = kernel_noise
    ref = gaussian_noise_reference(seeds, stream, IMAGE)
    assert_close(z, ref, torch.float32, rtol=PHILOX_F32_RTOL, what="kernel vs reference noise")
    assert (z - ref).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_low_precision_noise_equals_reference(dtype):
    seeds = fresh_seeds(2)
    z = kernels.gaussian_noise(seeds, 9, (2, 5, 7), dtype=dtype)
    assert z.dtype == dtype
    assert_close(z, gaussian_noise_reference(seeds, 9, (2, 5, 7), dtype=dtype), dtype)


def test_extreme_seeds_and_streams():
    seeds = torch.tensor([0, -1, 2**63 - 1, -(2**63), 2**32, 2**32 - 1], device=DEVICE)
    for stream in (0, 2**32 - 1, 2**32 + 5, torch.tensor(2**31 + 3, device=DEVICE)):
        z = kernels.gaussian_noise(seeds, stream, (1, 3, 5))
        assert_close(z, gaussian_noise_reference(seeds, stream, (1, 3, 5)), torch.float32, rtol=PHILOX_F32_RTOL)


def test_stream_as_device_tensor():
    seeds = fresh_seeds(2)
    a = kernels.gaussian_noise(seeds, 17, (3, 4, 4))
    b = kernels.gaussian_noise(seeds, torch.tensor(17, device=DEVICE), (3, 4, 4))
    c = ops.gaussian_noise(seeds, torch.tensor([17], dtype=torch.int32, device=DEVICE), (3, 4, 4), backend="triton")
    assert torch.equal(a, b) and torch.equal(a, c)


# ---- reproducibility and independence from batch and layout ------------------------------------------------


def test_same_seed_same_noise():
    seeds = fresh_seeds(3)
    assert torch.equal(kernels.gaussian_noise(seeds, 4, (3, 6, 6)), kernels.gaussian_noise(seeds, 4, (3, 6, 6)))
    other = kernels.gaussian_noise(seeds, 5, (3, 6, 6))
    assert not torch.equal(kernels.gaussian_noise(seeds, 4, (3, 6, 6)), other)


def test_image_noise_independent_of_batch():
    """Image i's noise is the same alone, in a batch of 4 and in a shuffled batch of 3."""
    seeds = fresh_seeds(4)
    full = kernels.gaussian_noise(seeds, 2, (3, 9, 7))
    for order in ([2], [3, 0, 2], [1, 3]):
        part = kernels.gaussian_noise(seeds[order], 2, (3, 9, 7))
        assert torch.equal(part, full[order])
    # and the same holds for the noise the update step draws (coefficients: prev = z)
    coeffs = torch.zeros(1, 9, device=DEVICE)
    coeffs[0, 8] = 1.0
    x = randn(4, 3, 9, 7)
    streams = torch.tensor([2], device=DEVICE)
    step_full = kernels.update_step(x, x, coeffs, 0, seeds=seeds, noise_streams=streams)
    assert torch.equal(step_full, full)
    step_part = kernels.update_step(x[[3, 1]], x[[3, 1]], coeffs, 0, seeds=seeds[[3, 1]], noise_streams=streams)
    assert torch.equal(step_part, full[[3, 1]])


@pytest.mark.parametrize("hw", [(8, 8), (7, 5)], ids=["hw%4==0", "hw%4!=0"])
def test_noise_independent_of_layout(hw):
    """channels_last tensors draw the noise of the logical NCHW index: same result as NCHW."""
    coeffs = randn(3, 9)
    seeds = fresh_seeds(2)
    streams = torch.tensor([4, 5, 6], device=DEVICE)
    x, m = randn(2, 5, *hw), randn(2, 5, *hw)
    nchw = kernels.update_step(x, m, coeffs, 1, seeds=seeds, noise_streams=streams)
    cl = kernels.update_step(x.contiguous(memory_format=torch.channels_last),
                             m.contiguous(memory_format=torch.channels_last), coeffs, 1, seeds=seeds,
                             noise_streams=streams)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cl.contiguous(), nchw)
    ref = reference.update_step(x, m, coeffs, 1, seeds=seeds, noise_streams=streams)
    assert_close(nchw, ref, torch.float32, rtol=PHILOX_F32_RTOL)
