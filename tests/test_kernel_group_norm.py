"""GroupNorm(+add)(+SiLU) Triton kernels against the reference: compiled on a CUDA GPU when there is one, else
under the Triton interpreter on the CPU (tests/kernel_device.py decides).

Tolerance: fastdiff.testing.RTOL for the output dtype (relative Frobenius error against the float32
reference, computed from the same inputs on the same device). Half-precision outputs are compared with the
exact (float64) result, never rounded to the half dtype: norm-wise as above, and element by element within the
rounding of the output (half an ulp of its dtype, one ulp for bfloat16 under the interpreter, see
HALF_ROUNDING_ULPS) plus float32 slack. Inputs are fresh random every run; every output
buffer starts as NaN, so an element the kernel forgets to write fails the comparison. Shapes are small because
the interpreter runs programs one by one; the split path is forced on small shapes with explicit tile sizes
(``split_plan``). On a GPU, gpu-marked tests add realistic UNet shapes.
"""

# first: settles TRITON_INTERPRET before the kernel modules load
from kernel_device import DEVICE, INTERPRETED, gpu_only, randn

import pytest
import torch
import torch.nn.functional as F

from fastdiff import kernels, ops
from fastdiff.kernels.group_norm_kernels import (SINGLE_MAX_ELEMENTS, TARGET_PROGRAMS, plan_group_norm, split_plan)
from fastdiff.ops import reference
from fastdiff.testing import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "channels_last"]


def make_input(shape, dtype, layout, mean=0.5, std=2.0):
    x = randn(*shape, dtype=dtype, mean=mean, std=std)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def poisoned_like(x):
    fmt = torch.channels_last if (x.dim() == 4 and not x.is_contiguous()) else torch.contiguous_format
    return torch.full(x.shape, float("nan"), dtype=x.dtype, device=x.device).contiguous(memory_format=fmt)


# Half-precision outputs: largest error of the output's rounding, in ulps of the output dtype at the exact value.
# Rounding to nearest (the GPU's cvt.rn, and the interpreter's float16) errs by at most half an ulp. Triton's
# interpreter (checked on 3.9) converts float32 to bfloat16 by truncation, dropping the low 16 bits (rounding
# toward zero), which errs by less than one ulp: that, not a looser tolerance, is the bound there.
HALF_ROUNDING_ULPS = {torch.float16: 0.5, torch.bfloat16: 1.0 if INTERPRETED else 0.5}
# Before that rounding the kernel's float32 result differs from the exact one by float32 rounding in the
# statistics and the affine map (and, on the GPU, the approximate exp in SiLU): a few float32 ulps of the
# tensor's largest value (measured under the interpreter: at most 2.6 eps of max |y|, over both paths, both
# layouts, means 0.02 to 6). The exact result is float64: torch's own float32 GroupNorm on channels_last
# inputs of mean 6 errs by up to 60 eps, more than the kernel.
FLOAT32_SLACK = 8 * torch.finfo(torch.float32).eps


