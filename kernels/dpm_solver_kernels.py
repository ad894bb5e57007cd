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
(the SDE variants) adds nothing. Noise follows ``fastdiff/ops/noise.py`` exactly (the Philox and Box-Muller helpers
of ``update_step_kernels``): NCHW tiles draw one Philox call per four logical neighbours; channels_last draws per
element (four times the Philox work) from the logical NCHW index of each element.

Launched with ``enable_fp_fusion=False``, as the DDPM/DDIM step: the reference rounds every product and sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import CHANNELS_LAST, cdiv, dpm_solver_step_problem, layout_of
from .update_step_kernels import (NOISE_PHILOX, NOISE_TENSOR, _normal4, noise_mode_args, output_like,
                                  table_step_args)

N_DPM_COEFFS = 10
FP_FUSION = False


@triton.jit
def _dpm_step_kernel(
    x_ptr,  # sample x_t: [N, numel_img] in memory order (NCHW-contiguous or channels_last)
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
    C,  # int32 channels (CL: memory offset o = p * C + c, logical index e = c * HW + p)
    HW,  # int32 pixels per image
    NOISE: tl.constexpr,  # 0 none, 1 tensor z_ptr, 2 Philox from (seed, stream, logical index)
    CL: tl.constexpr,  # channels_last memory order (affects only the Philox counter)
    BLOCK: tl.constexpr,  # elements per program, a multiple of 4
):
    """One DPM-Solver step over a block of one image: a [BLOCK // 4, 4] tile in memory order."""
    pid = tl.program_id(0)
    img = tl.program_id(1)
    # --- the step's row, read on the device; an index outside the table gives a NaN row, never a stray read
    step = tl.load(step_ptr, mask=step_from_ptr != 0, other=0).to(tl.int32) + step_value
    step = tl.where(step < 0, step + n_steps, step)
    ok = (step >= 0) & (step < n_steps)
    row = coeffs_ptr + step * 10
    nan = float("nan")
    x0_x = tl.load(row + 0, mask=ok, other=nan)
    x0_m = tl.load(row + 1, mask=ok, other=nan)
    d_x = tl.load(row + 2, mask=ok, other=nan)
    d_m = tl.load(row + 3, mask=ok, other=nan)
    d_x0 = tl.load(row + 4, mask=ok, other=nan)
    p_x = tl.load(row + 5, mask=ok, other=nan)
    p_d0 = tl.load(row + 6, mask=ok, other=nan)
    p_d1 = tl.load(row + 7, mask=ok, other=nan)
    p_d2 = tl.load(row + 8, mask=ok, other=nan)
    noise_std = tl.load(row + 9, mask=ok, other=nan)
    safe = tl.where(ok, step, 0)
    slot0 = (safe % K).to(tl.int64)
    slot1 = ((safe + K - 1) % K).to(tl.int64)
    slot2 = ((safe + 2 * K - 2) % K).to(tl.int64)
    # --- the tile
    quad = pid * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
    offs = quad[:, None] * 4 + tl.arange(0, 4)[None, :]
    mask = offs < numel_img
    base = img.to(tl.int64) * numel_img
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    # history slots are loaded only when their coefficient is nonzero (a block-uniform predicate)
    mask1 = mask & ((offs * 0 + (p_d1 != 0.0).to(tl.int32)) != 0)
    mask2 = mask & ((offs * 0 + (p_d2 != 0.0).to(tl.int32)) != 0)
    h1 = tl.load(hist_ptr + slot1 * numel + base + offs, mask=mask1, other=0.0).to(tl.float32)
    h2 = tl.load(hist_ptr + slot2 * numel + base + offs, mask=mask2, other=0.0).to(tl.float32)
    x0 = x0_x * x + x0_m * m
    d = d_x * x + d_m * m + d_x0 * x0
    prev = p_x * x + p_d0 * d
    prev = prev + p_d1 * h1
    prev = prev + p_d2 * h2
    if NOISE == 1:
        z = tl.load(z_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        prev = prev + noise_std * z
    elif NOISE == 2:
        seed = tl.load(seeds_ptr + img)
        stream = tl.load(streams_ptr + safe).to(tl.uint32)
        if CL:
            e = (offs % C) * HW + offs // C  # logical NCHW index of each element
            n0, n1, n2, n3 = _normal4((e >> 2).to(tl.uint32), stream, seed)
            lane = e & 3
            z = tl.where(lane == 0, n0, tl.where(lane == 1, n1, tl.where(lane == 2, n2, n3)))
        else:
            n0, n1, n2, n3 = _normal4(quad.to(tl.uint32), stream, seed)
            z = tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), [BLOCK // 4, 4])
        prev = prev + noise_std * z
    tl.store(hist_ptr + slot0 * numel + base + offs, d.to(hist_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + base + offs, prev.to(out_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class DPMStepPlan:
    """Block size and warps of one DPM-Solver step launch."""

    block: int  # elements per program
    num_warps: int


def plan_dpm_solver_step(layout: str, philox: bool) -> DPMStepPlan:
    """The one place that picks block sizes for the DPM-Solver step (launcher and compile check)."""
    if layout == CHANNELS_LAST and philox:
        return DPMStepPlan(512, 4)  # per-element Philox: four times the noise work, a quarter of the block
    return DPMStepPlan(2048, 4)


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
    plan = plan_dpm_solver_step(layout, mode == NOISE_PHILOX)
    grid = (cdiv(numel_img, plan.block), n)
    _dpm_step_kernel[grid](
        sample, model_output, noise if mode == NOISE_TENSOR else sample, history, out, coeffs, step_ptr, step_value,
        step_from_ptr, n_steps, history.shape[0], seeds if mode == NOISE_PHILOX else coeffs,
        noise_streams if mode == NOISE_PHILOX else coeffs, numel_img, sample.numel(), c, numel_img // c,
        NOISE=mode, CL=layout == CHANNELS_LAST, BLOCK=plan.block, num_warps=plan.num_warps, num_stages=1,
        enable_fp_fusion=FP_FUSION)
    return out
