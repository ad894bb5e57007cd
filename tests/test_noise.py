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

import triton
import triton.language as tl

from fastdiff import kernels, ops
from fastdiff.kernels import update_step_kernels
from fastdiff.ops import noise as noise_spec
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


# ---- known answers -------------------------------------------------------------------------------------------

# Philox-4x32-10 known-answer vectors of Random123 (DEShawResearch/random123, tests/kat_vectors, the three
# "philox4x32 10" lines): counter c0..c3, key k0 k1 -> output r0..r3.
PHILOX_KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def test_reference_philox_known_answers():
    for counter, key, expected in PHILOX_KAT:
        words = [torch.tensor([w], dtype=torch.int64) for w in (*counter, *key)]
        got = [int(r.item()) for r in noise_spec.philox4x32(*words)]
        assert got == list(expected), f"counter {counter} key {key}: {[hex(g) for g in got]}"


@triton.jit
def _philox_kat_kernel(words_ptr, out_ptr):
    """out[i, :] = Philox-4x32-10(counter words[i, 0:4], key words[i, 4:6]) through the update kernels' helper."""
    i = tl.program_id(0)
    w = words_ptr + i * 6
    c0 = tl.load(w + tl.arange(0, 1)).to(tl.uint32, bitcast=True)
    c1 = tl.load(w + 1 + tl.arange(0, 1)).to(tl.uint32, bitcast=True)
    c2 = tl.load(w + 2 + tl.arange(0, 1)).to(tl.uint32, bitcast=True)
    c3 = tl.load(w + 3 + tl.arange(0, 1)).to(tl.uint32, bitcast=True)
    k0 = tl.load(w + 4).to(tl.uint32, bitcast=True)
    k1 = tl.load(w + 5).to(tl.uint32, bitcast=True)
    r0, r1, r2, r3 = update_step_kernels._philox4x32(c0, c1, c2, c3, k0, k1)
    o = out_ptr + i * 4 + tl.arange(0, 1)
    tl.store(o, r0.to(tl.int32, bitcast=True))
    tl.store(o + 1, r1.to(tl.int32, bitcast=True))
    tl.store(o + 2, r2.to(tl.int32, bitcast=True))
    tl.store(o + 3, r3.to(tl.int32, bitcast=True))


def _as_int32(words):
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]  # the same 32 bits, signed


def test_kernel_philox_known_answers():
    words = torch.tensor([_as_int32([*c, *k]) for c, k, _ in PHILOX_KAT], dtype=torch.int32, device=DEVICE)
    out = torch.full((len(PHILOX_KAT), 4), -7, dtype=torch.int32, device=DEVICE)  # poisoned
    _philox_kat_kernel[(len(PHILOX_KAT),)](words, out)
    for (counter, key, expected), got in zip(PHILOX_KAT, out.cpu().tolist()):
        got = [g & 0xFFFFFFFF for g in got]
        assert got == list(expected), f"counter {counter} key {key}: {[hex(g) for g in got]}"


@triton.jit
def _box_muller_kernel(words_ptr, out_ptr, N: tl.constexpr):
    """out[0, i], out[1, i], out[2, i] = (radius, cos, sin) of the update kernels' Box-Muller on the word pair
    (words[0, i], words[1, i])."""
    i = tl.arange(0, N)
    r_rad = tl.load(words_ptr + i).to(tl.uint32, bitcast=True)
    r_ang = tl.load(words_ptr + N + i).to(tl.uint32, bitcast=True)
    neg_rad, cos, sin = update_step_kernels._box_muller_polar(r_rad, r_ang)
    tl.store(out_ptr + i, -neg_rad)
    tl.store(out_ptr + N + i, -cos)
    tl.store(out_ptr + 2 * N + i, -sin)


