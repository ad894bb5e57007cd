"""Fused DDPM/DDIM update step x_t -> x_{t-1} with in-kernel Philox noise, and the noise on its own.

Math (``fastdiff.ops.reference.STEP_COEFFS``), with x = x_t, m = the model output, z = standard normal noise
and ``c`` the coefficient row of this step:

    x0   = clip((c.x0_from_x * x + c.x0_from_m * m) * c.x0_scale)
    eps  = (c.eps_from_x * x + c.eps_from_m * m + c.eps_from_x0 * x0) * c.eps_scale
    prev = c.prev_from_x0 * x0 + c.prev_from_eps * eps + c.prev_from_x * x + c.noise_std * z

in float32, left to right, every product and sum rounded once, exactly as the reference (subtract first, then
scale: see STEP_COEFFS); with Philox noise each ``a * b + c`` of that order is one fma (below). The coefficient
row and the Philox stream are read on the device from ``coeffs_ptr + step * N_STEP_COEFFS`` and
``streams_ptr + step``, where ``step`` is either a launch argument or read from an integer device tensor,
so a step is capturable in a CUDA graph and never recompiles (coefficients are runtime data).

Noise follows ``fastdiff/ops/noise.py``: Philox-4x32-10 keyed by the image's seed, counter
``(e // 4, stream, 0, 0)`` with ``e`` the logical NCHW index inside the image, uniforms
``((r >> 8) + 0.5) * 2**-24`` and Box-Muller, element ``e`` taking ``n[e % 4]``. One Philox call serves four
logical neighbours. The Philox words are bit-exact; ``ln``, ``sqrt``, ``sin`` and ``cos`` run on the
special-function unit (``lg2``/``sqrt``/``sin``/``cos.approx.ftz.f32``: about 8 instructions an element instead of
about 35 for correctly rounded or polynomial versions, which made every Philox step issue-bound on an H200), so
the noise matches the reference to a tolerance, not to the bit: CUDA's __log2f/__sinf/__cosf, which compile to
the same instructions, document absolute errors of about 2**-22 (log2 on [0.5, 2]) and 2**-21 (sin and cos on
[-pi, pi], the range the angle is formed in). Within 2**-11 of u = 1, where log2's absolute error would be most
of a small radius, -2 ln u is a series in 1 - u. See tests/kernel_device.py for the resulting bound. Under the
interpreter the same helpers use numpy's functions.

The launchers run with ``enable_fp_fusion=False``: without Philox noise the update rounds every product and sum
separately, exactly as the reference (DDIM's x0/eps algebra cancels, so contraction would only add disagreement
there). With Philox noise, already held to a tolerance, ``_update`` folds eps into prev and writes each
``a * b + c`` as an explicit ``tl.fma`` (9 instructions an element instead of 19; see ``_update``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import (CHANNELS_LAST, FLOAT_DTYPES, INT32_MAX, NCHW, cdiv, check_out, layout_of, memory_format,
                      next_pow2, update_step_problem)

N_STEP_COEFFS = 11  # = len(fastdiff.ops.reference.STEP_COEFFS)
_N_COEFFS: tl.constexpr = tl.constexpr(N_STEP_COEFFS)
FP_FUSION = False

# Philox-4x32 constants (Salmon et al., 2011), identical to fastdiff/ops/noise.py.
_ROUND_A: tl.constexpr = tl.constexpr(0xD2511F53)
_ROUND_B: tl.constexpr = tl.constexpr(0xCD9E8D57)
_KEY_A: tl.constexpr = tl.constexpr(0x9E3779B9)
_KEY_B: tl.constexpr = tl.constexpr(0xBB67AE85)
_ROUNDS: tl.constexpr = tl.constexpr(10)
_MINUS_2_LN2: tl.constexpr = tl.constexpr(-2.0 * math.log(2.0))
_SERIES_BELOW: tl.constexpr = tl.constexpr(2.0**-11)  # 1 - u below which -2 ln u is a series in 1 - u
_ANGLE_STEP: tl.constexpr = tl.constexpr(2.0 * math.pi * 2.0**-24)  # 2 pi u_b - pi = k * step + start, k = r >> 8
_ANGLE_START: tl.constexpr = tl.constexpr(2.0 * math.pi * 2.0**-25 - math.pi)

NOISE_NONE = 0
NOISE_TENSOR = 1
NOISE_PHILOX = 2


# ----------------------------------------------------------------------------------------------------------------
# Device helpers: Philox, log2, sin/cos, Box-Muller, the update formula.
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox-4x32-10 on uint32 counters ``c0..c3`` (same shape) with uint32 scalar keys ``k0, k1``.

    Each 32x32-bit product is formed once in 64 bits (one wide multiply gives both halves).
    """
    for _ in tl.static_range(_ROUNDS):
        prod_b = c2.to(tl.uint64) * _ROUND_B
        prod_a = c0.to(tl.uint64) * _ROUND_A
        c0, c1, c2, c3 = ((prod_b >> 32).to(tl.uint32) ^ c1 ^ k0, prod_b.to(tl.uint32),
                          (prod_a >> 32).to(tl.uint32) ^ c3 ^ k1, prod_a.to(tl.uint32))
        k0 = k0 + _KEY_A
        k1 = k1 + _KEY_B
    return c0, c1, c2, c3


# Under TRITON_INTERPRET the decorator returns an interpreter function, not a JITFunction.
_INTERPRETED: tl.constexpr = tl.constexpr(not isinstance(_philox4x32, triton.runtime.JITFunction))


@triton.jit
def _log2_approx(x):
    """log2 of a positive normal float32: the special-function unit (lg2.approx.ftz.f32; absolute error about
    2**-22 for x in [0.5, 2], 2 ulp elsewhere), or numpy's log2 under the interpreter."""
    if _INTERPRETED:
        y = tl.math.log2(x)
    else:
        y = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                      pack=1)
    return y


