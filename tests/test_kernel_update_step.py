"""Fused DDPM/DDIM update-step kernel against the reference: compiled on a CUDA GPU when there is one, else under
the Triton interpreter on the CPU (tests/kernel_device.py decides).

Tolerance: fastdiff.testing.RTOL for the sample dtype, against the reference computed upcast from the same
inputs on the same device. With no noise or a noise tensor the float32 result matches the reference to rounding
(same operation order, no FMA contraction), on the GPU too. With in-kernel Philox noise the Gaussian values
differ from the reference's torch log/cos/sin by float32 rounding only, so the same RTOL applies and float32 is
also held to kernel_device.PHILOX_F32_RTOL (1e-6 under the interpreter, 2e-6 on the GPU: see there). Inputs are
fresh random every run and outputs start as NaN.
"""

# first: settles TRITON_INTERPRET before the kernel modules load
from kernel_device import DEVICE, PHILOX_F32_RTOL, gpu_only, randn

from itertools import zip_longest

import pytest
import torch

from fastdiff import kernels, ops
from fastdiff.ops import reference
from fastdiff.schedulers import DDIMScheduler, DDPMScheduler
from fastdiff.testing import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["f32", "f16", "bf16"]
LAYOUTS = ["nchw", "channels_last"]


# ---- coefficient tables of the samplers (fastdiff.schedulers, float64 on the host, stored float32) ------------


def random_table(steps=6):
    """Random standard normal rows."""
    return randn(steps, ops.N_STEP_COEFFS)


def table(kind, pred="epsilon", eta=0.0, clipped_eps=False):
    """Cosine schedule, 4 linspace steps [999, 666, 333, 0]: the noisiest step (alpha-bar 2.4e-9) to the last."""
    if kind == "random":
        return random_table()
    common = dict(beta_schedule="squaredcos_cap_v2", prediction_type=pred, timestep_spacing="linspace")
    if kind == "ddpm":
        sched = DDPMScheduler(**common)
        sched.set_timesteps(4)
    else:
        sched = DDIMScheduler(**common)
        sched.set_timesteps(4, eta=eta, use_clipped_model_output=clipped_eps)
    return sched.coeffs.to(DEVICE)


VARIANTS = {
    "ddpm-eps": ("ddpm", "epsilon", 0.0, False),
    "ddpm-sample": ("ddpm", "sample", 0.0, False),
    "ddpm-v": ("ddpm", "v_prediction", 0.0, False),
    "ddim-eps-eta0": ("ddim", "epsilon", 0.0, False),
    "ddim-v-eta1": ("ddim", "v_prediction", 1.0, False),
    "ddim-sample-eta0.5": ("ddim", "sample", 0.5, False),
    "ddim-eps-clipped-eta1": ("ddim", "epsilon", 1.0, True),
    "random-rows": ("random", None, 0.0, False),
}


# ---- helpers --------------------------------------------------------------------------------------------------


def make(shape, dtype, layout):
    t = randn(*shape, dtype=dtype)
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t


def poisoned_like(t):
    return torch.full_like(t, float("nan"))  # full_like keeps the memory format


def run_both(sample, model_output, coeffs, step, noise_mode="tensor", clip=None, rtol=None):
    """Kernel (into a NaN buffer) and reference on the same inputs; returns (result, reference)."""
    n = sample.shape[0]
    kw = dict(clip_range=clip)
    if noise_mode == "tensor":
        kw["noise"] = make(sample.shape, sample.dtype, "channels_last" if not sample.is_contiguous() else "nchw")
    elif noise_mode == "philox":
        kw["seeds"] = torch.randint(-(2**62), 2**62, (n,), dtype=torch.int64, device=DEVICE)
        kw["noise_streams"] = torch.randint(0, 2**31, (coeffs.shape[0],), dtype=torch.int64, device=DEVICE)
    out = poisoned_like(sample)
    res = kernels.update_step(sample, model_output, coeffs, step, out=out, **kw)
    assert res is out
    ref = reference.update_step(sample, model_output, coeffs, step, **kw)
    assert res.dtype == sample.dtype and res.stride() == ref.stride()
    assert_close(res, ref, sample.dtype, rtol=rtol, what=f"update_step {noise_mode} clip={clip}")
    return res, ref


