"""Fused DPM-Solver step kernel against the reference (fastdiff/ops/dpm_reference.py): compiled on a CUDA GPU when
there is one, else under the Triton interpreter on the CPU (tests/kernel_device.py decides).

Tables come from the scheduler (every order, warm-up and final rows, ODE and SDE, noise and data prediction), the
history from a chain of earlier steps, so the ring is exercised as the sampler uses it. Tolerance: fastdiff.testing.
RTOL of the sample dtype, against the reference computed upcast from the same inputs; the history entry written by
the kernel is held to the same bound. Inputs are fresh random every run; outputs and unused history start as NaN.
"""

# first: settles TRITON_INTERPRET before the kernel modules load
from kernel_device import DEVICE, INTERPRETED, PHILOX_F32_RTOL, randn

import pytest
import torch
import triton

import fastdiff.kernels.dpm_solver_kernels as dpm_kernels
from fastdiff.kernels._common import layout_of
from fastdiff import DPMSolverMultistepScheduler, kernels, ops
from fastdiff.ops import dpm_reference
from fastdiff.testing import RTOL, assert_close

assert isinstance(dpm_kernels._dpm_step_kernel, triton.runtime.JITFunction) != INTERPRETED, \
    "kernels/dpm_solver_kernels.py was imported in the other TRITON_INTERPRET mode"

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["f32", "f16", "bf16"]
LAYOUTS = ["nchw", "channels_last"]
# (N, C, H, W): odd sizes; 3x37x29 = 3219 elements > 2048 (two programs per image) and not a multiple of 4
SHAPES = [(2, 3, 37, 29), (1, 4, 8, 8), (3, 5, 7, 3)]


def table(algorithm="dpmsolver++", order=3, prediction="epsilon", n=8, device=DEVICE):
    final = "zero" if algorithm.endswith("++") else "sigma_min"
    s = DPMSolverMultistepScheduler(algorithm_type=algorithm, solver_order=order, prediction_type=prediction,
                                    final_sigmas_type=final)
    s.set_timesteps(n, device=device)
    return s


def make(shape, dtype, layout):
    x = randn(*shape, dtype=dtype)
    m = randn(*shape, dtype=dtype)
    if layout == "channels_last":
        x, m = x.contiguous(memory_format=torch.channels_last), m.contiguous(memory_format=torch.channels_last)
    return x, m


def run_chain(s, shape, dtype, layout, noise_mode, steps=None):
    """Step the kernel and the reference side by side over the table; compare x_{t-1} and the history each step."""
    x, _ = make(shape, dtype, layout)
    hist_k = s.history_for(x)
    hist_k.fill_(float("nan"))  # poisoned: a step may only read slots earlier steps wrote
    hist_r = hist_k.clone()
    seeds = torch.randint(0, 2**62, (shape[0],), dtype=torch.int64, device=DEVICE)
    for i in range(s.num_inference_steps if steps is None else steps):
        _, m = make(shape, dtype, layout)
        kwargs = {}
        if noise_mode == "tensor":
            kwargs["noise"] = make(shape, dtype, layout)[0]
        elif noise_mode == "philox":
            kwargs = {"seeds": seeds, "noise_streams": s.noise_streams}
        index = torch.tensor(i, device=DEVICE) if i % 2 else i  # both step-index forms
        out = torch.full_like(x, float("nan"))
        res = kernels.dpm_solver_step(x, m, hist_k, s.coeffs, index, out=out, **kwargs)
        ref = dpm_reference.dpm_solver_step(x, m, hist_r, s.coeffs, i, **kwargs)
        assert res is out and res.dtype == dtype and layout_of(res) == layout_of(x)
        rtol = PHILOX_F32_RTOL if noise_mode == "philox" and dtype == torch.float32 else RTOL[dtype]
        assert_close(res, ref, dtype, rtol=rtol, what=f"step {i} x_prev")
        slot = i % hist_k.shape[0]
        assert_close(hist_k[slot], hist_r[slot], dtype, what=f"step {i} history slot {slot}")
        x = ref


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_ode_orders_dtypes_layouts(shape, dtype, layout):
    run_chain(table("dpmsolver++", 3, "epsilon"), shape, dtype, layout, "none")