def ulp(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` numbers at |value| (a float32 or float64 tensor): eps * 2**floor(log2 |value|),
    subnormals included."""
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(value.abs())
    binade = torch.where(value == 0, torch.zeros_like(value), torch.ldexp(torch.ones_like(value), exponent - 1))
    return binade.clamp(min=info.tiny) * info.eps


def assert_half_within_rounding(res: torch.Tensor, exact: torch.Tensor, what: str) -> None:
    """Every element of a half-precision ``res`` within the rounding of the float64 ``exact`` (plus float32 slack),
    so statistics or arithmetic done in half precision are caught even where a norm-wise bound would pass."""
    exact = exact.double()
    err = (res.double() - exact).abs()
    bound = HALF_ROUNDING_ULPS[res.dtype] * ulp(exact, res.dtype) + FLOAT32_SLACK * exact.abs().max()
    bad = err > bound
    if bad.any():
        first = torch.nonzero(bad)[:5].tolist()
        worst = (err / bound).max().item()
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements beyond "
                             f"{HALF_ROUNDING_ULPS[res.dtype]} ulp of {res.dtype} (+ float32 slack), "
                             f"worst {worst:.2f}x the bound, first at {first}")


def check(x, groups, *, weight=True, bias=True, add=None, silu=False, plan=None, param_dtype=None, eps=1e-5):
    """Run the kernel into a NaN-filled buffer and compare with the reference; returns the output.

    Float32 output: against the float32 reference, norm-wise. Half precision: against the reference computed in
    float64 from the same (half) inputs and never rounded, norm-wise and element by element.
    """
    c = x.shape[1]
    pdt = param_dtype or x.dtype
    w = randn(c, dtype=pdt) if weight else None
    b = randn(c, dtype=pdt) if bias else None
    out = poisoned_like(x)
    res = kernels.group_norm(x, groups, w, b, eps, add=add, silu=silu, out=out, plan=plan)
    assert res is out
    wide = x if x.dtype == torch.float32 else x.double()
    exact = reference.group_norm(wide, groups, w, b, eps, add=add, silu=silu)
    assert exact.dtype == (torch.float32 if x.dtype == torch.float32 else torch.float64)
    assert res.dtype == x.dtype
    assert res.is_contiguous(memory_format=torch.channels_last if x.dim() == 4 and not x.is_contiguous()
                             else torch.contiguous_format)
    what = f"group_norm {tuple(x.shape)} {x.dtype} groups={groups}"
    assert_close(res, exact, x.dtype, what=what)
    if x.dtype != torch.float32:
        assert_half_within_rounding(res, exact, what)
    return res


# ---- both paths, every dtype and layout ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_single_path_c96_3groups_7x5(dtype, layout):
    """C=96 in 3 groups on a 7x5 map, N=3: one program per (sample, group), add and silu fused."""
    x = make_input((3, 96, 7, 5), dtype, layout)
    assert plan_group_norm(3, 96, 35, 3, layout == "channels_last").path == "single"
    check(x, 3, add=randn(3, 96, dtype=dtype), silu=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_split_path_groups_larger_than_a_tile(dtype, layout):
    """Groups of 4 channels x 35 pixels split into 16x16 tiles, 2 tiles per stats program (3 tiles a channel:
    one full chunk and one ragged chunk), partials merged by the combine kernel."""
    x = make_input((3, 12, 7, 5), dtype, layout)
    plan = split_plan(12, 35, 3, block_c=16, block_p=16, tiles_per_chunk=2)
    assert plan.n_chunks == 2
    check(x, 3, add=randn(3, 12, 1, 1, dtype=dtype), silu=True, plan=plan)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_split_path_channel_blocks_smaller_than_group(layout):
    """Channel tiles (4) narrower than the group (8 channels), groups = 1 and 2."""
    x = make_input((2, 16, 6, 6), torch.float32, layout)
    check(x, 2, silu=True, plan=split_plan(16, 36, 2, block_c=4, block_p=16, tiles_per_chunk=1))
    check(x, 1, add=randn(2, 16), plan=split_plan(16, 36, 1, block_c=8, block_p=8, tiles_per_chunk=4))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_split_combine_loops_over_the_partials_more_than_once(layout):
    """The combine kernel merges BLOCK_K partials per pass, BLOCK_K = min(next_pow2(n_chunks), 2048 // BLOCK_CG);
    realistic maps need several passes (the README's 1x128x512x512 channels_last case: see the GPU test below).
    256 channels a group (BLOCK_CG 256, BLOCK_K 8) over 35 pixels in 4-pixel chunks: 9 partials, two passes
    (8, then 1 ragged chunk of 3 pixels), so the accumulator must carry across passes."""
    x = make_input((2, 512, 7, 5), torch.float32, layout)
    plan = split_plan(512, 35, 2, block_c=64, block_p=4, tiles_per_chunk=1)
    assert plan.n_chunks == 9 and plan.combine_block_k == 8, plan
    check(x, 2, add=randn(2, 512), silu=True, plan=plan)


def test_readme_case_needs_several_combine_passes():
    """1x128x512x512 channels_last in 32 groups (the README's split example): more partials than one combine pass
    holds (NCHW takes long pixel rows, 8 partials a channel, one pass)."""
    plan = plan_group_norm(1, 128, 512 * 512, 32, True)
    assert plan.path == "split" and plan.n_chunks > plan.combine_block_k, plan


@pytest.mark.parametrize("path", ["single", "split"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_low_variance_with_a_large_eps(path, layout):
    """Variance 1e-6 with eps 1e-4: sqrt(var + eps) is 10x sqrt(var), so a kernel that drops (or misplaces) eps
    is off by an order of magnitude (inputs with variance near 4 cannot see eps at all)."""
    x = make_input((2, 8, 5, 3), torch.float32, layout, mean=0.02, std=1e-3)
    plan = None if path == "single" else split_plan(8, 15, 2, block_c=4, block_p=4, tiles_per_chunk=2)
    w, b = randn(8), randn(8)
    with_eps = reference.group_norm(x, 2, w, b, 1e-4)
    assert (with_eps - reference.group_norm(x, 2, w, b, 1e-12)).abs().max() > 1.0  # eps matters here
    check(x, 2, eps=1e-4, plan=plan)
    check(x, 2, eps=1e-4, add=randn(2, 8), silu=True, plan=plan)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("path", ["single", "split"])
def test_half_precision_statistics_are_float32(dtype, path):
    """Mean 6, std 1, 576 elements a group: sums in half precision lose whole units (float16 holds integers only
    up to 2048, exactly), so statistics not computed in float32 miss the per-element rounding bound."""
    x = make_input((2, 16, 6, 6), dtype, "nchw", mean=6.0, std=1.0)
    plan = None if path == "single" else split_plan(16, 36, 1, block_c=16, block_p=16, tiles_per_chunk=2)
    check(x, 1, add=randn(2, 16, dtype=dtype), plan=plan)
    check(x.contiguous(memory_format=torch.channels_last), 2, silu=True, plan=plan if plan is None else
          split_plan(16, 36, 2, block_c=16, block_p=8, tiles_per_chunk=2))


# ---- labelled edge cases ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["single", "split"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_groups_one_and_groups_equal_channels(path, layout):
    x = make_input((2, 8, 5, 3), torch.float32, layout)
    for groups in (1, 8):
        plan = None if path == "single" else split_plan(8, 15, groups, block_c=8, block_p=8, tiles_per_chunk=1)
        check(x, groups, silu=True, plan=plan)


@pytest.mark.parametrize("path", ["single", "split"])
def test_batch_one(path):
    x = make_input((1, 6, 4, 9), torch.float16, "nchw")
    plan = None if path == "single" else split_plan(6, 36, 3, block_c=8, block_p=16, tiles_per_chunk=2)
    check(x, 3, add=randn(1, 6, dtype=torch.float16), plan=plan)


def test_3d_and_2d_inputs():
    """[N, C, L] and [N, C] tensors (NCHW-contiguous) take the same kernels."""
    check(make_input((2, 6, 10), torch.float32, "nchw"), 3, silu=True)
    check(make_input((3, 8, 10), torch.float32, "nchw"), 2,
          plan=split_plan(8, 10, 2, block_c=4, block_p=4, tiles_per_chunk=2))
    check(make_input((4, 6), torch.float32, "nchw"), 2, add=randn(4, 6))


@pytest.mark.parametrize("path", ["single", "split"])
def test_weight_bias_optional(path):
    x = make_input((2, 8, 4, 4), torch.float32, "channels_last")
    plan = None if path == "single" else split_plan(8, 16, 4, block_c=8, block_p=8, tiles_per_chunk=1)
    check(x, 4, weight=False, bias=False, plan=plan)
    check(x, 4, weight=True, bias=False, silu=True, plan=plan)
    check(x, 4, weight=False, bias=True, add=randn(2, 8), plan=plan)


def test_mixed_dtypes_fp32_params_and_add_with_fp16_x():
    x = make_input((2, 8, 6, 6), torch.float16, "nchw")
    check(x, 4, add=randn(2, 8), silu=True, param_dtype=torch.float32)


def test_non_contiguous_add():
    """add sliced out of a wider tensor (row stride != C) is read in place."""
    x = make_input((2, 8, 3, 3), torch.float32, "nchw")
    wide = randn(2, 20)
    check(x, 2, add=wide[:, 4:12])
    check(x, 2, add=wide[:, 4:12], plan=split_plan(8, 9, 2, block_c=4, block_p=4, tiles_per_chunk=1))


@pytest.mark.parametrize("path", ["single", "split"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_large_mean_variance_is_robust(path, layout):
    """mean 1e3, std 1: E[h^2] - E[h]^2 in float32 would lose the variance (1e6 + 1 at an ulp of 0.06).

    Compared with a float64 GroupNorm. Tolerance 2e-4: float32 cannot even hold the mean 1e3 closer than
    3e-5, and that error shifts every normalised value by (its error) / std.
    """
    x = make_input((2, 8, 8, 8), torch.float32, layout, mean=1000.0, std=1.0)
    w, b = randn(8), randn(8)
    plan = None if path == "single" else split_plan(8, 64, 2, block_c=4, block_p=16, tiles_per_chunk=2)
    res = kernels.group_norm(x, 2, w, b, 1e-5, plan=plan)
    exact = F.group_norm(x.double(), 2, w.double(), b.double(), 1e-5)
    assert_close(res, exact, rtol=2e-4, what="large-mean group_norm")
    # the naive one-pass formula in float32 fails the same tolerance by orders of magnitude
    h = x.reshape(2, 2, -1)
    naive_var = (h * h).mean(-1) - h.mean(-1) ** 2
    exact_var = x.double().reshape(2, 2, -1).var(-1, unbiased=False)
    assert ((naive_var.double() - exact_var).abs() / exact_var).max() > 1e-2


def test_split_path_is_deterministic_and_in_place():
    x = make_input((2, 8, 8, 8), torch.float32, "nchw")
    w, b, add = randn(8), randn(8), randn(2, 8)
    plan = split_plan(8, 64, 2, block_c=4, block_p=16, tiles_per_chunk=2)
    first = kernels.group_norm(x, 2, w, b, add=add, silu=True, plan=plan)
    second = kernels.group_norm(x, 2, w, b, add=add, silu=True, plan=plan)
    assert torch.equal(first, second)
    inplace = x.clone()
    kernels.group_norm(inplace, 2, w, b, add=add, silu=True, out=inplace, plan=plan)
    assert torch.equal(inplace, first)


# ---- dispatch, plan and errors ---------------------------------------------------------------------------------


def test_ops_dispatch_triton_backend():
    x = make_input((2, 8, 5, 5), torch.bfloat16, "channels_last")
    w, b, add = randn(8), randn(8), randn(2, 8, 1, 1)
    res = ops.group_norm(x, 4, w, b, add=add, silu=True, backend="triton")
    ref = ops.group_norm(x, 4, w, b, add=add, silu=True, backend="reference")
    assert res.is_contiguous(memory_format=torch.channels_last)
    assert_close(res, ref, torch.bfloat16)


def test_plan_splits_large_groups_across_many_programs():
    """A 512x512 map with 128 channels in 32 groups (1M elements a group) at batch 1 goes to the split path
    with enough stats programs to fill the GPU; small groups stay single-pass."""
    for cl in (False, True):
        plan = plan_group_norm(1, 128, 512 * 512, 32, cl)
        assert plan.path == "split"
        stats_programs = plan.n_chunks * -(-128 // plan.block_c)
        assert stats_programs >= TARGET_PROGRAMS
        assert plan.block_c * plan.block_p <= 4096
    plan = plan_group_norm(1, 128, 32 * 32, 32, False)
    assert plan.path == "single" and plan.block_c * plan.block_p <= SINGLE_MAX_ELEMENTS


def test_env_override_forces_split(monkeypatch):
    monkeypatch.setenv("FASTDIFF_GN_MAX_SINGLE", "0")
    monkeypatch.setenv("FASTDIFF_GN_TILE", "64")
    plan = plan_group_norm(2, 8, 36, 2, False)
    assert plan.path == "split" and plan.block_c * plan.block_p == 64
    check(make_input((2, 8, 6, 6), torch.float32, "nchw"), 2, silu=True)  # launcher picks the same plan


def test_errors_are_clear():
    x = make_input((2, 6, 4, 4), torch.float32, "nchw")
    with pytest.raises(ValueError, match="divisor"):
        kernels.group_norm(x, 4, None, None)
    with pytest.raises(ValueError, match="dtype"):
        kernels.group_norm(torch.randint(0, 5, (2, 6, 4, 4), device=DEVICE), 3, None, None)
    with pytest.raises(ValueError, match="float64"):
        ops.group_norm(x.double(), 3, backend="triton")
    with pytest.raises(ValueError, match="shape"):
        kernels.group_norm(x, 3, randn(5), None)
    with pytest.raises(ValueError, match="add"):
        kernels.group_norm(x, 3, None, None, add=randn(2, 5))
    with pytest.raises(ValueError, match="out"):
        kernels.group_norm(x, 3, None, None, out=torch.empty(2, 6, 4, 4, dtype=torch.float16, device=DEVICE))
    strided = randn(2, 4, 4, 6).permute(0, 3, 2, 1)  # neither NCHW-contiguous nor channels_last
    assert "neither" in kernels.group_norm_problem(strided, None, None, None)
    with pytest.raises(ValueError, match="neither"):
        ops.group_norm(strided, 3, backend="triton")
    assert kernels.group_norm_problem(x, None, None, None) is None


# ---- realistic UNet shapes (GPU only) ---------------------------------------------------------------------------


@gpu_only
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_large_group_split_path(layout):
    """2x128x256x256 float16 in 32 groups (262144 elements a group, the LSUN-256 UNet's first stage): the
    launcher's own split plan, time-embedding add and SiLU fused, against the float32 reference."""
    x = make_input((2, 128, 256, 256), torch.float16, layout)
    assert plan_group_norm(2, 128, 256 * 256, 32, layout == "channels_last").path == "split"
    check(x, 32, add=randn(2, 128, dtype=torch.float16), silu=True)


@gpu_only
def test_gpu_readme_case_channels_last():
    """1x128x512x512 float16 channels_last in 32 groups: the launcher's split plan with several combine passes."""
    x = make_input((1, 128, 512, 512), torch.float16, "channels_last")
    plan = plan_group_norm(1, 128, 512 * 512, 32, True)
    assert plan.path == "split" and plan.n_chunks > plan.combine_block_k
    check(x, 32, add=randn(1, 128, dtype=torch.float16), silu=True)


@gpu_only
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_batch_16_single_path(layout):
    """16x256x32x32 bfloat16 in 32 groups (8192 elements a group, the largest the single path takes)."""
    x = make_input((16, 256, 32, 32), torch.bfloat16, layout)
    assert plan_group_norm(16, 256, 32 * 32, 32, layout == "channels_last").path == "single"
    check(x, 32, add=randn(16, 256, 1, 1), silu=True, param_dtype=torch.float32)


# ---- wider sweeps (slow) ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("add_shape", [None, "nc", "nc11"])
@pytest.mark.parametrize("silu", [False, True])
def test_sweep_both_paths(dtype, layout, add_shape, silu):
    n, c, groups = 3, 24, 3
    x = make_input((n, c, 7, 5), dtype, layout)
    add = None if add_shape is None else randn(n, c, dtype=dtype)
    if add_shape == "nc11":
        add = add.reshape(n, c, 1, 1)
    check(x, groups, add=add, silu=silu)
    check(x, groups, add=add, silu=silu, plan=split_plan(c, 35, groups, block_c=32, block_p=16, tiles_per_chunk=2))