@triton.jit
def _cos_sin_approx(a):
    """(cos a, sin a) for a in [-pi, pi]: the special-function unit (cos/sin.approx.ftz.f32, absolute error
    about 2**-21 there), or numpy under the interpreter."""
    if _INTERPRETED:
        c = tl.cos(a)
        s = tl.sin(a)
    else:
        c, s = tl.inline_asm_elementwise("cos.approx.ftz.f32 $0, $2;\n\tsin.approx.ftz.f32 $1, $2;", "=r,=r,r", [a],
                                         dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
    return c, s


@triton.jit
def _box_muller_polar(r_rad, r_ang):
    """Box-Muller on two uint32 words as (radius, cos, sin): the normals sqrt(-2 ln u_a) * (cos 2 pi u_b,
    sin 2 pi u_b) are radius * cos and radius * sin.

    Uniforms u = ((r >> 8) + 0.5) * 2**-24 lie in (0, 1]; computed as one fma (k * 2**-24 + 2**-25), which
    rounds exactly like the reference's float32 (k + 0.5) followed by the exact scaling.
    """
    u_rad = tl.fma((r_rad >> 8).to(tl.float32), 5.9604644775390625e-08, 2.9802322387695312e-08)
    # (cos, sin)(2 pi u_b) = -(cos, sin)(2 pi u_b - pi), an angle in (-pi, pi) formed by one fma; the sign goes
    # to the radius
    angle = tl.fma((r_ang >> 8).to(tl.float32), _ANGLE_STEP, _ANGLE_START)
    # -2 ln u. Near u = 1 the special-function log2's absolute error (about 2**-22) would be most of a tiny
    # radius (up to 6e-4 of error on values below 0.01), so there, with t = 1 - u (exact), -2 ln(1 - t) =
    # 2t + t^2 + (2/3) t^3 + ... is taken to its second term (relative error t^2 / 3 < 1e-7 below 2**-11)
    t = 1.0 - u_rad
    radius_sq = tl.where(t < _SERIES_BELOW, tl.fma(t, t, t + t), _log2_approx(u_rad) * _MINUS_2_LN2)
    neg_rad = -tl.sqrt(radius_sq)
    cos, sin = _cos_sin_approx(angle)
    return neg_rad, cos, sin


@triton.jit
def _philox_words(counter, stream, seed):
    """Philox(counter, stream, 0, 0; key = seed) for a uint32 ``counter`` of any shape, ``stream`` a uint32
    scalar, ``seed`` an int64 scalar (key = its low and high 32-bit words)."""
    k0 = seed.to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    zero = counter * 0  # not tl.zeros_like: a jit library function the interpreter cannot call if Triton was
    # imported before TRITON_INTERPRET was set
    return _philox4x32(counter, zero + stream, zero, zero, k0, k1)


@triton.jit
def _scaled_normal4(counter, stream, seed, scale):
    """``scale`` times the four normals of ``_normal4`` as (radius, factor) pairs: scale * n_k = rad_k * f_k with
    rad_0 = rad_1 (f_0 = cos, f_1 = sin) and rad_2 = rad_3, so an update adds each with one fma and the scale
    costs one multiply per pair."""
    r0, r1, r2, r3 = _philox_words(counter, stream, seed)
    rad01, cos01, sin01 = _box_muller_polar(r0, r1)
    rad23, cos23, sin23 = _box_muller_polar(r2, r3)
    return rad01 * scale, cos01, sin01, rad23 * scale, cos23, sin23


@triton.jit
def _normal4(counter, stream, seed):
    """Four standard normals per uint32 ``counter`` (any shape), from ``_philox_words``."""
    rad01, cos01, sin01, rad23, cos23, sin23 = _scaled_normal4(counter, stream, seed, 1.0)
    return rad01 * cos01, rad01 * sin01, rad23 * cos23, rad23 * sin23


@triton.jit
def _load_step(coeffs_ptr, step_ptr, step_value, step_from_ptr, n_steps, streams_ptr, NOISE: tl.constexpr):
    """The step's coefficient row (11 float32, STEP_COEFFS order) and Philox stream (uint32), read on the device.

    Negative indices wrap as in Python; an index outside the table gives a NaN row (never a stray read).
    """
    step = tl.load(step_ptr, mask=step_from_ptr != 0, other=0).to(tl.int32) + step_value
    step = tl.where(step < 0, step + n_steps, step)
    ok = (step >= 0) & (step < n_steps)
    row = coeffs_ptr + step * _N_COEFFS
    nan = float("nan")
    x0_x = tl.load(row + 0, mask=ok, other=nan)
    x0_m = tl.load(row + 1, mask=ok, other=nan)
    x0_scale = tl.load(row + 2, mask=ok, other=nan)
    eps_x = tl.load(row + 3, mask=ok, other=nan)
    eps_m = tl.load(row + 4, mask=ok, other=nan)
    eps_x0 = tl.load(row + 5, mask=ok, other=nan)
    eps_scale = tl.load(row + 6, mask=ok, other=nan)
    prev_x0 = tl.load(row + 7, mask=ok, other=nan)
    prev_eps = tl.load(row + 8, mask=ok, other=nan)
    prev_x = tl.load(row + 9, mask=ok, other=nan)
    noise_std = tl.load(row + 10, mask=ok, other=nan)
    if NOISE == 2:
        stream = tl.load(streams_ptr + step, mask=ok, other=0).to(tl.uint32)
    else:
        stream = tl.zeros([], tl.uint32)
    return (x0_x, x0_m, x0_scale, eps_x, eps_m, eps_x0, eps_scale, prev_x0, prev_eps, prev_x, noise_std), stream


@triton.jit
def _update(x, m, z, z_rad, c, clip_lo, clip_hi, NOISE: tl.constexpr):
    """x_{t-1} from float32 x, m (and the noise when NOISE != 0) and the row ``c`` of ``_load_step``. The noise:
    NOISE == 1, ``z`` (scaled by the row's noise_std here); NOISE == 2, ``z_rad * z`` with the scale already in
    ``z_rad`` (``_scaled_normal4``).

    Without Philox noise: the reference's operation order (subtract, then scale), every product and sum rounded
    once, so the result is the reference's to the bit. With Philox noise (whose special-function Box-Muller already
    holds the kernel to a tolerance, not to the reference's bits) eps is folded into prev: prev = c7 x0 +
    c8 (c3 x + c4 m + c5 x0) c6 + c9 x = a x0 + b m + d x with a = c7 + c8 c6 c5, b = c8 c6 c4, d = c9 + c8 c6 c3
    (scalars, once a program), each ``a * b + c`` one fma: 9 instructions an element (13 with fmas in the
    reference's order, 19 without), and no branch on the row. x0 keeps the reference's order (subtract, then
    scale): clipping reads it, and at the noisiest steps its scale is large."""
    if NOISE == 2:
        x0 = tl.fma(c[0], x, c[1] * m) * c[2]
    else:
        x0 = (c[0] * x + c[1] * m) * c[2]
    x0 = tl.minimum(tl.maximum(x0, clip_lo, propagate_nan=tl.PropagateNan.ALL), clip_hi,
                    propagate_nan=tl.PropagateNan.ALL)
    if NOISE == 2:
        eps_weight = c[8] * c[6]
        from_x0 = tl.fma(eps_weight, c[5], c[7])
        from_m = eps_weight * c[4]
        from_x = tl.fma(eps_weight, c[3], c[9])
        prev = tl.fma(from_x0, x0, tl.fma(from_m, m, from_x * x))
        prev = tl.fma(z_rad, z, prev)
    else:
        eps = (c[3] * x + c[4] * m + c[5] * x0) * c[6]
        prev = c[7] * x0 + c[8] * eps + c[9] * x
        if NOISE == 1:
            prev = prev + c[10] * z
    return prev


@triton.jit
def _lanes4(a, b, c, d):
    """The [R, 4] tile whose row i is (a[i], b[i], c[i], d[i]), for [R] tensors, in registers:
    join(join(a, c), join(b, d))[i, j, k] is element 2j + k of that row."""
    return tl.reshape(tl.join(tl.join(a, c), tl.join(b, d)), [a.shape[0], 4])


@triton.jit
def _update_tile(x_ptr, m_ptr, out_ptr, offs, mask, z, z_rad, c, clip_lo, clip_hi):
    """Load x and m at ``offs``, apply ``_update`` with noise z_rad * z, store x_{t-1}: one tile of the quad path."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = _update(x, m, z, z_rad, c, clip_lo, clip_hi, 2)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lane_mask(mask, pix, k: tl.constexpr, HW, QUADS: tl.constexpr):
    """``mask`` for lane k of channels_last quads (pixel pix + k): with QUADS every pixel of a real quad is real,
    else the pixel must lie in [0, HW)."""
    if not QUADS:
        mask = mask & (pix + k >= 0) & (pix + k < HW)
    return mask


@triton.jit
def _update_lane(x_ptr, m_ptr, out_ptr, offs, pix, k: tl.constexpr, C, HW, mask, z, z_rad, c, clip_lo, clip_hi,
                 QUADS: tl.constexpr):
    """Lane k of the channels_last quads: pixel pix + k (offsets offs + k * C) with noise z_rad * z."""
    _update_tile(x_ptr, m_ptr, out_ptr, offs + k * C, _lane_mask(mask, pix, k, HW, QUADS), z, z_rad, c, clip_lo,
                 clip_hi)


@triton.jit
def _cl_quad_tile(pid_p, pid_c, C, HW, pixel_stride, QUADS: tl.constexpr, BLOCK_P: tl.constexpr,
                  BLOCK_C: tl.constexpr, FULL_C: tl.constexpr):
    """The [BLOCK_P quads, BLOCK_C channels] tile of a channels_last Philox program (see
    ``_update_step_cl_philox_kernel``): (Philox counter, lane-0 pixel, mask without the pixel range of
    ``_lane_mask``, lane-0 offset inside the image at ``pixel_stride`` elements a pixel)."""
    ch = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    quad = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    if FULL_C:  # constant along channels, so loads and stores stay whole vectors
        cmask = tl.full([BLOCK_C], 1, tl.int1)
    else:
        cmask = ch < C
    if QUADS:
        counter = (ch[None, :] * (HW // 4) + quad[:, None]).to(tl.uint32)
        pix = quad[:, None] * 4 + tl.zeros([1, BLOCK_C], tl.int32)
        mask = (quad[:, None] < HW // 4) & cmask[None, :]
    else:
        first = ch * HW  # logical index of each channel's pixel 0
        counter = ((first >> 2)[None, :] + quad[:, None]).to(tl.uint32)
        pix = quad[:, None] * 4 - (first & 3)[None, :]
        mask = tl.broadcast_to(cmask[None, :], [BLOCK_P, BLOCK_C])
    return counter, pix, mask, pix * pixel_stride + ch[None, :]


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _update_step_kernel(
    x_ptr,  # sample x_t: [N, numel_img] in memory order (NCHW-contiguous, or any layout unless NOISE == 2)
    m_ptr,  # model output, same shape and layout as x
    z_ptr,  # noise, same shape and layout as x (read only when NOISE == 1)
    out_ptr,  # x_{t-1}, same shape and layout as x (may alias x_ptr)
    coeffs_ptr,  # float32 [n_steps, N_STEP_COEFFS] coefficient table, row-major
    step_ptr,  # integer device scalar holding the step index (read only when step_from_ptr != 0)
    step_value,  # int32 step index added to the value read (the Python step index, or 0)
    step_from_ptr,  # int32: 1 = read the step index from step_ptr, 0 = use step_value alone
    n_steps,  # int32 rows of coeffs
    seeds_ptr,  # int64 [N] per-image Philox seeds (NOISE == 2)
    streams_ptr,  # integer [n_steps] Philox stream of each step (NOISE == 2)
    clip_lo,  # float32 lower bound of x0 (-inf: no clipping)
    clip_hi,  # float32 upper bound of x0 (+inf: no clipping)
    numel_img,  # int32 elements per image (C * H * W)
    NOISE: tl.constexpr,  # 0 none, 1 tensor z_ptr, 2 Philox from (seed, stream, logical index)
    BLOCK: tl.constexpr,  # elements per program, a multiple of 4
):
    """One update step over a block of one image, memory order = logical NCHW order.

    Without Philox the block is flat (each thread moves 16-byte vectors). With Philox it is a [BLOCK // 4, 4] tile:
    row r holds elements 4r..4r+3, which one Philox call serves (half precision then moves 8-byte vectors: a
    [BLOCK // 8, 8] tile would need a shared-memory layout conversion of the noise, for no fewer instructions).
    Bytes per element: reads 2 * s (x, m) [+ s for a noise tensor], writes s, s = element size
    (float16: 6 bytes, or 8 with a noise tensor). Philox noise costs no memory traffic.
    """
    pid = tl.program_id(0)
    img = tl.program_id(1)
    c, stream = _load_step(coeffs_ptr, step_ptr, step_value, step_from_ptr, n_steps, streams_ptr, NOISE)
    if NOISE == 2:
        quad = pid * (BLOCK // 4) + tl.arange(0, BLOCK // 4)  # index of 4-element group inside the image
        offs = quad[:, None] * 4 + tl.arange(0, 4)[None, :]  # [BLOCK // 4, 4] logical (= memory) index
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel_img
    base = img.to(tl.int64) * numel_img
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    if NOISE == 1:
        z = tl.load(z_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        z_rad = z  # unused: NOISE == 1 scales z by the row's noise_std
    elif NOISE == 2:
        seed = tl.load(seeds_ptr + img)
        rad01, cos01, sin01, rad23, cos23, sin23 = _scaled_normal4(quad.to(tl.uint32), stream, seed, c[10])
        # lanes 0..3 take (rad01 cos01, rad01 sin01, rad23 cos23, rad23 sin23)
        z_rad = _lanes4(rad01, rad01, rad23, rad23)
        z = _lanes4(cos01, sin01, cos23, sin23)
    else:
        z = x  # unused
        z_rad = x
    y = _update(x, m, z, z_rad, c, clip_lo, clip_hi, NOISE)
    tl.store(out_ptr + base + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _update_step_cl_philox_kernel(
    x_ptr,  # sample x_t: [N, H, W, C] memory order (channels_last)
    m_ptr,  # model output, same layout
    out_ptr,  # x_{t-1}, same layout (may alias x_ptr)
    coeffs_ptr,  # float32 [n_steps, N_STEP_COEFFS] coefficient table, row-major
    step_ptr,  # integer device scalar holding the step index (read only when step_from_ptr != 0)
    step_value,  # int32 step index added to the value read
    step_from_ptr,  # int32: 1 = read the step index from step_ptr
    n_steps,  # int32 rows of coeffs
    seeds_ptr,  # int64 [N] per-image Philox seeds
    streams_ptr,  # integer [n_steps] Philox stream of each step
    clip_lo,  # float32 lower bound of x0 (-inf: no clipping)
    clip_hi,  # float32 upper bound of x0 (+inf: no clipping)
    C,  # int32 channels
    HW,  # int32 pixels per image (H * W)
    QUADS: tl.constexpr,  # True when HW % 4 == 0: one Philox call per (channel, 4 pixels)
    BLOCK_P: tl.constexpr,  # pixels per program (QUADS: pixel quads per program)
    BLOCK_C: tl.constexpr,  # channels per program
    FULL_C: tl.constexpr,  # C % BLOCK_C == 0: every channel of every tile is real (no channel mask)
    EXACT_C: tl.constexpr,  # C == BLOCK_C: the pixel stride is a compile-time constant (aligned lane vectors)
):
    """Update step with Philox noise on channels_last tensors; noise indexed by the logical NCHW index.

    Element (c, p) of an image has logical index e = c * HW + p and takes n[e % 4] of Philox counter e // 4.
    Channel c's pixels group into quads aligned to its logical index: with s_c = (c * HW) % 4, quad q of channel c
    holds pixels 4q - s_c .. 4q - s_c + 3 (those inside [0, HW)), whose counter is (c * HW) // 4 + q and whose
    lane k takes n_k. The program draws noise for a [quads, channels] tile once and updates four
    [quads, channels] sub-tiles (lane k), each along contiguous channels: one Philox call per four elements for
    every HW. QUADS (HW % 4 == 0) makes every s_c zero at compile time, so the sub-tiles load whole vectors.
    Bytes per element: reads 2 * s (x, m), writes s (float16: 6 bytes).
    """
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    img = tl.program_id(2)
    c, stream = _load_step(
        coeffs_ptr, step_ptr, step_value, step_from_ptr, n_steps, streams_ptr, 2)
    seed = tl.load(seeds_ptr + img)
    if EXACT_C:  # every lane's sub-tile then starts on a whole vector, so no lane needs a layout of its own
        pixel_stride = BLOCK_C
    else:
        pixel_stride = C
    counter, pix, mask, offs = _cl_quad_tile(pid_p, pid_c, C, HW, pixel_stride, QUADS, BLOCK_P, BLOCK_C, FULL_C)
    rad01, cos01, sin01, rad23, cos23, sin23 = _scaled_normal4(counter, stream, seed, c[10])
    offs = img.to(tl.int64) * C * HW + offs
    _update_lane(x_ptr, m_ptr, out_ptr, offs, pix, 0, pixel_stride, HW, mask, cos01, rad01, c, clip_lo,
                 clip_hi, QUADS)
    _update_lane(x_ptr, m_ptr, out_ptr, offs, pix, 1, pixel_stride, HW, mask, sin01, rad01, c, clip_lo,
                 clip_hi, QUADS)
    _update_lane(x_ptr, m_ptr, out_ptr, offs, pix, 2, pixel_stride, HW, mask, cos23, rad23, c, clip_lo,
                 clip_hi, QUADS)
    _update_lane(x_ptr, m_ptr, out_ptr, offs, pix, 3, pixel_stride, HW, mask, sin23, rad23, c, clip_lo,
                 clip_hi, QUADS)


@triton.jit
def _update_step_cl_pairs_kernel(
    x_ptr,  # sample x_t: [N, H, W, C] memory order (channels_last)
    m_ptr,  # model output, same layout
    out_ptr,  # x_{t-1}, same layout (may alias x_ptr)
    coeffs_ptr,  # float32 [n_steps, N_STEP_COEFFS] coefficient table, row-major
    step_ptr,  # integer device scalar holding the step index (read only when step_from_ptr != 0)
    step_value,  # int32 step index added to the value read
    step_from_ptr,  # int32: 1 = read the step index from step_ptr
    n_steps,  # int32 rows of coeffs
    seeds_ptr,  # int64 [N] per-image Philox seeds
    streams_ptr,  # integer [n_steps] Philox stream of each step
    clip_lo,  # float32 lower bound of x0 (-inf: no clipping)
    clip_hi,  # float32 upper bound of x0 (+inf: no clipping)
    HW,  # int32 pixels per image (H * W)
    n_quads,  # int32 pixel quads per channel (cl_philox_quads)
    C: tl.constexpr,  # channels (a small count that is not a power of two, e.g. 3)
    QUADS: tl.constexpr,  # True when HW % 4 == 0
    BLOCK: tl.constexpr,  # (pixel quad, channel) pairs per program
    EVEN: tl.constexpr,  # QUADS and the programs cover the pairs exactly: no mask at all
):
    """Update step with Philox noise on channels_last tensors with few channels; the noise and the quads of
    ``_update_step_cl_philox_kernel`` (element (c, p) takes n[(c * HW + p) % 4] of counter (c * HW + p) // 4), but
    the program walks (quad, channel) pairs t = q * C + c in memory order instead of a [quads, channels] tile: a
    channel tile padded to a power of two would leave lanes masked (a quarter of them for C = 3), here every lane
    is a real Philox call whose four values are the four pixels of its quad in that channel. Bytes per element:
    reads 2 * s (x, m), writes s (float16: 6 bytes).
    """
    pid = tl.program_id(0)
    img = tl.program_id(1)
    c, stream = _load_step(coeffs_ptr, step_ptr, step_value, step_from_ptr, n_steps, streams_ptr, 2)
    seed = tl.load(seeds_ptr + img)
    pair = pid * BLOCK + tl.arange(0, BLOCK)
    quad = pair // C
    ch = pair - quad * C
    if QUADS:
        counter = (ch * (HW // 4) + quad).to(tl.uint32)
        pix = quad * 4  # lane-0 pixel of each quad
    else:
        first = ch * HW  # logical index of each channel's pixel 0
        counter = ((first >> 2) + quad).to(tl.uint32)
        pix = quad * 4 - (first & 3)
    rad01, cos01, sin01, rad23, cos23, sin23 = _scaled_normal4(counter, stream, seed, c[10])
    if EVEN:  # a constant mask: loads and stores without predicates or fill values
        mask = tl.full([BLOCK], 1, tl.int1)
    else:  # with QUADS every pixel of a real quad is real; else _update_lane adds 0 <= pixel < HW
        mask = quad < n_quads
    offs = img.to(tl.int64) * C * HW + pix * C + ch
    _update_lane(x_ptr, m_ptr, out_ptr, offs, pix, 0, C, HW, mask, cos01, rad01, c, clip_lo, clip_hi, QUADS)
    _update_lane(x_ptr, m_ptr, out_ptr, offs, pix, 1, C, HW, mask, sin01, rad01, c, clip_lo, clip_hi, QUADS)
    _update_lane(x_ptr, m_ptr, out_ptr, offs, pix, 2, C, HW, mask, cos23, rad23, c, clip_lo, clip_hi, QUADS)
    _update_lane(x_ptr, m_ptr, out_ptr, offs, pix, 3, C, HW, mask, sin23, rad23, c, clip_lo, clip_hi, QUADS)


@triton.jit
def _update_step_cl_rgb_kernel(
    x_ptr,  # sample x_t: [N, H, W, 3] memory order (channels_last)
    m_ptr,  # model output, same layout
    out_ptr,  # x_{t-1}, same layout (may alias x_ptr)
    coeffs_ptr,  # float32 [n_steps, N_STEP_COEFFS] coefficient table, row-major
    step_ptr,  # integer device scalar holding the step index (read only when step_from_ptr != 0)
    step_value,  # int32 step index added to the value read
    step_from_ptr,  # int32: 1 = read the step index from step_ptr
    n_steps,  # int32 rows of coeffs
    seeds_ptr,  # int64 [N] per-image Philox seeds
    streams_ptr,  # integer [n_steps] Philox stream of each step
    clip_lo,  # float32 lower bound of x0 (-inf: no clipping)
    clip_hi,  # float32 upper bound of x0 (+inf: no clipping)
    HW,  # int32 pixels per image (H * W), a multiple of 4
    BLOCK_Q: tl.constexpr,  # pixel quads per program
    EVEN: tl.constexpr,  # the programs cover the HW / 4 quads exactly: no mask at all
):
    """Update step with Philox noise on channels_last tensors with three channels (RGB) and HW % 4 == 0; the noise
    of ``_update_step_cl_philox_kernel`` (element (c, p) takes n[p % 4] of counter c * HW / 4 + p // 4).

    Pixel quad q (pixels 4q .. 4q + 3) is 12 contiguous elements, offset 3k + c for pixel 4q + k and channel c,
    whose noise is n_k of the three Philox calls c * HW / 4 + q. One thread draws the three and updates the quad as
    three groups of four contiguous elements (vector accesses), so no lane is padded, masked or exchanged.
    Bytes per element: reads 2 * s (x, m), writes s (float16: 6 bytes).
    """
    pid = tl.program_id(0)
    img = tl.program_id(1)
    c, stream = _load_step(coeffs_ptr, step_ptr, step_value, step_from_ptr, n_steps, streams_ptr, 2)
    seed = tl.load(seeds_ptr + img)
    quad = pid * BLOCK_Q + tl.arange(0, BLOCK_Q)
    counter = quad.to(tl.uint32)
    quads = (HW // 4).to(tl.uint32)
    # channel c of the quad: n_0..n_3 = (r01 cos01, r01 sin01, r23 cos23, r23 sin23), noise_std in the radii
    r01_0, cos01_0, sin01_0, r23_0, cos23_0, sin23_0 = _scaled_normal4(counter, stream, seed, c[10])
    r01_1, cos01_1, sin01_1, r23_1, cos23_1, sin23_1 = _scaled_normal4(counter + quads, stream, seed, c[10])
    r01_2, cos01_2, sin01_2, r23_2, cos23_2, sin23_2 = _scaled_normal4(counter + 2 * quads, stream, seed, c[10])
    if EVEN:  # a constant mask: loads and stores without predicates or fill values
        mask = tl.full([BLOCK_Q, 4], 1, tl.int1)
    else:
        mask = tl.broadcast_to((quad < HW // 4)[:, None], [BLOCK_Q, 4])
    # 12 * (HW // 4) = 3 * HW, written so the compiler sees every group start on a multiple of 4 elements
    image = img.to(tl.int64) * (HW // 4) * 12
    offs = image + quad[:, None] * 12 + tl.arange(0, 4)[None, :]
    # elements 0..3 of the quad: (k, c) = (0, 0), (0, 1), (0, 2), (1, 0)
    _update_tile(x_ptr, m_ptr, out_ptr, offs, mask, _lanes4(cos01_0, cos01_1, cos01_2, sin01_0),
                 _lanes4(r01_0, r01_1, r01_2, r01_0), c, clip_lo, clip_hi)
    # elements 4..7: (1, 1), (1, 2), (2, 0), (2, 1)
    _update_tile(x_ptr, m_ptr, out_ptr, offs + 4, mask, _lanes4(sin01_1, sin01_2, cos23_0, cos23_1),
                 _lanes4(r01_1, r01_2, r23_0, r23_1), c, clip_lo, clip_hi)
    # elements 8..11: (2, 2), (3, 0), (3, 1), (3, 2)
    _update_tile(x_ptr, m_ptr, out_ptr, offs + 8, mask, _lanes4(cos23_2, sin23_0, sin23_1, sin23_2),
                 _lanes4(r23_2, r23_0, r23_1, r23_2), c, clip_lo, clip_hi)


@triton.jit
def _gaussian_noise_kernel(
    out_ptr,  # noise [N, numel_img], NCHW-contiguous
    seeds_ptr,  # int64 [N] per-image seeds
    stream_ptr,  # integer device scalar holding the stream (read only when stream_from_ptr != 0)
    stream_value,  # stream added to the value read (the Python stream mod 2**32, or 0)
    stream_from_ptr,  # int32: 1 = read the stream from stream_ptr
    numel_img,  # int32 elements per image
    BLOCK: tl.constexpr,  # elements per program, a multiple of 4
):
    """Standard normal noise of ``fastdiff/ops/noise.py``: element e of image n is n[e % 4] of
    Philox((e // 4, stream, 0, 0), key = seed[n]) through Box-Muller. Bytes per element: writes s."""
    pid = tl.program_id(0)
    img = tl.program_id(1)
    stream = (tl.load(stream_ptr, mask=stream_from_ptr != 0, other=0).to(tl.int64) + stream_value).to(tl.uint32)
    seed = tl.load(seeds_ptr + img)
    quad = pid * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
    offs = quad[:, None] * 4 + tl.arange(0, 4)[None, :]
    n0, n1, n2, n3 = _normal4(quad.to(tl.uint32), stream, seed)
    z = _lanes4(n0, n1, n2, n3)
    base = img.to(tl.int64) * numel_img
    tl.store(out_ptr + base + offs, z.to(out_ptr.dtype.element_ty), mask=offs < numel_img)


# ----------------------------------------------------------------------------------------------------------------
# Launch plans (shared with kernels/compile_check.py) and launchers
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepPlan:
    """Block sizes and warps of one update-step (or noise) launch."""

    kernel: str  # "flat" (_update_step_kernel), "cl_philox" (_update_step_cl_philox_kernel), "cl_pairs"
    # (_update_step_cl_pairs_kernel), "cl_rgb" (_update_step_cl_rgb_kernel) or "noise"
    block: int  # flat / noise: elements per program; cl_pairs: (pixel quad, channel) pairs per program; cl_rgb:
    # pixel quads per program
    block_p: int  # cl_philox: pixels (or pixel quads) per program
    block_c: int  # cl_philox: channels per program
    quads: bool  # cl_philox: HW % 4 == 0
    num_warps: int
    full_c: bool = False  # cl_philox: C % block_c == 0 (no channel mask, so stores vectorise along channels)
    exact_c: bool = False  # cl_philox: C == block_c (the pixel stride is a compile-time constant)
    even: bool = False  # cl_pairs / cl_rgb: quads, and the programs cover the pairs / quads exactly (no mask)


CL_PAIRS_BLOCK = 1024  # pairs per program: 8 pairs (32 elements) a thread at 4 warps
CL_RGB_BLOCK = 512  # pixel quads per program: 4 quads (48 elements) a thread at 4 warps
CL_TILE_CELLS = 2048  # (pixel quad, channel) cells per program of the channel tile: 64 elements a thread


def plan_update_step(c: int, hw: int, layout: str, philox: bool) -> StepPlan:
    """The one place that picks block sizes for the update step (launcher and compile check)."""
    if layout == CHANNELS_LAST and philox:
        quads = hw % 4 == 0
        if c == 3 and quads:  # RGB: a thread owns a pixel quad's 12 contiguous elements
            return StepPlan("cl_rgb", CL_RGB_BLOCK, 0, 0, quads, 4, even=hw // 4 % CL_RGB_BLOCK == 0)
        if c < 16 and c & (c - 1):  # few channels, not a power of two: a channel tile would run lanes masked
            even = quads and hw // 4 * c % CL_PAIRS_BLOCK == 0
            return StepPlan("cl_pairs", CL_PAIRS_BLOCK, 0, 0, quads, 4, even=even)
        return plan_cl_philox_tile(c, hw, CL_TILE_CELLS)
    # 16 elements a thread (32 with Philox): amortises the per-program coefficient loads and index math (fewer
    # instructions per element matter once Philox and Box-Muller are in the loop)
    return StepPlan("flat", 4096 if philox else 2048, 0, 0, False, 4)


def plan_cl_philox_tile(c: int, hw: int, cells: int) -> StepPlan:
    """The [quads, channels] tile of a channels_last Philox program (``_cl_quad_tile``; the update step's and the
    DPM-Solver step's): ``cells`` (pixel quad, channel) cells of 4 elements, at most 64 channels, 4 warps."""
    block_c = min(next_pow2(c), 64)
    return StepPlan("cl_philox", 0, max(1, cells // block_c), block_c, hw % 4 == 0, 4, c % block_c == 0,
                    c == block_c)


def cl_philox_quads(hw: int, quads: bool) -> int:
    """Pixel quads per channel the channels_last Philox kernel walks: HW / 4, or with HW % 4 != 0 enough to cover
    pixels -3 .. HW - 1 (a channel's quads start up to 3 pixels before its pixel 0)."""
    return hw // 4 if quads else cdiv(hw + 3, 4)


def cl_philox_grid(plan: StepPlan, c: int, hw: int, n: int) -> tuple[int, int, int]:
    """The launch grid of a ``plan_cl_philox_tile`` plan: (quad programs, channel programs, images)."""
    return cdiv(cl_philox_quads(hw, plan.quads), plan.block_p), cdiv(c, plan.block_c), n


def plan_gaussian_noise() -> StepPlan:
    return StepPlan("noise", 2048, 0, 0, False, 4)


def _integer_scalar(t: torch.Tensor, name: str, device) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.numel() != 1:
        raise ValueError(f"{name} must hold one element, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")


def table_step_args(op: str, coeffs: torch.Tensor, n_cols: int, step_index, device):
    """(step_ptr, step_value, step_from_ptr, n_steps) for a kernel reading row ``step_index`` of ``coeffs``.

    ``coeffs`` must be a contiguous float32 [steps, n_cols] table on ``device``; ``step_index`` an int (checked
    against the table here) or an integer device scalar (read by the kernel: a wrong one gives a NaN row).
    """
    if coeffs.dim() != 2 or coeffs.shape[1] != n_cols or coeffs.dtype != torch.float32:
        raise ValueError(f"{op}: coeffs must be float32 [steps, {n_cols}], got {coeffs.dtype} {tuple(coeffs.shape)}")
    if coeffs.device != device or not coeffs.is_contiguous():
        raise ValueError(f"{op}: coeffs must be a contiguous tensor on the sample's device")
    n_steps = coeffs.shape[0]
    if isinstance(step_index, torch.Tensor):
        _integer_scalar(step_index, "step_index", device)
        return step_index, 0, 1, n_steps
    step = int(step_index)
    if not -n_steps <= step < n_steps:
        raise ValueError(f"{op}: step_index {step} outside a table of {n_steps} steps")
    return coeffs, step % n_steps, 0, n_steps


def noise_mode_args(op: str, sample: torch.Tensor, noise, seeds, noise_streams, n_steps: int):
    """(mode, seeds, noise_streams): NOISE_TENSOR with ``noise``, NOISE_PHILOX with per-image ``seeds`` and the
    table's ``noise_streams`` (checked, made unit-stride), else NOISE_NONE."""
    if noise is not None:
        return NOISE_TENSOR, seeds, noise_streams
    if seeds is None:
        return NOISE_NONE, seeds, noise_streams
    device = sample.device
    if noise_streams is None:
        raise ValueError(f"{op}: seeds given without noise_streams")
    if seeds.dtype != torch.int64 or seeds.dim() != 1 or seeds.shape[0] != sample.shape[0] or seeds.device != device:
        raise ValueError(f"{op}: seeds must be int64 [{sample.shape[0]}] on {device}")
    if (noise_streams.dtype not in (torch.int32, torch.int64) or noise_streams.dim() != 1
            or noise_streams.shape[0] != n_steps or noise_streams.device != device):
        raise ValueError(f"{op}: noise_streams must be int32/int64 [{n_steps}] on {device}")
    return NOISE_PHILOX, seeds.contiguous(), noise_streams.contiguous()  # read at unit stride


def output_like(sample: torch.Tensor, layout: str, out, op: str) -> torch.Tensor:
    """``out`` checked to be like ``sample`` (shape, dtype, device, layout), or a new tensor like it."""
    if out is None:
        return torch.empty(sample.shape, dtype=sample.dtype, device=sample.device, memory_format=memory_format(layout))
    check_out(out, sample.shape, sample.dtype, sample.device, layout, op)
    return out


def update_step(sample, model_output, coeffs, step_index, *, clip_range=None, noise=None, seeds=None,
                noise_streams=None, out=None):
    """Fused update step (see module docstring); same contract as ``fastdiff.ops.reference.update_step``.

    ``out`` (optional): preallocated result like ``sample`` (it may be ``sample`` itself).
    """
    problem = update_step_problem(sample, model_output, noise)
    if problem:
        raise ValueError(f"update_step: {problem}")
    device = sample.device
    step_ptr, step_value, step_from_ptr, n_steps = table_step_args("update_step", coeffs, N_STEP_COEFFS, step_index,
                                                                   device)
    mode, seeds, noise_streams = noise_mode_args("update_step", sample, noise, seeds, noise_streams, n_steps)
    if clip_range is None:
        clip_lo, clip_hi = float("-inf"), float("inf")
    else:
        clip_lo, clip_hi = -float(clip_range), float(clip_range)
        if not clip_hi >= 0:
            raise ValueError(f"update_step: clip_range must be >= 0, got {clip_range}")
    layout = layout_of(sample)
    out = output_like(sample, layout, out, "update_step")
    if sample.numel() == 0:
        return out
    n, c = sample.shape[:2]
    numel_img = sample[0].numel()
    hw = numel_img // c
    plan = plan_update_step(c, hw, layout, mode == NOISE_PHILOX)
    seeds_arg = seeds if mode == NOISE_PHILOX else coeffs
    streams_arg = noise_streams if mode == NOISE_PHILOX else coeffs
    if plan.kernel == "cl_philox":
        _update_step_cl_philox_kernel[cl_philox_grid(plan, c, hw, n)](
            sample, model_output, out, coeffs, step_ptr, step_value, step_from_ptr, n_steps, seeds_arg, streams_arg,
            clip_lo, clip_hi, c, hw, QUADS=plan.quads, BLOCK_P=plan.block_p, BLOCK_C=plan.block_c, FULL_C=plan.full_c,
            EXACT_C=plan.exact_c,
            num_warps=plan.num_warps, num_stages=1, enable_fp_fusion=FP_FUSION)
    elif plan.kernel == "cl_pairs":
        n_quads = cl_philox_quads(hw, plan.quads)
        grid = (cdiv(n_quads * c, plan.block), n)
        _update_step_cl_pairs_kernel[grid](
            sample, model_output, out, coeffs, step_ptr, step_value, step_from_ptr, n_steps, seeds_arg, streams_arg,
            clip_lo, clip_hi, hw, n_quads, C=c, QUADS=plan.quads, BLOCK=plan.block, EVEN=plan.even,
            num_warps=plan.num_warps, num_stages=1, enable_fp_fusion=FP_FUSION)
    elif plan.kernel == "cl_rgb":
        grid = (cdiv(hw // 4, plan.block), n)
        _update_step_cl_rgb_kernel[grid](
            sample, model_output, out, coeffs, step_ptr, step_value, step_from_ptr, n_steps, seeds_arg, streams_arg,
            clip_lo, clip_hi, hw, BLOCK_Q=plan.block, EVEN=plan.even,
            num_warps=plan.num_warps, num_stages=1, enable_fp_fusion=FP_FUSION)
    else:
        grid = (cdiv(numel_img, plan.block), n)
        _update_step_kernel[grid](
            sample, model_output, noise if mode == NOISE_TENSOR else sample, out, coeffs, step_ptr, step_value,
            step_from_ptr, n_steps, seeds_arg, streams_arg, clip_lo, clip_hi, numel_img, NOISE=mode,
            BLOCK=plan.block, num_warps=plan.num_warps, num_stages=1, enable_fp_fusion=FP_FUSION)
    return out


def gaussian_noise(seeds, stream, image_shape, *, dtype=torch.float32, out=None):
    """Standard normal noise [len(seeds), *image_shape] (NCHW-contiguous), as ``gaussian_noise_reference``.

    ``stream``: Python int or a one-element integer device tensor (read on the device).
    """
    if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64 or seeds.dim() != 1:
        raise ValueError("gaussian_noise: seeds must be a 1-D int64 tensor")
    seeds = seeds.contiguous()
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"gaussian_noise: dtype {dtype} is not float32, float16 or bfloat16")
    device = seeds.device
    image_shape = tuple(int(s) for s in image_shape)
    numel_img = math.prod(image_shape)
    if numel_img > INT32_MAX:
        raise ValueError("gaussian_noise: more than 2**31 - 1 elements per image")
    shape = (seeds.shape[0], *image_shape)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=device)
    else:
        check_out(out, shape, dtype, device, NCHW, "gaussian_noise")
    if isinstance(stream, torch.Tensor):
        _integer_scalar(stream, "stream", device)
        stream_ptr, stream_value, from_ptr = stream, 0, 1
    else:
        stream_ptr, stream_value, from_ptr = seeds, int(stream) & 0xFFFFFFFF, 0
    if out.numel() == 0:
        return out
    plan = plan_gaussian_noise()
    grid = (cdiv(numel_img, plan.block), seeds.shape[0])
    _gaussian_noise_kernel[grid](out, seeds, stream_ptr, stream_value, from_ptr, numel_img, BLOCK=plan.block,
                                 num_warps=plan.num_warps, num_stages=1, enable_fp_fusion=FP_FUSION)
    return out