# ---- every sampler variant (explicit noise) ----------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("clip", [None, 1.0], ids=["noclip", "clip1"])
def test_sampler_variants_explicit_noise(variant, clip):
    """float32 with a noise tensor is bit-identical to the reference: same operation order, no contraction."""
    coeffs = table(*VARIANTS[variant])
    x = make((3, 3, 7, 5), torch.float32, "nchw")
    m = make((3, 3, 7, 5), torch.float32, "nchw")
    for step in range(coeffs.shape[0]):
        res, ref = run_both(x, m, coeffs, step if step % 2 else torch.tensor(step, device=DEVICE), "tensor", clip)
        assert torch.equal(res, ref), f"step {step}: max difference {(res - ref).abs().max().item():.3e}"


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_philox_path_update_is_exact(variant, layout):
    """With Philox noise the kernels fold eps into prev (prev = a x0 + b m + d x, the three weights formed from the
    row once a program) and write each ``a * b + c`` as one fma. With the noise column zeroed (0 * z adds nothing)
    their float32 result must equal that formula bit for bit on every sampler table, for the flat, the channel
    tile and the RGB kernel (fma emulated in float64: the product is exact there)."""
    coeffs = table(*VARIANTS[variant]).clone()
    coeffs[:, ops.STEP_COEFFS.index("noise_std")] = 0.0
    seeds = torch.randint(-(2**62), 2**62, (2,), dtype=torch.int64, device=DEVICE)
    streams = torch.randint(0, 2**31, (coeffs.shape[0],), dtype=torch.int64, device=DEVICE)
    for shape in [(2, 3, 7, 5), (2, 3, 4, 6), (2, 4, 4, 6)]:
        x, m = make(shape, torch.float32, layout), make(shape, torch.float32, layout)
        for step in range(coeffs.shape[0]):
            res = kernels.update_step(x, m, coeffs, torch.tensor(step, device=DEVICE), clip_range=1.0, seeds=seeds,
                                      noise_streams=streams, out=poisoned_like(x))
            ref = fused_update(x, m, coeffs[step], clip=1.0)
            assert torch.equal(res, ref), f"{shape} step {step}: max difference {(res - ref).abs().max().item():.3e}"


def fused_update(x, m, row, clip):
    """The Philox path's update without its noise term, as the kernels compute it in float32."""
    def fma(a, b, c):
        return (a.double() * b.double() + c.double()).float()

    c = [v.reshape(()) for v in row.float().unbind(0)]
    x0 = (fma(c[0], x, c[1] * m) * c[2]).clamp(-clip, clip)
    eps_weight = c[8] * c[6]
    from_x0, from_m, from_x = fma(eps_weight, c[5], c[7]), eps_weight * c[4], fma(eps_weight, c[3], c[9])
    return fma(from_x0, x0, fma(from_m, m, from_x * x))


# ---- dtypes x layouts x noise modes ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("noise_mode", ["none", "tensor", "philox"])
def test_dtypes_layouts_noise(dtype, layout, noise_mode):
    """7x5 maps (numel per image 105, not a multiple of 4; channels_last takes the unaligned-quads Philox path),
    8x8 maps (channels_last Philox by pixel quads) and 5x7 maps with 4 channels (unaligned quads, every channel
    tile full: no channel mask). C = 4 fills its channel tile; C = 3 and C = 6 (6x5 maps, unaligned) take the
    (quad, channel) pairs kernel."""
    coeffs = table("ddim", "epsilon", 1.0)
    for i, shape in enumerate([(3, 3, 7, 5), (2, 4, 8, 8), (2, 4, 5, 7), (2, 6, 6, 5)]):
        x, m = make(shape, dtype, layout), make(shape, dtype, layout)
        step = 2 if i == 0 else torch.tensor(1, dtype=torch.int32, device=DEVICE)
        run_both(x, m, coeffs, step, noise_mode, clip=1.0 if i == 1 else None)


