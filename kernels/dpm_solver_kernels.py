"""Fused multistep DPM-Solver(++) update with the history of converted model outputs in a ring of device buffers.

Math (``fastdiff/ops/dpm_reference.py``), with x = x_t, m = the model output, z = standard normal noise, ``c`` the
coefficient row of this step (``DPM_COEFFS``, 10 float32) and the history ring h[K] of K = solver_order slots:

    x0   = c.x0_from_x * x + c.x0_from_m * m
    D    = c.d_from_x * x + c.d_from_m * m + c.d_from_x0 * x0          (x0 for DPM-Solver++, eps for DPM-Solver)
    prev = c.prev_from_x * x + c.prev_from_d0 * D + c.prev_from_d1 * h[(i-1) % K] + c.prev_from_d2 * h[(i-2) % K]
           + c.noise_std * z
    h[i % K] = D

Every variant (orders 1-3 with warm-up and final lower-order steps, midpoint/heun, ODE/SDE, noise or data prediction)
is only a different row, read on the device from ``coeffs_ptr + i * 10`` with the step index i a launch argument or
an integer device tensor: a step is capturable in a CUDA graph and never recompiles. A history slot whose coefficient
is 0 is not loaded (its load is masked off), so a lower-order step reads no history bytes and never sees stale data.

Bytes per element, s = element size: reads x, m and one history slot per order above 1, writes x_{t-1} and D:
order 1: 4 s, order 2: 5 s, order 3: 6 s (float16: 8, 10, 12 bytes); a noise tensor adds s, in-kernel Philox noise
(the SDE variants) adds nothing. Noise follows ``fastdiff/ops/noise.py`` (the Philox and Box-Muller helpers of
``update_step_kernels``, so the same tolerance): one Philox call per four logical neighbours, along the rows of the
NCHW tile, or per channel and pixel quad for channels_last (``_dpm_step_cl_philox_kernel``).

Launched with ``enable_fp_fusion=False``, as the DDPM/DDIM step: the reference rounds every product and sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import CHANNELS_LAST, cdiv, dpm_solver_step_problem, layout_of
from .update_step_kernels import (NOISE_PHILOX, NOISE_TENSOR, StepPlan, _cl_quad_tile, _lane_mask, _lanes4, _normal4,
                                  cl_philox_grid, noise_mode_args, output_like, plan_cl_philox_tile, table_step_args)

N_DPM_COEFFS = 10
FP_FUSION = False


@triton.jit
def _dpm_row(coeffs_ptr, step_ptr, step_value, step_from_ptr, n_steps, K):
    """The step's row (10 float32, DPM_COEFFS order) read on the device, and the history slots it writes (D) and
    reads (D_{-1}, D_{-2}); an index outside the table gives a NaN row (and step 0), never a stray read."""
    step = tl.load(step_ptr, mask=step_from_ptr != 0, other=0).to(tl.int32) + step_value
    step = tl.where(step < 0, step + n_steps, step)
    ok = (step >= 0) & (step < n_steps)
    row = coeffs_ptr + step * 10
    nan = float("nan")
    c = (tl.load(row + 0, mask=ok, other=nan), tl.load(row + 1, mask=ok, other=nan),
         tl.load(row + 2, mask=ok, other=nan), tl.load(row + 3, mask=ok, other=nan),
         tl.load(row + 4, mask=ok, other=nan), tl.load(row + 5, mask=ok, other=nan),
         tl.load(row + 6, mask=ok, other=nan), tl.load(row + 7, mask=ok, other=nan),
         tl.load(row + 8, mask=ok, other=nan), tl.load(row + 9, mask=ok, other=nan))
    safe = tl.where(ok, step, 0)
    slots = ((safe % K).to(tl.int64), ((safe + K - 1) % K).to(tl.int64), ((safe + 2 * K - 2) % K).to(tl.int64))
    return c, safe, slots


@triton.jit
def _dpm_update(x_ptr, m_ptr, hist_ptr, out_ptr, offs, mask, numel, slots, c, z, NOISE: tl.constexpr):
    """Load x, m and the history this row uses at ``offs``, store D (history slot ``slots[0]``) and x_{t-1}
    (``+ noise_std * z`` unless NOISE == 0), every product and sum rounded as in the reference. A history slot
    whose coefficient is 0 is not loaded (a block-uniform predicate)."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    zeros = mask.to(tl.int32) * 0  # the predicates broadcast as integers (the interpreter's & takes no scalar bool)
    mask1 = mask & ((zeros + (c[7] != 0.0).to(tl.int32)) != 0)
    mask2 = mask & ((zeros + (c[8] != 0.0).to(tl.int32)) != 0)
    h1 = tl.load(hist_ptr + slots[1] * numel + offs, mask=mask1, other=0.0).to(tl.float32)
    h2 = tl.load(hist_ptr + slots[2] * numel + offs, mask=mask2, other=0.0).to(tl.float32)
    x0 = c[0] * x + c[1] * m
    d = c[2] * x + c[3] * m + c[4] * x0
    prev = c[5] * x + c[6] * d
    prev = prev + c[7] * h1
    prev = prev + c[8] * h2
    if NOISE != 0:
        prev = prev + c[9] * z
    tl.store(hist_ptr + slots[0] * numel + offs, d.to(hist_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + offs, prev.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dpm_step_kernel(
    x_ptr,  # sample x_t: [N, numel_img] in memory order (NCHW-contiguous, or any layout unless NOISE == 2)
    m_ptr,  # model output, same shape and layout as x
    z_ptr,  # noise, same shape and layout as x (read only when NOISE == 1)
    hist_ptr,  # history ring [K, N, numel_img]: slot k at hist_ptr + k * numel, same layout as x
    out_ptr,  # x_{t-1}, same shape and layout as x (may alias x_ptr)
    coeffs_ptr,  # float32 [n_steps, 10] coefficient table, row-major
    step_ptr,  # integer device scalar holding the step index (read only when step_from_ptr != 0)
    step_value,  # int32 step index added to the value read (the Python step index, or 0)
    step_from_ptr,  # int32: 1 = read the step index from step_ptr, 0 = use step_value alone
    n_steps,  # int32 rows of coeffs
    K,  # int32 history slots (solver_order, 1..3)
    seeds_ptr,  # int64 [N] per-image Philox seeds (NOISE == 2)
    streams_ptr,  # integer [n_steps] Philox stream of each step (NOISE == 2)
    numel_img,  # int32 elements per image (C * H * W)
    numel,  # int64/int32 elements per history slot (N * numel_img)
    NOISE: tl.constexpr,  # 0 none, 1 tensor z_ptr, 2 Philox from (seed, stream, logical index)
    BLOCK: tl.constexpr,  # elements per program, a multiple of 4
):
    """One DPM-Solver step over a block of one image: a [BLOCK // 4, 4] tile in memory order, which with Philox
    noise is the logical NCHW order (one Philox call per row)."""
    pid = tl.program_id(0)
    img = tl.program_id(1)
    c, safe, slots = _dpm_row(coeffs_ptr, step_ptr, step_value, step_from_ptr, n_steps, K)
    quad = pid * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
    offs = quad[:, None] * 4 + tl.arange(0, 4)[None, :]
    mask = offs < numel_img
    base = img.to(tl.int64) * numel_img
    if NOISE == 1:
        z = tl.load(z_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    elif NOISE == 2:
        seed = tl.load(seeds_ptr + img)
        stream = tl.load(streams_ptr + safe).to(tl.uint32)
        n0, n1, n2, n3 = _normal4(quad.to(tl.uint32), stream, seed)
        z = _lanes4(n0, n1, n2, n3)
    else:
        z = offs  # unused
    _dpm_update(x_ptr, m_ptr, hist_ptr, out_ptr, base + offs, mask, numel, slots, c, z, NOISE)


@triton.jit
def _dpm_step_cl_philox_kernel(
    x_ptr,  # sample x_t: [N, H, W, C] memory order (channels_last)
    m_ptr,  # model output, same layout
    hist_ptr,  # history ring [K, N, H, W, C], same layout
    out_ptr,  # x_{t-1}, same layout (may alias x_ptr)
    coeffs_ptr,  # float32 [n_steps, 10] coefficient table, row-major
    step_ptr,  # integer device scalar holding the step index (read only when step_from_ptr != 0)
    step_value,  # int32 step index added to the value read
    step_from_ptr,  # int32: 1 = read the step index from step_ptr
    n_steps,  # int32 rows of coeffs
    K,  # int32 history slots (solver_order, 1..3)
    seeds_ptr,  # int64 [N] per-image Philox seeds
    streams_ptr,  # integer [n_steps] Philox stream of each step
    numel,  # int64/int32 elements per history slot (N * C * HW)
    C,  # int32 channels
    HW,  # int32 pixels per image (H * W)
    QUADS: tl.constexpr,  # True when HW % 4 == 0
    BLOCK_P: tl.constexpr,  # pixel quads per program
    BLOCK_C: tl.constexpr,  # channels per program
    FULL_C: tl.constexpr,  # C % BLOCK_C == 0 (no channel mask)
    EXACT_C: tl.constexpr,  # C == BLOCK_C (a compile-time pixel stride)
):
    """DPM-Solver step with Philox noise on channels_last tensors: the [quads, channels] tile and noise of
    ``update_step_kernels._update_step_cl_philox_kernel`` (one Philox call per channel and pixel quad, element
    (c, p) taking n[(c * HW + p) % 4] of counter (c * HW + p) // 4), four lane sub-tiles updated by
    ``_dpm_update``. Bytes per element as the flat kernel (second order, float16: 10 bytes)."""
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    img = tl.program_id(2)
    c, safe, slots = _dpm_row(coeffs_ptr, step_ptr, step_value, step_from_ptr, n_steps, K)
    seed = tl.load(seeds_ptr + img)
    stream = tl.load(streams_ptr + safe).to(tl.uint32)
    if EXACT_C:
        pixel_stride = BLOCK_C
    else:
        pixel_stride = C
    counter, pix, mask, offs = _cl_quad_tile(pid_p, pid_c, C, HW, pixel_stride, QUADS, BLOCK_P, BLOCK_C, FULL_C)
    n0, n1, n2, n3 = _normal4(counter, stream, seed)
    offs = img.to(tl.int64) * C * HW + offs
    _dpm_update(x_ptr, m_ptr, hist_ptr, out_ptr, offs, _lane_mask(mask, pix, 0, HW, QUADS), numel, slots, c, n0, 2)
    _dpm_update(x_ptr, m_ptr, hist_ptr, out_ptr, offs + pixel_stride, _lane_mask(mask, pix, 1, HW, QUADS), numel,
                slots, c, n1, 2)
    _dpm_update(x_ptr, m_ptr, hist_ptr, out_ptr, offs + 2 * pixel_stride, _lane_mask(mask, pix, 2, HW, QUADS),
                numel, slots, c, n2, 2)
    _dpm_update(x_ptr, m_ptr, hist_ptr, out_ptr, offs + 3 * pixel_stride, _lane_mask(mask, pix, 3, HW, QUADS),
                numel, slots, c, n3, 2)


@triton.jit
def _dpm_step_cl_rgb_kernel(
    x_ptr,  # sample x_t: [N, H, W, 3] memory order (channels_last)
    m_ptr,  # model output, same layout
    hist_ptr,  # history ring [K, N, H, W, 3], same layout
    out_ptr,  # x_{t-1}, same layout (may alias x_ptr)
    coeffs_ptr,  # float32 [n_steps, 10] coefficient table, row-major
    step_ptr,  # integer device scalar holding the step index (read only when step_from_ptr != 0)
    step_value,  # int32 step index added to the value read
    step_from_ptr,  # int32: 1 = read the step index from step_ptr
    n_steps,  # int32 rows of coeffs
    K,  # int32 history slots (solver_order, 1..3)
    seeds_ptr,  # int64 [N] per-image Philox seeds
    streams_ptr,  # integer [n_steps] Philox stream of each step
    numel,  # int64/int32 elements per history slot (N * 3 * HW)
    HW,  # int32 pixels per image (H * W), a multiple of 4
    BLOCK_Q: tl.constexpr,  # pixel quads per program
):
    """DPM-Solver step with Philox noise on channels_last RGB (C = 3, HW % 4 == 0): the pixel quads of
    ``update_step_kernels._update_step_cl_rgb_kernel`` (one thread draws the three Philox calls c * HW / 4 + q of
    quad q and updates its 12 contiguous elements, offset 3k + c taking n_k of call c, as three 4-element
    vectors). Bytes per element as the flat kernel (second order, float16: 10 bytes)."""
    pid = tl.program_id(0)
    img = tl.program_id(1)
    c, safe, slots = _dpm_row(coeffs_ptr, step_ptr, step_value, step_from_ptr, n_steps, K)
    seed = tl.load(seeds_ptr + img)
    stream = tl.load(streams_ptr + safe).to(tl.uint32)
    quad = pid * BLOCK_Q + tl.arange(0, BLOCK_Q)
    counter = quad.to(tl.uint32)
    quads = (HW // 4).to(tl.uint32)
    c0_n0, c0_n1, c0_n2, c0_n3 = _normal4(counter, stream, seed)  # channel 0 of pixels 4q .. 4q + 3
    c1_n0, c1_n1, c1_n2, c1_n3 = _normal4(counter + quads, stream, seed)
    c2_n0, c2_n1, c2_n2, c2_n3 = _normal4(counter + 2 * quads, stream, seed)
    mask = tl.broadcast_to((quad < HW // 4)[:, None], [BLOCK_Q, 4])
    # 12 * (HW // 4) = 3 * HW: every group starts on a multiple of 4 elements, as the compiler can see
    offs = img.to(tl.int64) * (HW // 4) * 12 + quad[:, None] * 12 + tl.arange(0, 4)[None, :]
    # element 3k + c of the quad takes n_k of channel c
    _dpm_update(x_ptr, m_ptr, hist_ptr, out_ptr, offs, mask, numel, slots, c, _lanes4(c0_n0, c1_n0, c2_n0, c0_n1), 2)
    _dpm_update(x_ptr, m_ptr, hist_ptr, out_ptr, offs + 4, mask, numel, slots, c,
                _lanes4(c1_n1, c2_n1, c0_n2, c1_n2), 2)
    _dpm_update(x_ptr, m_ptr, hist_ptr, out_ptr, offs + 8, mask, numel, slots, c,
                _lanes4(c2_n2, c0_n3, c1_n3, c2_n3), 2)


DPM_CL_CELLS = 1024  # cl_philox: (quad, channel) cells per program, 4 elements each: 32 elements a thread
DPM_RGB_BLOCK = 256  # cl_rgb: pixel quads per program, 2 a thread (24 elements; 64 registers, 146 at 4 quads)


def plan_dpm_solver_step(layout: str, philox: bool, c: int, hw: int) -> StepPlan:
    """The one place that picks block sizes for the DPM-Solver step (launcher and compile check): kernel "flat"
    (``_dpm_step_kernel``), "cl_philox" (``_dpm_step_cl_philox_kernel``) or "cl_rgb" (``_dpm_step_cl_rgb_kernel``,
    block = pixel quads per program)."""
    if layout == CHANNELS_LAST and philox:
        if c == 3 and hw % 4 == 0:
            return StepPlan("cl_rgb", DPM_RGB_BLOCK, 0, 0, True, 4)
        return plan_cl_philox_tile(c, hw, DPM_CL_CELLS)
    return StepPlan("flat", 2048, 0, 0, False, 4)


def dpm_solver_step(sample, model_output, history, coeffs, step_index, *, noise=None, seeds=None, noise_streams=None,
                    out=None):
    """Fused DPM-Solver step; same contract as ``fastdiff.ops.dpm_reference.dpm_solver_step`` (no thresholding).

    Writes D into ``history[step % K]`` and returns x_{t-1} (in ``out`` if given; it may be ``sample``).
    """
    problem = dpm_solver_step_problem(sample, model_output, history, noise, None)
    if problem:
        raise ValueError(f"dpm_solver_step: {problem}")
    device = sample.device
    if history.dim() != sample.dim() + 1 or tuple(history.shape[1:]) != tuple(sample.shape) \
            or not 1 <= history.shape[0] <= 3:
        raise ValueError(f"dpm_solver_step: history must be [K, *sample.shape] with 1 <= K <= 3, got "
                         f"{tuple(history.shape)}")
    step_ptr, step_value, step_from_ptr, n_steps = table_step_args("dpm_solver_step", coeffs, N_DPM_COEFFS,
                                                                   step_index, device)
    mode, seeds, noise_streams = noise_mode_args("dpm_solver_step", sample, noise, seeds, noise_streams, n_steps)
    layout = layout_of(sample)
    out = output_like(sample, layout, out, "dpm_solver_step")
    if sample.numel() == 0:
        return out
    n, c = sample.shape[:2]
    numel_img = sample[0].numel()
    hw = numel_img // c
    plan = plan_dpm_solver_step(layout, mode == NOISE_PHILOX, c, hw)
    if plan.kernel == "cl_rgb":
        _dpm_step_cl_rgb_kernel[(cdiv(hw // 4, plan.block), n)](
            sample, model_output, history, out, coeffs, step_ptr, step_value, step_from_ptr, n_steps,
            history.shape[0], seeds, noise_streams, sample.numel(), hw, BLOCK_Q=plan.block, num_warps=plan.num_warps,
            num_stages=1, enable_fp_fusion=FP_FUSION)
        return out
    if plan.kernel == "cl_philox":
        _dpm_step_cl_philox_kernel[cl_philox_grid(plan, c, hw, n)](
            sample, model_output, history, out, coeffs, step_ptr, step_value, step_from_ptr, n_steps,
            history.shape[0], seeds, noise_streams, sample.numel(), c, hw, QUADS=plan.quads, BLOCK_P=plan.block_p,
            BLOCK_C=plan.block_c, FULL_C=plan.full_c, EXACT_C=plan.exact_c, num_warps=plan.num_warps, num_stages=1,
            enable_fp_fusion=FP_FUSION)
        return out
    grid = (cdiv(numel_img, plan.block), n)
    _dpm_step_kernel[grid](
        sample, model_output, noise if mode == NOISE_TENSOR else sample, history, out, coeffs, step_ptr, step_value,
        step_from_ptr, n_steps, history.shape[0], seeds if mode == NOISE_PHILOX else coeffs,
        noise_streams if mode == NOISE_PHILOX else coeffs, numel_img, sample.numel(), NOISE=mode, BLOCK=plan.block,
        num_warps=plan.num_warps, num_stages=1, enable_fp_fusion=FP_FUSION)
    return out