@pytest.mark.parametrize("noise_mode", ["tensor", "philox"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sde_noise(dtype, layout, noise_mode):
    run_chain(table("sde-dpmsolver++", 2, "v_prediction", n=6), SHAPES[0], dtype, layout, noise_mode)


@pytest.mark.parametrize("algorithm,order,prediction", [
    ("dpmsolver++", 1, "sample"), ("dpmsolver++", 2, "v_prediction"), ("sde-dpmsolver++", 3, "epsilon"),
    ("dpmsolver", 3, "sample"), ("sde-dpmsolver", 2, "epsilon"),
])
def test_algorithms(algorithm, order, prediction):
    noise = "philox" if algorithm.startswith("sde") else "none"
    run_chain(table(algorithm, order, prediction, n=7), (2, 3, 9, 11), torch.float32, "nchw", noise)


# Every channels_last Philox path of the launcher: (shape, kernel, H * W % 4 == 0); the plan is checked first.
CL_PHILOX_PATHS = {
    "rgb": ((2, 3, 6, 6), "cl_rgb", True),  # 9 quads: one partial program
    "rgb-programs": ((1, 3, 40, 40), "cl_rgb", True),  # 400 quads: two programs of 256
    "tile-exact": ((2, 4, 4, 6), "cl_philox", True),
    "tile-unaligned-masked-c": ((2, 5, 3, 3), "cl_philox", False),  # 5 channels in an 8-channel tile
    "tile-channel-programs": ((1, 67, 2, 3), "cl_philox", False),  # 67 channels: two channel tiles of 64
}


# float16 (the GPU default) in every run; float32 and bfloat16 marked slow, so the GPU check's --quick run compiles
# a third of these variants
PATH_DTYPES = [pytest.param(dt, id=i, marks=() if dt == torch.float16 else pytest.mark.slow)
               for dt, i in zip(DTYPES, DTYPE_IDS)]


@pytest.mark.parametrize("dtype", PATH_DTYPES)
@pytest.mark.parametrize("path", list(CL_PHILOX_PATHS))
def test_channels_last_philox_paths(dtype, path):
    shape, kernel, quads = CL_PHILOX_PATHS[path]
    plan = dpm_kernels.plan_dpm_solver_step("channels_last", True, shape[1], shape[2] * shape[3])
    assert (plan.kernel, plan.quads) == (kernel, quads), plan
    run_chain(table("sde-dpmsolver++", 2, "epsilon", n=4), shape, dtype, "channels_last", "philox")


def test_many_programs_per_image_and_batch():
    """5 images of 4x41x33 channels_last: 339 pixel quads per channel, two programs per image in grid dimension 0,
    five images in dimension 2."""
    run_chain(table("sde-dpmsolver++", 3, "epsilon", n=5), (5, 4, 41, 33), torch.float16, "channels_last", "philox",
              steps=3)


def test_scheduler_step_at_triton_equals_reference():
    """The scheduler's own buffers drive the kernel exactly as the reference (backend switch, same history)."""
    s_t, s_r = table("sde-dpmsolver++", 3, "epsilon"), table("sde-dpmsolver++", 3, "epsilon")
    s_t.backend, s_r.backend = "triton", "reference"
    x, _ = make((2, 3, 9, 7), torch.float32, "nchw")
    seeds = torch.tensor([5, 1 << 40], dtype=torch.int64, device=DEVICE)
    for i in range(s_t.num_inference_steps):
        m = randn(2, 3, 9, 7)
        index = torch.tensor(i, device=DEVICE)
        a = s_t.step_at(m, index, x, seeds=seeds)
        b = s_r.step_at(m, index, x, seeds=seeds)
        assert_close(a, b, rtol=PHILOX_F32_RTOL, what=f"step {i}")
        x = b


def test_refusals_are_clear():
    s = table()
    x, m = make((2, 3, 4, 4), torch.float32, "nchw")
    hist = s.history_for(x)
    assert "thresholding" in kernels.dpm_solver_step_problem(x, m, hist, None, (0.995, 1.0))
    with pytest.raises(ValueError, match="thresholding"):
        ops.dpm_solver_step(x, m, hist, s.coeffs, 0, threshold=(0.995, 1.0), backend="triton")
    cl = x.contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="layout"):
        kernels.dpm_solver_step(cl, m.contiguous(memory_format=torch.channels_last), hist, s.coeffs, 0)
    with pytest.raises(ValueError, match="outside a table"):
        kernels.dpm_solver_step(x, m, hist, s.coeffs, 99)
    with pytest.raises(ValueError, match="history"):
        kernels.dpm_solver_step(x, m, hist[:1].expand(4, *x.shape), s.coeffs, 0)
    out = kernels.dpm_solver_step(x, m, hist, s.coeffs, torch.tensor(8, device=DEVICE))  # past the table: NaN
    assert out.isnan().all()
    # auto on a CPU tensor takes the reference, thresholding included
    thr = DPMSolverMultistepScheduler(thresholding=True)
    thr.set_timesteps(4)
    assert torch.isfinite(thr.step_at(m.cpu(), 0, x.cpu())).all()