# Every channels_last Philox path of the launcher: (shape, kernel, H * W % 4 == 0, no mask at all). The plan is
# checked first, so a change of plan cannot silently leave a path untested.
CL_PHILOX_PATHS = {
    "rgb": ((2, 3, 6, 6), "cl_rgb", True, False),  # 9 quads: one partial program
    "rgb-even": ((1, 3, 32, 64), "cl_rgb", True, True),  # 512 quads: one whole program
    "pairs-unaligned": ((2, 3, 5, 7), "cl_pairs", False, False),
    "pairs-quads": ((2, 6, 4, 6), "cl_pairs", True, False),
    "pairs-even": ((1, 6, 32, 64), "cl_pairs", True, True),  # 512 quads x 6 channels = 3 x 1024 pairs
    "tile-exact": ((2, 4, 4, 6), "cl_philox", True, False),
    "tile-masked-c": ((2, 5 * 4, 3, 3), "cl_philox", False, False),  # 20 channels in a 32-channel tile
}


# float16 (the GPU default) in every run; float32 and bfloat16 marked slow, so the GPU check's --quick run compiles
# a third of these variants
PATH_DTYPES = [pytest.param(dt, id=i, marks=() if dt == torch.float16 else pytest.mark.slow)
               for dt, i in zip(DTYPES, DTYPE_IDS)]


@pytest.mark.parametrize("dtype", PATH_DTYPES)
@pytest.mark.parametrize("path", list(CL_PHILOX_PATHS))
def test_channels_last_philox_paths(dtype, path):
    """Each channels_last Philox kernel and mask form against the reference, device step index, clipping on."""
    from fastdiff.kernels.update_step_kernels import plan_update_step

    shape, kernel, quads, even = CL_PHILOX_PATHS[path]
    plan = plan_update_step(shape[1], shape[2] * shape[3], "channels_last", True)
    assert (plan.kernel, plan.quads, plan.even) == (kernel, quads, even), plan
    coeffs = table("ddim", "epsilon", 1.0)
    x, m = make(shape, dtype, "channels_last"), make(shape, dtype, "channels_last")
    run_both(x, m, coeffs, torch.tensor(2, device=DEVICE), "philox", clip=1.0)


