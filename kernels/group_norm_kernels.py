"""Fused GroupNorm (+ per-channel add before the statistics) (+ SiLU): y = [silu](GroupNorm(x + add)).

Same semantics as ``fastdiff.ops.reference.group_norm`` (Wu & He, 2018): for sample n and group g with
elements h = x + add[n, c] (add broadcast over the spatial dims),

    mean = E[h],  var = E[(h - mean)^2]  (biased, float32),  y = (h - mean) / sqrt(var + eps) * weight[c] + bias[c]

then optionally y = y * sigmoid(y). ``x + add`` is never written to memory: the statistics add it (the single
path as sum(x) + HW * sum(add)) and the output subtracts mean - add from x.

A group is addressed as a [channels of the group, pixels] array: NCHW-contiguous puts pixels at stride 1 and
channels at stride HW; channels_last puts channels at stride 1 and pixels at stride C. Tiles are
[BLOCK_C, BLOCK_P] in both cases and Triton vectorises along whichever axis is contiguous.

Two paths, chosen by ``plan_group_norm`` from the group's size:

* single: one program per (sample, group) holds the whole group in registers; exact two-pass statistics
  (mean, then the sum of squared deviations) and the output in one read and one write of x.
* split, for groups larger than one program's registers (e.g. 128 channels at 256x256 in 32 groups: 262144
  elements a group): (1) ``_gn_stats_kernel`` folds a chunk of pixel tiles into per-channel partial
  (mean, M2): every (channel, pixel-of-tile) slot keeps a Welford running mean and M2 over the chunk's tiles
  (elementwise, no cross-lane work per tile) and the slots merge once at the end by Chan et al.'s formula;
  (2) ``_gn_combine_kernel`` merges the partials of each (sample, group) in a fixed order (Chan's formula for
  many parts) and writes per-channel (centre, scale, shift); (3) ``_gn_apply_kernel`` writes
  y = (x - centre) * scale + shift over the whole tensor. Deterministic (no atomics); partials use
  N * chunks * C * 8 bytes. Every program works on a tile of pixels and channels, so small batches still
  spread over the whole GPU.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import (CHANNELS_LAST, cdiv, check_out, group_norm_problem, layout_of, memory_format, next_pow2,
                      prev_pow2, warps_for)

FP_FUSION = True  # statistics and the affine map only gain from fused multiply-adds
SINGLE_MAX_ELEMENTS = 8192  # largest padded group (BLOCK_C * BLOCK_P) one program keeps in registers
TILE_ELEMENTS = 4096  # elements per tile of the split path
TARGET_PROGRAMS = 1024  # stats programs to aim for (about 8 per SM on a 132-SM H200)
MAX_TILES_PER_CHUNK = 64
LOG2E: tl.constexpr = tl.constexpr(math.log2(math.e))


@triton.jit
def _silu(y):
    """y * sigmoid(y) = y / (1 + 2^(-y log2 e)): one MUFU.EX2 and a fast division (MUFU.RCP and a multiply,
    PTX div.full.f32, at most 2 ulp) instead of tl.sigmoid's IEEE-rounded division (about 12 more instructions
    a value). The result is within a few float32 ulp of the exact SiLU, far below the rounding of a half-precision
    output and inside the float32 tolerance. y -> -inf gives y / inf = -0, the limit."""
    return tl.fdiv(y, 1.0 + tl.exp2(y * -LOG2E), ieee_rounding=False)


@triton.jit
def _sum2d(v, CL: tl.constexpr):
    """Sum of a [channels, pixels] tile, first along the axis each thread holds contiguously (pixels for NCHW,
    channels for channels_last) so the first stage is in-thread adds and only one value per thread crosses lanes."""
    if CL:
        return tl.sum(tl.sum(v, axis=0), axis=0)
    return tl.sum(tl.sum(v, axis=1), axis=0)


@triton.jit
def _affine(w_ptr, b_ptr, ch, cmask, rstd, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """Per-channel (scale, shift) = (weight * rstd, bias), with weight 1 and bias 0 when absent."""
    if HAS_WEIGHT:
        scale = tl.load(w_ptr + ch, mask=cmask, other=0.0).to(tl.float32) * rstd
    else:
        scale = tl.zeros([BLOCK], tl.float32) + rstd
    if HAS_BIAS:
        shift = tl.load(b_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
    else:
        shift = tl.zeros([BLOCK], tl.float32)
    return scale, shift


@triton.jit
def _gn_single_kernel(
    x_ptr,  # input [N, C, HW] (NCHW-contiguous) or [N, HW, C] (channels_last), float32/16/bf16
    add_ptr,  # [N, C] per-(sample, channel) addend, row stride add_stride_n (read when HAS_ADD)
    w_ptr,  # weight [C] (read when HAS_WEIGHT)
    b_ptr,  # bias [C] (read when HAS_BIAS)
    y_ptr,  # output, same shape, dtype and layout as x (may alias x)
    C,  # channels
    HW,  # pixels per sample (product of spatial dims)
    CPG,  # channels per group
    add_stride_n,  # elements between rows of add
    eps,  # float32 added to the variance
    CL: tl.constexpr,  # channels_last layout
    HAS_ADD: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    CPG_ALIGN: tl.constexpr,  # largest power of 2 (<= 16) dividing CPG: lets channels_last loads vectorise
    BLOCK_C: tl.constexpr,  # >= CPG, power of 2
    BLOCK_P: tl.constexpr,  # >= HW, power of 2
):
    """One program per (group, sample) holding the group in registers.

    mean = sum(h) / n, var = sum((h - mean)^2) / n with h = x + add, y = (h - mean) * rstd * w + b [silu].
    Bytes per element: reads s, writes s (s = element size; float16: 4 bytes), plus per-channel vectors.
    """
    g = tl.program_id(0)
    n = tl.program_id(1)
    cg = tl.arange(0, BLOCK_C)
    pix = tl.arange(0, BLOCK_P)
    ch = tl.multiple_of(g * CPG, CPG_ALIGN) + cg
    # cg < CPG, written so the compiler sees the mask constant over runs of CPG_ALIGN channels
    cmask = (cg // CPG_ALIGN) * CPG_ALIGN < CPG
    mask = cmask[:, None] & (pix < HW)[None, :]
    if CL:  # element offsets inside the sample
        offs = pix[None, :] * C + ch[:, None]
    else:
        offs = ch[:, None] * HW + pix[None, :]
    offs = n.to(tl.int64) * C * HW + offs
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    count = HW * 1.0 * CPG
    if HAS_ADD:  # sum(h) = sum(x) + HW * sum(add), and h - mean = x - (mean - add): x + add is never formed
        a = tl.load(add_ptr + n * add_stride_n + ch, mask=cmask, other=0.0).to(tl.float32)
        mean = (_sum2d(x, CL) + tl.sum(a, axis=0) * HW) / count
        centre = mean - a
    else:
        mean = _sum2d(x, CL) / count
        centre = tl.zeros([BLOCK_C], tl.float32) + mean
    d = tl.where(mask, x - centre[:, None], 0.0)
    var = _sum2d(d * d, CL) / count
    rstd = 1.0 / tl.sqrt_rn(var + eps)
    scale, shift = _affine(w_ptr, b_ptr, ch, cmask, rstd, HAS_WEIGHT, HAS_BIAS, BLOCK_C)
    y = d * scale[:, None] + shift[:, None]
    if SILU:
        y = _silu(y)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gn_stats_kernel(
    x_ptr,  # input [N, C, HW] (NCHW-contiguous) or [N, HW, C] (channels_last)
    add_ptr,  # [N, C] addend, row stride add_stride_n (read when HAS_ADD)
    mean_ptr,  # float32 [N, n_chunks, C] out: mean of h over the chunk's pixels, per channel
    m2_ptr,  # float32 [N, n_chunks, C] out: sum of squared deviations from that mean
    C,  # channels
    HW,  # pixels per sample
    chunk_pixels,  # pixels per chunk (tiles_per_chunk * BLOCK_P)
    tiles_per_chunk,  # pixel tiles per program
    n_chunks,  # chunks per sample (cdiv(HW, chunk_pixels))
    add_stride_n,  # elements between rows of add
    CL: tl.constexpr,  # channels_last layout
    HAS_ADD: tl.constexpr,
    BLOCK_C: tl.constexpr,  # channels per tile
    BLOCK_P: tl.constexpr,  # pixels per tile
):
    """Split path, pass 1: per-channel (mean, M2) of h = x + add over one chunk of pixels.

    Each slot (channel, pixel j of the tile) keeps its own Welford running (mean, M2) over the chunk's tiles,
    so the loop is elementwise (no cross-lane reduction per tile): for the t-th value of a slot,
    delta = h - mean, mean += delta / (t + 1), M2 += delta * (h - mean). After the loop the slots of a channel
    merge by Chan et al. (1979): mean = sum n_j mean_j / n, M2 = sum M2_j + sum n_j (mean_j - mean)^2.
    Bytes per element: reads s; writes 8 bytes per (channel, chunk).
    """
    chunk = tl.program_id(0)
    cb = tl.program_id(1)
    n = tl.program_id(2)
    ch = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = ch < C
    base = n.to(tl.int64) * C * HW
    if HAS_ADD:
        a = tl.load(add_ptr + n * add_stride_n + ch, mask=cmask, other=0.0).to(tl.float32)
    slot_mean = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    slot_m2 = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    p_start = chunk * chunk_pixels
    j = tl.arange(0, BLOCK_P)
    for t in range(tiles_per_chunk):
        pix = p_start + t * BLOCK_P + j
        mask = cmask[:, None] & (pix < HW)[None, :]
        if CL:
            offs = pix[None, :] * C + ch[:, None]
        else:
            offs = ch[:, None] * HW + pix[None, :]
        h = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_ADD:
            h = h + a[:, None]
        inv_count = 1.0 / (t + 1.0)  # valid tiles of a slot are a prefix, so this is its t-th value
        delta = h - slot_mean
        new_mean = slot_mean + delta * inv_count
        slot_m2 = tl.where(mask, slot_m2 + delta * (h - new_mean), slot_m2)
        slot_mean = tl.where(mask, new_mean, slot_mean)
    # values per slot: the chunk's tiles whose pixel j lies inside the image
    slot_n = tl.minimum((tl.maximum(HW - p_start - j, 0) + BLOCK_P - 1) // BLOCK_P, tiles_per_chunk).to(tl.float32)
    count = tl.maximum(tl.sum(slot_n, axis=0), 1.0)
    mean = tl.sum(slot_mean * slot_n[None, :], axis=1) / count
    d = slot_mean - mean[:, None]
    m2 = tl.sum(slot_m2 + d * d * slot_n[None, :], axis=1)
    out = (n * n_chunks + chunk) * C + ch
    tl.store(mean_ptr + out, mean, mask=cmask)
    tl.store(m2_ptr + out, m2, mask=cmask)


@triton.jit
def _gn_combine_kernel(
    mean_ptr,  # float32 [N, n_chunks, C] partial means from _gn_stats_kernel
    m2_ptr,  # float32 [N, n_chunks, C] partial M2
    add_ptr,  # [N, C] addend, row stride add_stride_n (read when HAS_ADD)
    w_ptr,  # weight [C] (read when HAS_WEIGHT)
    b_ptr,  # bias [C] (read when HAS_BIAS)
    norm_ptr,  # float32 [N, 3, C] out: centre, scale, shift with y = (x - centre) * scale + shift
    C,  # channels
    HW,  # pixels per sample
    CPG,  # channels per group
    chunk_pixels,  # pixels per chunk
    n_chunks,  # chunks per sample
    add_stride_n,  # elements between rows of add
    eps,  # float32 added to the variance
    HAS_ADD: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_K: tl.constexpr,  # chunks merged per step
    BLOCK_CG: tl.constexpr,  # >= CPG, power of 2
):
    """Split path, pass 2: merge the n_chunks * CPG partials of one (group, sample) in a fixed order.

    With counts n_k (pixels of chunk k): mean = sum n_k mean_k / n, M2 = sum M2_k + sum n_k (mean_k - mean)^2,
    var = M2 / n. Writes centre = mean - add[c], scale = rstd * w[c], shift = b[c] per channel of the group.
    Bytes: reads 8 * n_chunks per channel, writes 12 per channel.
    """
    g = tl.program_id(0)
    n = tl.program_id(1)
    cg = tl.arange(0, BLOCK_CG)
    ch = g * CPG + cg
    cmask = cg < CPG
    kk = tl.arange(0, BLOCK_K)
    part = n * n_chunks * C
    acc = tl.zeros([BLOCK_K, BLOCK_CG], tl.float32)
    for k0 in range(0, n_chunks, BLOCK_K):
        k = k0 + kk
        mask = (k < n_chunks)[:, None] & cmask[None, :]
        n_k = tl.minimum(tl.maximum(HW - k * chunk_pixels, 0), chunk_pixels).to(tl.float32)
        mean_k = tl.load(mean_ptr + part + k[:, None] * C + ch[None, :], mask=mask, other=0.0)
        acc += n_k[:, None] * mean_k
    count = HW * 1.0 * CPG
    mean = tl.sum(tl.sum(acc, axis=1), axis=0) / count
    acc = tl.zeros([BLOCK_K, BLOCK_CG], tl.float32)
    for k0 in range(0, n_chunks, BLOCK_K):
        k = k0 + kk
        mask = (k < n_chunks)[:, None] & cmask[None, :]
        n_k = tl.minimum(tl.maximum(HW - k * chunk_pixels, 0), chunk_pixels).to(tl.float32)
        offs = part + k[:, None] * C + ch[None, :]
        mean_k = tl.load(mean_ptr + offs, mask=mask, other=0.0)
        m2_k = tl.load(m2_ptr + offs, mask=mask, other=0.0)
        d = mean_k - mean
        acc += tl.where(mask, m2_k + n_k[:, None] * d * d, 0.0)
    var = tl.sum(tl.sum(acc, axis=1), axis=0) / count
    rstd = 1.0 / tl.sqrt_rn(var + eps)
    centre = tl.zeros([BLOCK_CG], tl.float32) + mean
    if HAS_ADD:
        centre -= tl.load(add_ptr + n * add_stride_n + ch, mask=cmask, other=0.0).to(tl.float32)
    scale, shift = _affine(w_ptr, b_ptr, ch, cmask, rstd, HAS_WEIGHT, HAS_BIAS, BLOCK_CG)
    out = norm_ptr + n * 3 * C + ch
    tl.store(out, centre, mask=cmask)
    tl.store(out + C, scale, mask=cmask)
    tl.store(out + 2 * C, shift, mask=cmask)


@triton.jit
def _gn_apply_kernel(
    x_ptr,  # input [N, C, HW] (NCHW-contiguous) or [N, HW, C] (channels_last)
    norm_ptr,  # float32 [N, 3, C]: centre, scale, shift from _gn_combine_kernel
    y_ptr,  # output, same shape, dtype and layout as x (may alias x)
    C,  # channels
    HW,  # pixels per sample
    CL: tl.constexpr,  # channels_last layout
    SILU: tl.constexpr,
    BLOCK_C: tl.constexpr,  # channels per tile
    BLOCK_P: tl.constexpr,  # pixels per tile
):
    """Split path, pass 3: y = (x - centre[c]) * scale[c] + shift[c] [silu], one tile per program.

    centre already holds mean - add, so x + add is never formed. Bytes per element: reads s, writes s.
    Tiles are visited in the reverse of the statistics pass's order (last sample and last pixels first): the
    first tiles read here are the last ones the statistics pass read, still in L2 (a whole sample when it fits,
    e.g. 16.8 MB for 128x256x256 float16 against the H200's 50 MB), so less of the second read comes from HBM.
    """
    pb = tl.num_programs(0) - 1 - tl.program_id(0)
    cb = tl.num_programs(1) - 1 - tl.program_id(1)
    n = tl.num_programs(2) - 1 - tl.program_id(2)
    ch = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    pix = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    cmask = ch < C
    mask = cmask[:, None] & (pix < HW)[None, :]
    nrm = norm_ptr + n * 3 * C + ch
    centre = tl.load(nrm, mask=cmask, other=0.0)
    scale = tl.load(nrm + C, mask=cmask, other=0.0)
    shift = tl.load(nrm + 2 * C, mask=cmask, other=0.0)
    if CL:
        offs = pix[None, :] * C + ch[:, None]
    else:
        offs = ch[:, None] * HW + pix[None, :]
    offs = n.to(tl.int64) * C * HW + offs
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = (x - centre[:, None]) * scale[:, None] + shift[:, None]
    if SILU:
        y = _silu(y)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launch plan (shared with kernels/compile_check.py) and launcher
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupNormPlan:
    """Everything a group-norm launch needs besides the tensors."""

    path: str  # "single" or "split"
    block_c: int  # single: >= channels per group; split: channels per tile
    block_p: int  # single: >= pixels; split: pixels per tile
    num_warps: int  # warps of the single, stats and apply kernels
    tiles_per_chunk: int = 0  # split: pixel tiles per stats program
    n_chunks: int = 0  # split: stats programs along the pixels (partials per channel)
    combine_block_k: int = 0  # split: partials merged per step of the combine
    combine_block_cg: int = 0  # split: >= channels per group
    combine_warps: int = 0


def cpg_align(cpg: int) -> int:
    """Largest power of 2 dividing the channels per group, at most 16 (a compile-time alignment hint)."""
    return min(16, cpg & -cpg)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def plan_group_norm(n: int, c: int, hw: int, groups: int, channels_last: bool, *, max_single: int | None = None,
                    tile: int | None = None, tiles_per_chunk: int | None = None) -> GroupNormPlan:
    """The one place that picks the path, block sizes and warps (launcher and compile check).

    ``max_single`` (env ``FASTDIFF_GN_MAX_SINGLE``): largest padded group for the single path, 0 forces the
    split path. ``tile`` (env ``FASTDIFF_GN_TILE``): elements per split tile. ``tiles_per_chunk``: tiles per
    stats program (default: enough programs to fill the GPU). Overrides exist so tests reach every path
    with small shapes.
    """
    max_single = _env_int("FASTDIFF_GN_MAX_SINGLE", SINGLE_MAX_ELEMENTS) if max_single is None else max_single
    tile = _env_int("FASTDIFF_GN_TILE", TILE_ELEMENTS) if tile is None else tile
    tile = max(1, prev_pow2(tile))
    block_cg, block_hw = next_pow2(c // groups), next_pow2(hw)
    if block_cg * block_hw <= max_single:
        return GroupNormPlan("single", block_cg, block_hw, warps_for(block_cg * block_hw))
    if channels_last:  # contiguous channels: wide channel tiles
        block_c = min(next_pow2(c), tile)
        block_p = min(block_hw, max(1, tile // block_c))
    else:  # contiguous pixels: long pixel rows
        block_p = min(block_hw, tile)
        block_c = min(next_pow2(c), max(1, tile // block_p))
    if tiles_per_chunk is None:
        p_tiles = cdiv(hw, block_p)
        tiles = n * cdiv(c, block_c) * p_tiles
        tiles_per_chunk = max(1, min(MAX_TILES_PER_CHUNK, prev_pow2(tiles // TARGET_PROGRAMS), next_pow2(p_tiles)))
    return split_plan(c, hw, groups, block_c, block_p, tiles_per_chunk)


def split_plan(c: int, hw: int, groups: int, block_c: int, block_p: int, tiles_per_chunk: int) -> GroupNormPlan:
    """A split-path plan for given tile sizes (powers of 2); fills in the chunking, combine and warps."""
    if min(block_c, block_p, tiles_per_chunk) < 1 or block_c & (block_c - 1) or block_p & (block_p - 1):
        raise ValueError(f"split_plan: tile sizes must be powers of 2, got {block_c}x{block_p}")
    block_cg = next_pow2(c // groups)
    n_chunks = cdiv(cdiv(hw, block_p), tiles_per_chunk)
    block_k = max(1, min(next_pow2(n_chunks), 2048 // block_cg))
    return GroupNormPlan("split", block_c, block_p, warps_for(block_c * block_p), tiles_per_chunk, n_chunks,
                         block_k, block_cg, warps_for(block_k * block_cg, per_thread=8, max_warps=4))


def group_norm(x, num_groups, weight, bias, eps=1e-5, *, add=None, silu=False, out=None, plan=None):
    """y = [silu](GroupNorm(x + add)); see the module docstring. Output in x's dtype and memory format.

    ``out``: optional preallocated output like x (may be x itself). ``plan``: a ``GroupNormPlan`` to use
    instead of ``plan_group_norm``'s choice (tests).
    """
    problem = group_norm_problem(x, weight, bias, add)
    if problem:
        raise ValueError(f"group_norm: {problem}")
    n, c = x.shape[:2]
    if not isinstance(num_groups, int) or num_groups <= 0 or c % num_groups:
        raise ValueError(f"group_norm: num_groups={num_groups!r} must be a positive divisor of {c} channels")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (c,):
            raise ValueError(f"group_norm: {name} has shape {tuple(p.shape)}, expected ({c},)")
    if add is not None:
        if add.numel() != n * c or tuple(add.shape[:2]) != (n, c):
            raise ValueError(f"group_norm: add has shape {tuple(add.shape)}, expected ({n}, {c}) or ({n}, {c}, 1, 1)")
        add = add.reshape(n, c)
        if add.stride(1) != 1:
            add = add.contiguous()
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    layout = layout_of(x)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format(layout))
    else:
        check_out(out, x.shape, x.dtype, x.device, layout, "group_norm")
    hw = math.prod(x.shape[2:])
    if x.numel() == 0:
        return out
    cl = layout == CHANNELS_LAST
    cpg = c // num_groups
    plan = plan or plan_group_norm(n, c, hw, num_groups, cl)
    dummy = x  # stands in for absent optional tensors (never read)
    add_arg = dummy if add is None else add
    add_stride = 0 if add is None else add.stride(0)
    w_arg = dummy if weight is None else weight
    b_arg = dummy if bias is None else bias
    flags = dict(HAS_ADD=add is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None)
    launch = dict(num_stages=1, enable_fp_fusion=FP_FUSION)
    if plan.path == "single":
        _gn_single_kernel[(num_groups, n)](
            x, add_arg, w_arg, b_arg, out, c, hw, cpg, add_stride, float(eps), CL=cl, **flags, SILU=bool(silu),
            CPG_ALIGN=cpg_align(cpg), BLOCK_C=plan.block_c, BLOCK_P=plan.block_p, num_warps=plan.num_warps, **launch)
        return out
    partial_mean = torch.empty((n, plan.n_chunks, c), dtype=torch.float32, device=x.device)
    partial_m2 = torch.empty_like(partial_mean)
    norm = torch.empty((n, 3, c), dtype=torch.float32, device=x.device)
    chunk_pixels = plan.tiles_per_chunk * plan.block_p
    c_blocks = cdiv(c, plan.block_c)
    _gn_stats_kernel[(plan.n_chunks, c_blocks, n)](
        x, add_arg, partial_mean, partial_m2, c, hw, chunk_pixels, plan.tiles_per_chunk, plan.n_chunks, add_stride,
        CL=cl, HAS_ADD=add is not None, BLOCK_C=plan.block_c, BLOCK_P=plan.block_p, num_warps=plan.num_warps,
        **launch)
    _gn_combine_kernel[(num_groups, n)](
        partial_mean, partial_m2, add_arg, w_arg, b_arg, norm, c, hw, cpg, chunk_pixels, plan.n_chunks, add_stride,
        float(eps), **flags, BLOCK_K=plan.combine_block_k, BLOCK_CG=plan.combine_block_cg,
        num_warps=plan.combine_warps, **launch)
    _gn_apply_kernel[(cdiv(hw, plan.block_p), c_blocks, n)](
        x, norm, out, c, hw, CL=cl, SILU=bool(silu), BLOCK_C=plan.block_c, BLOCK_P=plan.block_p,
        num_warps=plan.num_warps, **launch)
    return out