def test_box_muller_near_both_ends_of_the_uniforms():
    """Box-Muller on words whose uniform lies at the ends of (0, 1]: the radius sqrt(-2 ln u) within 1e-5 of
    float64 everywhere (where u is within 2**-11 of 1 the kernel takes a series in 1 - u: a special-function log2
    there errs by up to 6e-4 on radii below 0.01) and to 1e-6 relative in the series range; cos and sin of
    2 pi u_b (the kernel's sign convention undone) within 1e-5. Uniforms are the reference's float32
    ((r >> 8) + 0.5) 2**-24, which is 1 for the top word."""
    n = 256
    top = 2**24 - 1
    k_rad = np.concatenate([top - np.arange(96),  # 1 - u from 0 (rounded to 1) up to 2**-18
                            top - np.geomspace(96, 2**23, 128).astype(np.int64),  # 1 - u from 2**-18 to 1/2
                            np.arange(32)])  # u near 0: the largest radii
    k_ang = np.random.default_rng().integers(0, 2**24, n)
    words = np.stack([k_rad << 8 | 0xAB, k_ang << 8]).astype(np.uint32).view(np.int32)
    out = torch.full((3, n), float("nan"), device=DEVICE)
    _box_muller_kernel[(1,)](torch.from_numpy(words).to(DEVICE), out, N=n)
    radius, cos, sin = out.double().cpu().numpy()
    u_rad = ((k_rad.astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-24)).astype(np.float64)
    u_ang = ((k_ang.astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-24)).astype(np.float64)
    expect = np.sqrt(-2.0 * np.log(u_rad))
    assert np.abs(radius - expect).max() < 1e-5, np.abs(radius - expect).max()
    series = 1.0 - u_rad < 2.0**-11
    assert series.sum() > 128 and (radius[series] == 0).sum() == 1  # the top word: u = 1, radius 0
    assert np.allclose(radius[series], expect[series], rtol=1e-6, atol=0)
    assert np.abs(cos - np.cos(2 * np.pi * u_ang)).max() < 1e-5
    assert np.abs(sin - np.sin(2 * np.pi * u_ang)).max() < 1e-5


def test_noise_of_the_zero_counter_is_known():
    """Seed 0, stream 0: elements 0..3 come from the first known-answer vector (counter 0, key 0), mapped to
    uniforms ((r >> 8) + 0.5) 2**-24 and through Box-Muller, computed here in float64 from the published words."""
    r = PHILOX_KAT[0][2]
    u = [((w >> 8) + 0.5) * 2.0**-24 for w in r]
    expected = []
    for a, b in ((u[0], u[1]), (u[2], u[3])):
        rad = math.sqrt(-2.0 * math.log(a))
        expected += [rad * math.cos(2 * math.pi * b), rad * math.sin(2 * math.pi * b)]
    expected = torch.tensor(expected, dtype=torch.float64)
    seeds = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    for what, z in (("reference", gaussian_noise_reference(seeds, 0, (4,))), ("kernel", kernels.gaussian_noise(seeds, 0, (4,)))):
        assert (z[0].double().cpu() - expected).abs().max() < 1e-5, f"{what}: {z[0].tolist()} != {expected.tolist()}"


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
    coeffs = torch.zeros(1, ops.N_STEP_COEFFS, device=DEVICE)
    for name in ("x0_scale", "eps_scale", "noise_std"):
        coeffs[0, ops.STEP_COEFFS.index(name)] = 1.0
    x = randn(4, 3, 9, 7)
    streams = torch.tensor([2], device=DEVICE)
    step_full = kernels.update_step(x, x, coeffs, 0, seeds=seeds, noise_streams=streams)
    assert torch.equal(step_full, full)
    step_part = kernels.update_step(x[[3, 1]], x[[3, 1]], coeffs, 0, seeds=seeds[[3, 1]], noise_streams=streams)
    assert torch.equal(step_part, full[[3, 1]])


@pytest.mark.parametrize("hw", [(8, 8), (7, 5)], ids=["hw%4==0", "hw%4!=0"])
def test_noise_independent_of_layout(hw):
    """channels_last tensors draw the noise of the logical NCHW index: same result as NCHW."""
    coeffs = randn(3, ops.N_STEP_COEFFS)
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