def test_philox_fp32_error_is_rounding_only():
    """float32 with Philox noise held to PHILOX_F32_RTOL, far inside RTOL[float32] = 1e-5."""
    coeffs = table("ddpm", "epsilon")
    for layout in LAYOUTS:
        x, m = make((2, 3, 6, 6), torch.float32, layout), make((2, 3, 6, 6), torch.float32, layout)
        run_both(x, m, coeffs, 1, "philox", rtol=PHILOX_F32_RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("noise_mode", ["none", "tensor", "philox"])
@pytest.mark.parametrize("clip", [None, 2.0], ids=["noclip", "clip2"])
@pytest.mark.parametrize("step_kind", ["int", "tensor"])
def test_full_matrix(dtype, layout, noise_mode, clip, step_kind):
    coeffs = table("random")
    step = 3 if step_kind == "int" else torch.tensor([3], device=DEVICE)
    for shape in [(1, 5, 3, 3), (2, 2, 4, 6)]:
        run_both(make(shape, dtype, layout), make(shape, dtype, layout), coeffs, step, noise_mode, clip)


# ---- several programs per image in every grid dimension -------------------------------------------------------

# (shape, layout): every image spans several programs in each grid dimension of its kernel (checked below).
# NCHW / noise-free / noise-tensor steps run the flat kernel (2048 elements a program): 3 x 41 x 37 = 4551
# elements an image is 3 programs, the last one partial. channels_last Philox runs the tile kernel for C = 67 (64
# channels and 32 pixel quads a program): 2 channel programs; 12 x 12 (36 quads) and 11 x 13 (143 pixels: a
# channel's quads start up to 3 pixels early, 37 quads) are 2 pixel programs each, quads and unaligned paths.
# C = 3 runs the RGB kernel with H * W % 4 == 0 (512 pixel quads a program): 48 x 48 (576 quads) is 2 programs;
# 47 x 49 runs the (quad, channel) pairs kernel (1024 pairs a program; 577 quads, 1731 pairs): 2 programs.
MULTI_PROGRAM_SHAPES = {
    "nchw": [(2, 3, 41, 37)],
    "channels_last": [(2, 67, 12, 12), (2, 67, 11, 13), (2, 3, 48, 48), (2, 3, 47, 49)],
}


def programs_per_image(shape, layout, philox):
    """Programs per image along each grid dimension but the image one, from the launcher's own plan."""
    from fastdiff.kernels.update_step_kernels import cl_philox_quads, plan_update_step

    _, c, h, w = shape
    plan = plan_update_step(c, h * w, layout, philox)
    if plan.kernel == "cl_philox":
        return [-(-cl_philox_quads(h * w, plan.quads) // plan.block_p), -(-c // plan.block_c)]
    if plan.kernel == "cl_pairs":
        return [-(-cl_philox_quads(h * w, plan.quads) * c // plan.block)]
    if plan.kernel == "cl_rgb":
        return [-(-(h * w // 4) // plan.block)]
    return [-(-c * h * w // plan.block)]


def _several_programs_cases():
    cases = []
    for noise_mode in ("none", "tensor", "philox"):
        for layout in LAYOUTS:
            for dtype, dtype_id in zip(DTYPES, DTYPE_IDS):
                slow = noise_mode == "philox" and layout == "channels_last" and dtype == torch.float32  # ~6 s
                cases.append(pytest.param(dtype, layout, noise_mode, id=f"{noise_mode}-{layout}-{dtype_id}",
                                          marks=(pytest.mark.slow,) if slow else ()))
    return cases


@pytest.mark.parametrize("dtype,layout,noise_mode", _several_programs_cases())
def test_several_programs_per_image(dtype, layout, noise_mode):
    """Every program of every image writes its part (outputs start as NaN), batch 2, device step index."""
    coeffs = table("ddpm", "epsilon")
    shapes = MULTI_PROGRAM_SHAPES[layout if noise_mode == "philox" else "nchw"]
    if dtype != torch.float32:
        shapes = shapes[:2]  # the interpreter's time: f32 takes all four tile shapes, half precision the C = 67 ones
    counts = [programs_per_image(shape, layout, noise_mode == "philox") for shape in shapes]
    assert all(c[0] >= 2 for c in counts) and all(max(dim) >= 2 for dim in zip_longest(*counts, fillvalue=0)), \
        f"{layout} {noise_mode}: {counts} programs per image, not several in every grid dimension"
    for shape in shapes:
        x, m = make(shape, dtype, layout), make(shape, dtype, layout)
        run_both(x, m, coeffs, torch.tensor(1, device=DEVICE), noise_mode, clip=1.0)


@gpu_only
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("noise_mode", ["none", "tensor", "philox"])
def test_gpu_realistic_batch(layout, noise_mode):
    """16x3x256x256 float16 (the LSUN-256 latent at batch 16) through a 1000-step DDPM table, device step index:
    many programs per image and, for channels_last Philox, the pixel-quad kernel across 3 channels."""
    sched = DDPMScheduler()
    sched.set_timesteps(1000)
    coeffs = sched.coeffs.to(DEVICE)
    x, m = make((16, 3, 256, 256), torch.float16, layout), make((16, 3, 256, 256), torch.float16, layout)
    run_both(x, m, coeffs, torch.tensor(617, device=DEVICE), noise_mode, clip=1.0)


# ---- step index ----------------------------------------------------------------------------------------------


def test_step_index_forms():
    coeffs = table("random")
    x, m = make((2, 3, 4, 4), torch.float32, "nchw"), make((2, 3, 4, 4), torch.float32, "nchw")
    z = torch.randn_like(x)
    expect = reference.update_step(x, m, coeffs, 4, noise=z)
    device_steps = (torch.tensor(4, device=DEVICE), torch.tensor([4], dtype=torch.int32, device=DEVICE),
                    torch.tensor(-2, dtype=torch.int64, device=DEVICE))
    for step in (4, -2, *device_steps):
        got = kernels.update_step(x, m, coeffs, step, noise=z)
        assert torch.equal(got, expect), f"step {step!r}"


def test_device_step_is_read_at_launch():
    """The row comes from the step tensor's current value (what a CUDA-graph replay relies on)."""
    coeffs = table("ddpm", "v_prediction")
    x, m = make((2, 3, 5, 5), torch.float32, "nchw"), make((2, 3, 5, 5), torch.float32, "nchw")
    seeds = torch.tensor([11, 12], device=DEVICE)
    streams = torch.tensor([7, 8, 9, 10], device=DEVICE)
    step = torch.tensor(0, device=DEVICE)
    for i in range(coeffs.shape[0]):
        step.fill_(i)
        got = kernels.update_step(x, m, coeffs, step, seeds=seeds, noise_streams=streams)
        ref = reference.update_step(x, m, coeffs, i, seeds=seeds, noise_streams=streams)
        assert_close(got, ref, torch.float32, what=f"step {i}")


def test_out_of_range_steps():
    coeffs = table("random")
    x = make((1, 3, 4, 4), torch.float32, "nchw")
    with pytest.raises(ValueError, match="outside"):
        kernels.update_step(x, x, coeffs, coeffs.shape[0])
    # a device index cannot be checked without a sync: the kernel reads no row and writes NaN
    assert kernels.update_step(x, x, coeffs, torch.tensor(coeffs.shape[0], device=DEVICE)).isnan().all()


def test_in_place_output():
    coeffs = table("ddim", "epsilon", 0.0)
    for layout in LAYOUTS:
        x, m = make((2, 4, 4, 4), torch.float16, layout), make((2, 4, 4, 4), torch.float16, layout)
        seeds, streams = torch.tensor([1, 2], device=DEVICE), torch.arange(4, device=DEVICE)
        expect = kernels.update_step(x, m, coeffs, 2, seeds=seeds, noise_streams=streams)
        kernels.update_step(x, m, coeffs, 2, seeds=seeds, noise_streams=streams, out=x)
        assert torch.equal(x, expect)


# ---- dispatch and errors ---------------------------------------------------------------------------------------


def test_ops_ddpm_and_ddim_dispatch():
    x, m = make((2, 3, 6, 6), torch.bfloat16, "channels_last"), make((2, 3, 6, 6), torch.bfloat16, "channels_last")
    seeds, streams = torch.tensor([5, 6], device=DEVICE), torch.arange(4, device=DEVICE) + 1
    for fn, coeffs in ((ops.ddpm_step, table("ddpm")), (ops.ddim_step, table("ddim", "epsilon", 0.3))):
        step = torch.tensor(1, device=DEVICE)
        res = fn(x, m, coeffs, step, clip_range=1.0, seeds=seeds, noise_streams=streams, backend="triton")
        ref = fn(x, m, coeffs, step, clip_range=1.0, seeds=seeds, noise_streams=streams, backend="reference")
        assert res.is_contiguous(memory_format=torch.channels_last)
        assert_close(res, ref, torch.bfloat16)


def test_errors_are_clear():
    coeffs = table("random")
    x = make((2, 3, 4, 4), torch.float32, "nchw")
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert "layout" in kernels.update_step_problem(x_cl, x, None)
    assert "layout" in kernels.update_step_problem(x, x, x_cl)
    assert kernels.update_step_problem(x, x, x) is None
    with pytest.raises(ValueError, match="layout"):
        ops.update_step(x_cl, x, coeffs, 0, backend="triton")
    with pytest.raises(ValueError, match="float64"):
        kernels.update_step(x.double(), x.double(), coeffs, 0)
    with pytest.raises(ValueError, match="coeffs"):
        kernels.update_step(x, x, coeffs.double(), 0)
    with pytest.raises(ValueError, match="seeds"):
        kernels.update_step(x, x, coeffs, 0, seeds=torch.tensor([1, 2], dtype=torch.int32, device=DEVICE),
                            noise_streams=torch.arange(6, device=DEVICE))
    with pytest.raises(ValueError, match="noise_streams"):
        kernels.update_step(x, x, coeffs, 0, seeds=torch.tensor([1, 2], device=DEVICE),
                            noise_streams=torch.arange(5, device=DEVICE))
    with pytest.raises(ValueError, match="integer"):
        kernels.update_step(x, x, coeffs, torch.tensor(1.0, device=DEVICE))
    with pytest.raises(ValueError, match="out"):
        kernels.update_step(x, x, coeffs, 0, out=x_cl)


def test_strided_seeds_and_streams():
    coeffs = table("ddpm")
    x, m = make((2, 3, 4, 4), torch.float32, "nchw"), make((2, 3, 4, 4), torch.float32, "nchw")
    seeds = torch.tensor([3, 99, 4, 98], device=DEVICE)[::2]
    streams = (torch.arange(8, dtype=torch.int32, device=DEVICE) * 5)[::2]
    got = kernels.update_step(x, m, coeffs, 1, seeds=seeds, noise_streams=streams)
    ref = reference.update_step(x, m, coeffs, 1, seeds=seeds, noise_streams=streams)
    assert_close(got, ref, torch.float32)
