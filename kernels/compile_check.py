"""Compile every kernel variant fastdiff launches for real GPUs, without a GPU, and report resources.

``compile_variants(targets=(80, 90))`` builds each variant with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", cc, 32))``, using the block sizes and warps of the launchers' own planning functions
(``plan_group_norm``, ``plan_update_step``, ``plan_gaussian_noise``) on representative shapes, and the
argument specialisation the JIT would apply (``tt.divisibility`` 16 on aligned pointers and on integers that
are multiples of 16; integers equal to 1 become constants). Registers, stack and local memory come from
``cuobjdump --dump-resource-usage`` on the cubin (the cuobjdump that ships with Triton), shared memory from the
compiled kernel's metadata. ``spills`` is the per-thread stack plus local memory: our kernels hold no local
arrays, so anything there is a register spill.

The interpreter cannot compile, so variants compile in worker processes started without ``TRITON_INTERPRET``
(Triton's on-disk cache makes reruns fast). ``main`` prints the table; ``fastdiff kernels`` calls it.

Static roofline (``roofline``), from the machine code alone: each variant is compiled at a stated large shape
(below) and its SASS (``cuobjdump --dump-sass``) is parsed. The executed instruction count per thread is the
straight-line code from the entry to the first unconditional EXIT (cold paths placed after it, such as the
IEEE division's slow path, are left out) with each loop body (a backward branch inside that range) counted
once per trip at that shape. Over the programs of the launch this gives

* ``sass_per_element``: thread instructions per tensor element (a warp instruction counts once per lane; lanes
  masked off still cost their issue slot);
* ``mufu_per_element``: the same for the special-function unit (MUFU.EX2/RCP/RSQ/SQRT/LG2/SIN/COS);
* ``bytes_per_element``: bytes the kernel must move through HBM (each input read once, each output written
  once, per-channel and per-sample vectors included), over the elements of the op's tensor;
* the predicted time of three bounds on an H200 (constants in ``H200``): memory = bytes / 4.3 TB/s (the
  measured device-to-device copy rate); issue = warp instructions / (132 SMs x 4 schedulers x 1 warp
  instruction per cycle x 1.98 GHz); special functions = MUFU lane-operations / (132 SMs x 16 per cycle x
  1.98 GHz). The largest is the predicted bound; ``memory_margin`` = memory time / the larger of the other two
  - 1, so a kernel is memory-bound with 15% margin when it is >= 0.15. The model is optimistic about the
  compute side (no dependency stalls, no load-store-unit limit), so a kernel it calls issue-bound is.

The split GroupNorm path is also reported as a whole (stats + combine + apply, kernel ``group_norm_split``);
its bytes count x read twice from HBM (the apply pass's re-read may hit L2 when it follows its statistics).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

_TL_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
             torch.int32: "i32"}
_DTYPE_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class Variant:
    """One kernel specialisation to compile: the kernel's name in its module and its launch arguments."""

    module: str  # "group_norm_kernels" or "update_step_kernels" (kernels/<module>.py)
    kernel: str  # @triton.jit function name
    variant: str  # short description for the table
    args: dict  # argument name -> representative value (torch.dtype for a pointer, int, float)
    constexprs: dict  # tl.constexpr argument name -> value
    num_warps: int
    fp_fusion: bool
    extra: dict = field(default_factory=dict)
    # the launch at the stated large shape: shape (text), elements (of the op's tensor), bytes (HBM floor),
    # programs (grid size), loop_trips (trip count of each loop in program order)
    roofline: dict = field(default_factory=dict)


# H200 (SXM) constants of the static roofline; see the module docstring.
H200 = {
    "hbm_bytes_per_s": 4.3e12,  # device-to-device copy, bytes read + written, measured (KINDS.md, 2026-10-28)
    "sms": 132,
    "schedulers_per_sm": 4,  # each issues one warp instruction per cycle
    "mufu_lanes_per_sm_per_cycle": 16,  # CUDA C++ Programming Guide, arithmetic throughput table, cc 9.0
    "clock_hz": 1.98e9,  # boost clock seen under load on the lent H200 (nvidia-smi, 2026-10-28)
}


def _ptr(dtype):
    return ("ptr", dtype)


def _signature(fn, args: dict, constexprs: dict):
    """Signature, constants and attributes as the JIT would specialise this call (aligned pointers)."""
    signature, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            consts[name] = constexprs[name]
            continue
        value = args[name]
        if isinstance(value, tuple) and value[0] == "ptr":
            signature[name] = "*" + _TL_TYPES[value[1]]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            raise TypeError(f"{name}: pass booleans as constexprs")
        elif isinstance(value, int):
            if value == 1:  # the JIT turns integer arguments equal to 1 into constants
                signature[name] = "constexpr"
                consts[name] = 1
            else:
                signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{name}: unsupported representative value {value!r}")
    return signature, consts, attrs


# ----------------------------------------------------------------------------------------------------------------
# Variant list
# ----------------------------------------------------------------------------------------------------------------

# Representative shapes, also the roofline's large shapes (each 256 MiB or more in float16): the largest group
# the single path takes (256 channels, 32 groups, 32x32) at batch 512; a 16x128x256x256 activation for the split
# path; a 64x3x512x512 batch of images for the update step and the noise (channels_last: 4 channels (latents)
# and 3 channels (RGB) with HW % 4 == 0, 3 channels with odd HW for the unaligned-quads path).
GN_SINGLE_SHAPE = (512, 256, 32 * 32, 32)
GN_SPLIT_SHAPE = (16, 128, 256 * 256, 32)
STEP_SHAPE = (64, 3, 512 * 512)
STEP_CL_SHAPES = ((64, 4, 512 * 512), (64, 3, 512 * 512), (64, 3, 511 * 511))


def _elem(dt) -> int:
    return torch.empty((), dtype=dt).element_size()


def _shape_text(n, c, hw) -> str:
    side = math.isqrt(hw)
    return f"{n}x{c}x{side}x{side}" if side * side == hw else f"{n}x{c}x{hw}"


def group_norm_variants() -> list[Variant]:
    from .group_norm_kernels import FP_FUSION, cpg_align, plan_group_norm

    out = []
    for dt in DTYPES:
        d = _DTYPE_NAMES[dt]
        s = _elem(dt)
        for cl in (False, True):
            lay = "cl" if cl else "nchw"
            n, c, hw, g = GN_SINGLE_SHAPE
            p = plan_group_norm(n, c, hw, g, cl)
            assert p.path == "single"
            for has_add in (False, True):
                for silu in (False, True):
                    # the engine's norms are affine; one variant shows weight/bias None compiles too
                    no_affine = dt == torch.float16 and not cl and not has_add and silu
                    for affine in (True, False) if no_affine else (True,):
                        args = dict(x_ptr=_ptr(dt), add_ptr=_ptr(dt), w_ptr=_ptr(dt), b_ptr=_ptr(dt), y_ptr=_ptr(dt),
                                    C=c, HW=hw, CPG=c // g, add_stride_n=c, eps=1e-5)
                        cx = dict(CL=cl, HAS_ADD=has_add, HAS_WEIGHT=affine, HAS_BIAS=affine, SILU=silu,
                                  CPG_ALIGN=cpg_align(c // g), BLOCK_C=p.block_c, BLOCK_P=p.block_p)
                        name = (f"{d} {lay}{' add' if has_add else ''}{' silu' if silu else ''}"
                                f"{'' if affine else ' no-affine'}")
                        # x read and y written once; weight and bias [C]; the time embedding [N, C]
                        nbytes = s * (2 * n * c * hw + (2 * c if affine else 0) + (n * c if has_add else 0))
                        roof = dict(shape=_shape_text(n, c, hw), elements=n * c * hw, bytes=nbytes, programs=g * n,
                                    loop_trips=[])
                        out.append(Variant("group_norm_kernels", "_gn_single_kernel", name, args, cx, p.num_warps,
                                           FP_FUSION, roofline=roof))
            n, c, hw, g = GN_SPLIT_SHAPE
            p = plan_group_norm(n, c, hw, g, cl)
            assert p.path == "split"
            chunk_pixels = p.tiles_per_chunk * p.block_p
            c_blocks = -(-c // p.block_c)
            shape, numel = _shape_text(n, c, hw), n * c * hw
            for has_add in (False, True):
                args = dict(x_ptr=_ptr(dt), add_ptr=_ptr(dt), mean_ptr=_ptr(torch.float32), m2_ptr=_ptr(torch.float32),
                            C=c, HW=hw, chunk_pixels=chunk_pixels, tiles_per_chunk=p.tiles_per_chunk,
                            n_chunks=p.n_chunks, add_stride_n=c)
                cx = dict(CL=cl, HAS_ADD=has_add, BLOCK_C=p.block_c, BLOCK_P=p.block_p)
                # x read once; (mean, M2) float32 written per (sample, chunk, channel)
                roof = dict(shape=shape, elements=numel, programs=p.n_chunks * c_blocks * n,
                            bytes=s * numel + 8 * n * p.n_chunks * c + (s * n * c if has_add else 0),
                            loop_trips=[p.tiles_per_chunk])
                out.append(Variant("group_norm_kernels", "_gn_stats_kernel", f"{d} {lay}{' add' if has_add else ''}",
                                   args, cx, p.num_warps, FP_FUSION, roofline=roof))
            for silu in (False, True):
                args = dict(x_ptr=_ptr(dt), norm_ptr=_ptr(torch.float32), y_ptr=_ptr(dt), C=c, HW=hw)
                cx = dict(CL=cl, SILU=silu, BLOCK_C=p.block_c, BLOCK_P=p.block_p)
                # x read, y written; (centre, scale, shift) float32 per (sample, channel)
                roof = dict(shape=shape, elements=numel, programs=-(-hw // p.block_p) * c_blocks * n,
                            bytes=2 * s * numel + 12 * n * c, loop_trips=[])
                out.append(Variant("group_norm_kernels", "_gn_apply_kernel", f"{d} {lay}{' silu' if silu else ''}",
                                   args, cx, p.num_warps, FP_FUSION, roofline=roof))
            if not cl:  # the combine kernel does not see the layout
                for has_add in (False, True):
                    args = dict(mean_ptr=_ptr(torch.float32), m2_ptr=_ptr(torch.float32), add_ptr=_ptr(dt),
                                w_ptr=_ptr(dt), b_ptr=_ptr(dt), norm_ptr=_ptr(torch.float32), C=c, HW=hw, CPG=c // g,
                                chunk_pixels=chunk_pixels, n_chunks=p.n_chunks, add_stride_n=c, eps=1e-5)
                    cx = dict(HAS_ADD=has_add, HAS_WEIGHT=True, HAS_BIAS=True, BLOCK_K=p.combine_block_k,
                              BLOCK_CG=p.combine_block_cg)
                    # partial means read twice, M2 once; weight, bias (and add) read; 3 float32 per channel written
                    trips = -(-p.n_chunks // p.combine_block_k)
                    roof = dict(shape=shape, elements=numel, programs=g * n, loop_trips=[trips, trips],
                                bytes=12 * n * p.n_chunks * c + 2 * s * c + (s * n * c if has_add else 0) + 12 * n * c)
                    out.append(Variant("group_norm_kernels", "_gn_combine_kernel", f"{d}{' add' if has_add else ''}",
                                       args, cx, p.combine_warps, FP_FUSION, roofline=roof))
    return out


def update_step_variants() -> list[Variant]:
    from .update_step_kernels import (FP_FUSION, NOISE_NONE, NOISE_PHILOX, NOISE_TENSOR, cl_philox_grid,
                                      cl_philox_quads, plan_gaussian_noise, plan_update_step)

    out = []
    n, c, hw = STEP_SHAPE
    n_steps = 1000
    for dt in DTYPES:
        d = _DTYPE_NAMES[dt]
        s = _elem(dt)
        for step_kind in ("tensor", "int"):
            # device step index (CUDA-graph path): step_from_ptr = 1; Python int: coeffs stands in for step_ptr
            step = dict(step_ptr=_ptr(torch.int64), step_value=0, step_from_ptr=1) if step_kind == "tensor" else \
                dict(step_ptr=_ptr(torch.float32), step_value=17, step_from_ptr=0)
            if step_kind == "int" and dt != torch.float16:
                continue  # same code; one dtype shows the int-step specialisation compiles
            for mode, mode_name in ((NOISE_NONE, "no noise"), (NOISE_TENSOR, "noise tensor"),
                                    (NOISE_PHILOX, "philox")):
                p = plan_update_step(c, hw, "nchw", mode == NOISE_PHILOX)
                philox = mode == NOISE_PHILOX
                args = dict(x_ptr=_ptr(dt), m_ptr=_ptr(dt), z_ptr=_ptr(dt), out_ptr=_ptr(dt),
                            coeffs_ptr=_ptr(torch.float32), **step, n_steps=n_steps,
                            seeds_ptr=_ptr(torch.int64 if philox else torch.float32),
                            streams_ptr=_ptr(torch.int64 if philox else torch.float32),
                            clip_lo=-1.0, clip_hi=1.0, numel_img=c * hw)
                cx = dict(NOISE=mode, BLOCK=p.block)
                # x_t and the model output read, x_{t-1} written (+ the noise tensor read); Philox costs no bytes
                roof = dict(shape=_shape_text(n, c, hw), elements=n * c * hw, programs=-(-(c * hw) // p.block) * n,
                            bytes=(4 if mode == NOISE_TENSOR else 3) * s * n * c * hw, loop_trips=[])
                out.append(Variant("update_step_kernels", "_update_step_kernel", f"{d} nchw {mode_name} step:{step_kind}",
                                   args, cx, p.num_warps, FP_FUSION, roofline=roof))
            for cl_n, cl_c, cl_hw in STEP_CL_SHAPES:
                p = plan_update_step(cl_c, cl_hw, "channels_last", True)
                args = dict(x_ptr=_ptr(dt), m_ptr=_ptr(dt), out_ptr=_ptr(dt), coeffs_ptr=_ptr(torch.float32), **step,
                            n_steps=n_steps, seeds_ptr=_ptr(torch.int64), streams_ptr=_ptr(torch.int64),
                            clip_lo=-1.0, clip_hi=1.0, HW=cl_hw)
                units = cl_philox_quads(cl_hw, p.quads)  # pixel quads per channel
                if p.kernel == "cl_rgb":
                    kernel = "_update_step_cl_rgb_kernel"
                    cx = dict(BLOCK_Q=p.block, EVEN=p.even)
                    programs = -(-units // p.block) * cl_n
                elif p.kernel == "cl_pairs":
                    kernel = "_update_step_cl_pairs_kernel"
                    args["n_quads"] = units
                    cx = dict(C=cl_c, QUADS=p.quads, BLOCK=p.block, EVEN=p.even)
                    programs = -(-units * cl_c // p.block) * cl_n
                else:
                    kernel = "_update_step_cl_philox_kernel"
                    args["C"] = cl_c
                    cx = dict(QUADS=p.quads, BLOCK_P=p.block_p, BLOCK_C=p.block_c, FULL_C=p.full_c,
                              EXACT_C=p.exact_c)
                    programs = math.prod(cl_philox_grid(p, cl_c, cl_hw, cl_n))
                roof = dict(shape=_shape_text(cl_n, cl_c, cl_hw), elements=cl_n * cl_c * cl_hw, loop_trips=[],
                            programs=programs, bytes=3 * s * cl_n * cl_c * cl_hw)
                name = f"{d} cl philox {'quads' if p.quads else 'unaligned'} c{cl_c} step:{step_kind}"
                out.append(Variant("update_step_kernels", kernel, name, args, cx, p.num_warps, FP_FUSION,
                                   roofline=roof))
        p = plan_gaussian_noise()
        for stream_kind in ("int", "tensor"):
            stream = dict(stream_ptr=_ptr(torch.int64), stream_value=0, stream_from_ptr=1) if stream_kind == "tensor" \
                else dict(stream_ptr=_ptr(torch.int64), stream_value=5, stream_from_ptr=0)
            args = dict(out_ptr=_ptr(dt), seeds_ptr=_ptr(torch.int64), **stream, numel_img=c * hw)
            roof = dict(shape=_shape_text(n, c, hw), elements=n * c * hw, programs=-(-(c * hw) // p.block) * n,
                        bytes=s * n * c * hw, loop_trips=[])  # the noise written
            out.append(Variant("update_step_kernels", "_gaussian_noise_kernel", f"{d} stream:{stream_kind}", args,
                               dict(BLOCK=p.block), p.num_warps, FP_FUSION, roofline=roof))
    return out


def dpm_solver_variants() -> list[Variant]:
    """The DPM-Solver step (kernels/dpm_solver_kernels.py): every noise mode, both layouts, both step forms; with
    channels_last Philox noise the shapes of each kernel the plan picks (channel tile, RGB pixel quads)."""
    from .dpm_solver_kernels import FP_FUSION, plan_dpm_solver_step
    from .update_step_kernels import NOISE_NONE, NOISE_PHILOX, NOISE_TENSOR, cl_philox_grid

    cases = []  # (dtype, layout, noise mode, its name, step kind, shape)
    for dt in DTYPES:
        for layout in ("nchw", "channels_last"):
            for mode, mode_name in ((NOISE_NONE, "ode"), (NOISE_TENSOR, "noise tensor"), (NOISE_PHILOX, "philox")):
                shapes = STEP_CL_SHAPES if layout == "channels_last" and mode == NOISE_PHILOX else (STEP_SHAPE,)
                for step_kind in ("tensor", "int"):
                    if step_kind == "int" and (dt != torch.float16 or mode != NOISE_NONE):
                        continue  # same code; one variant shows the int-step specialisation compiles
                    cases += [(dt, layout, mode, mode_name, step_kind, shape) for shape in shapes]
    out = []
    for dt, layout, mode, mode_name, step_kind, (n, c, hw) in cases:
        step = dict(step_ptr=_ptr(torch.int64), step_value=0, step_from_ptr=1) if step_kind == "tensor" \
            else dict(step_ptr=_ptr(torch.float32), step_value=17, step_from_ptr=0)
        p = plan_dpm_solver_step(layout, mode == NOISE_PHILOX, c, hw)
        philox = mode == NOISE_PHILOX
        args = dict(x_ptr=_ptr(dt), m_ptr=_ptr(dt), hist_ptr=_ptr(dt), out_ptr=_ptr(dt),
                    coeffs_ptr=_ptr(torch.float32), **step, n_steps=20, K=3,
                    seeds_ptr=_ptr(torch.int64 if philox else torch.float32),
                    streams_ptr=_ptr(torch.int32 if philox else torch.float32), numel=n * c * hw)
        if p.kernel == "cl_rgb":
            kernel = "_dpm_step_cl_rgb_kernel"
            args["HW"] = hw
            cx = dict(BLOCK_Q=p.block)
            programs = -(-(hw // 4) // p.block) * n
        elif p.kernel == "cl_philox":
            kernel = "_dpm_step_cl_philox_kernel"
            args.update(C=c, HW=hw)
            cx = dict(QUADS=p.quads, BLOCK_P=p.block_p, BLOCK_C=p.block_c, FULL_C=p.full_c, EXACT_C=p.exact_c)
            programs = math.prod(cl_philox_grid(p, c, hw, n))
        else:
            kernel = "_dpm_step_kernel"
            args.update(z_ptr=_ptr(dt), numel_img=c * hw)
            cx = dict(NOISE=mode, BLOCK=p.block)
            programs = -(-(c * hw) // p.block) * n
        name = f"{_DTYPE_NAMES[dt]} {'nchw' if layout == 'nchw' else 'cl'} {mode_name}"
        if layout == "channels_last" and philox:
            name += f" {'quads' if hw % 4 == 0 else 'unaligned'} c{c}"
        s = _elem(dt)
        # a second-order step: x, m, D_{-1} read, x_{t-1}, D written (+ a noise tensor read)
        roof = dict(shape=_shape_text(n, c, hw), elements=n * c * hw, loop_trips=[], programs=programs,
                    bytes=(6 if mode == NOISE_TENSOR else 5) * s * n * c * hw)
        out.append(Variant("dpm_solver_kernels", kernel, f"{name} step:{step_kind}", args, cx, p.num_warps,
                           FP_FUSION, roofline=roof))
    return out


def all_variants() -> list[Variant]:
    return group_norm_variants() + update_step_variants() + dpm_solver_variants()


# ----------------------------------------------------------------------------------------------------------------
# Compilation
# ----------------------------------------------------------------------------------------------------------------


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(path)
    usage = {}
    for line in text.splitlines():
        if "REG:" in line:
            for item in line.split():
                if ":" in item:
                    key, _, value = item.partition(":")
                    if value.isdigit():
                        usage[key] = int(value)
    return usage


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_WIDTH = re.compile(r"\.(128|64|U16|S16|U8|S8)\b")


def parse_sass(text: str) -> list[tuple[int, bool, str, str]]:
    """(address, predicated, opcode, operands) per instruction of ``cuobjdump --dump-sass`` output (one kernel)."""
    out = []
    for line in text.splitlines():
        m = _SASS_LINE.search(line)
        if m:
            out.append((int(m.group(1), 16), bool(m.group(2)), m.group(3), m.group(4).strip()))
    return out


def _access_bits(opcode: str) -> int:
    """Bits per thread of a global load or store opcode (LDG.E.128: 128; LDG.E: 32; LDG.E.U16: 16)."""
    m = _WIDTH.search(opcode)
    if not m:
        return 32
    return {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}[m.group(1)]


def _branch_target(operands: str) -> int | None:
    target = re.match(r"(0x[0-9a-f]+)", operands)
    return int(target.group(1), 16) if target else None


def _longest_path(body: list) -> tuple[int, int]:
    """(instructions, MUFU instructions) on the longest path from the entry to an EXIT through ``body``, taking
    forward branches only: the arms of an if/else are alternatives, so only the longer one counts. Loops (backward
    branches) are walked once here; ``roofline`` adds their further trips."""
    index = {addr: i for i, (addr, *_) in enumerate(body)}
    jumps_into = [[] for _ in body]  # forward branches landing on each instruction
    for i, (addr, _, op, operands) in enumerate(body):
        t = _branch_target(operands) if op.startswith("BRA") else None
        if t is not None and t > addr and t in index:
            jumps_into[index[t]].append(i)
    best = [None] * len(body)  # (instructions, MUFU) of the longest path ending at each instruction
    for i, (_, _, op, _) in enumerate(body):
        prev = [best[j] for j in jumps_into[i] if best[j] is not None]
        if i == 0:
            prev.append((0, 0))
        elif best[i - 1] is not None:
            _, pred, prev_op, _ = body[i - 1]
            if pred or not (prev_op.startswith("BRA") or prev_op == "EXIT"):  # falls through
                prev.append(best[i - 1])
        if prev:
            n, mufu = max(prev)
            best[i] = (n + 1, mufu + op.startswith("MUFU"))
    ends = [best[i] for i, (_, _, op, _) in enumerate(body) if (op == "EXIT" or i == len(body) - 1) and best[i]]
    return max(ends)


def sass_profile(text: str) -> dict:
    """The hot code of one kernel's SASS: the body up to the first unconditional EXIT and its loops.

    Returns ``body`` (instructions on the longest path from the entry to an EXIT: of an if/else only the longer
    arm counts), ``straight_line`` (every instruction up to that EXIT, both arms), ``loops`` (instructions in
    each loop body, in program order: the range from a backward branch's target to the branch), ``mufu`` /
    ``loop_mufu`` (special-function instructions on that path and in each loop) and ``loads`` / ``stores``
    (global access width in bits -> count, in the body).
    """
    insts = parse_sass(text)
    end = next((i for i, (_, pred, op, _) in enumerate(insts) if op == "EXIT" and not pred), len(insts) - 1)
    body = insts[:end + 1]
    addr_index = {a: i for i, (a, *_) in enumerate(body)}
    loops = []
    for i, (addr, _, op, operands) in enumerate(body):
        t = _branch_target(operands) if op.startswith("BRA") else None
        if t is not None and t < addr and t in addr_index:
            loops.append(body[addr_index[t]:i + 1])
    loads, stores = {}, {}
    for _, _, op, _ in body:
        if op.startswith("LDG"):
            loads[_access_bits(op)] = loads.get(_access_bits(op), 0) + 1
        elif op.startswith("STG"):
            stores[_access_bits(op)] = stores.get(_access_bits(op), 0) + 1
    mufu = lambda seq: sum(op.startswith("MUFU") for _, _, op, _ in seq)  # noqa: E731
    path, path_mufu = _longest_path(body)
    return {"body": path, "straight_line": len(body), "loops": [len(loop) for loop in loops], "mufu": path_mufu,
            "loop_mufu": [mufu(loop) for loop in loops], "loads": loads, "stores": stores}


def roofline(profile: dict, variant: Variant, constants: dict = H200) -> dict:
    """Predicted H200 bounds of one launch at the variant's stated shape (see the module docstring)."""
    roof = variant.roofline
    trips = list(roof["loop_trips"])
    loops, loop_mufu = profile["loops"], profile["loop_mufu"]
    if len(loops) != len(trips):
        if loops or any(t > 1 for t in trips):  # a loop of one trip may be folded away by the compiler
            raise RuntimeError(f"roofline: expected {len(trips)} loop(s) in the SASS, found {len(loops)}")
        trips = []
    # per thread: the straight-line code once, each loop body once per trip (its first pass is in ``body``)
    per_thread = profile["body"] + sum(n * (t - 1) for n, t in zip(loops, trips))
    mufu_per_thread = profile["mufu"] + sum(n * (t - 1) for n, t in zip(loop_mufu, trips))
    threads = roof["programs"] * variant.num_warps * 32
    elements = roof["elements"]
    warp_insts = roof["programs"] * variant.num_warps * per_thread
    clock = constants["clock_hz"]
    memory_s = roof["bytes"] / constants["hbm_bytes_per_s"]
    issue_s = warp_insts / (constants["sms"] * constants["schedulers_per_sm"] * clock)
    mufu_s = threads * mufu_per_thread / (constants["sms"] * constants["mufu_lanes_per_sm_per_cycle"] * clock)
    bounds = {"memory": memory_s, "issue": issue_s, "mufu": mufu_s}
    bound = max(bounds, key=bounds.get)
    return {
        "shape": roof["shape"], "elements": elements, "programs": roof["programs"],
        "loop_sass": max(loops) if loops else profile["body"],
        "sass_per_element": threads * per_thread / elements,
        "mufu_per_element": threads * mufu_per_thread / elements,
        "bytes_per_element": roof["bytes"] / elements,
        "load_bits": max(profile["loads"], default=None), "store_bits": max(profile["stores"], default=None),
        "global_loads": {str(k): v for k, v in sorted(profile["loads"].items())},
        "global_stores": {str(k): v for k, v in sorted(profile["stores"].items())},
        "predicted_memory_us": memory_s * 1e6, "predicted_issue_us": issue_s * 1e6,
        "predicted_mufu_us": mufu_s * 1e6, "predicted_bound": bound,
        "memory_margin": memory_s / max(issue_s, mufu_s) - 1,
    }


def _sass(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        return subprocess.run([_cuobjdump(), "--dump-sass", path], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(path)


ROOFLINE_TARGET = 90
ROOFLINE_KEYS = ("shape", "elements", "programs", "loop_sass", "sass_per_element", "mufu_per_element",
                 "bytes_per_element", "load_bits", "store_bits", "global_loads", "global_stores",
                 "predicted_memory_us", "predicted_issue_us", "predicted_mufu_us", "predicted_bound", "memory_margin")


def compile_one(variant: Variant, cc: int) -> dict:
    """Compile one variant for sm_<cc>; returns a table row (``error`` set when it failed)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = dict(kernel=variant.kernel, variant=variant.variant, target=f"sm_{cc}", num_warps=variant.num_warps)
    start = time.perf_counter()
    try:
        module = importlib.import_module(f"fastdiff.kernels.{variant.module}")
        fn = getattr(module, variant.kernel)
        if not isinstance(fn, triton.runtime.JITFunction):
            raise RuntimeError("kernels were imported under TRITON_INTERPRET=1; compile in a fresh process")
        signature, consts, attrs = _signature(fn, variant.args, variant.constexprs)
        src = ASTSource(fn, signature, consts, attrs)
        options = dict(num_warps=variant.num_warps, num_stages=1, enable_fp_fusion=variant.fp_fusion)
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
        usage = _resource_usage(compiled.asm["cubin"])
        row.update(registers=usage.get("REG"), spills=usage.get("STACK", 0) + usage.get("LOCAL", 0),
                   shared=int(compiled.metadata.shared), error=None)
        if cc == ROOFLINE_TARGET and variant.roofline:
            row.update(roofline(sass_profile(_sass(compiled.asm["cubin"])), variant))
        else:
            row.update({k: None for k in ROOFLINE_KEYS})
            row["roofline_reason"] = "the static roofline models an H200 (sm_90) only"
    except Exception as exc:  # reported per variant; main() turns it into a failure
        row.update(registers=None, spills=None, shared=None, error=f"{type(exc).__name__}: {exc}"[:2000])
        row.update({k: None for k in ROOFLINE_KEYS if k not in row})
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def _worker_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)  # before any kernel module is imported in this process
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence the unset-default warning (set per launch)


def _compile_task(task):
    variant, cc = task
    return compile_one(variant, cc)


def compile_variants(targets=(80, 90), jobs: int | None = None, variants: list[Variant] | None = None) -> list[dict]:
    """Compile every variant (or ``variants``) for each target and return one row per (variant, target).

    Rows: kernel, variant, target, num_warps, registers, spills (bytes of stack + local memory per thread),
    shared (bytes), error (None when it compiled), seconds. Compiles in ``jobs`` worker processes started
    without TRITON_INTERPRET (default: up to 4, one per CPU).
    """
    variants = all_variants() if variants is None else variants
    tasks = [(v, int(cc)) for cc in targets for v in variants]
    if not tasks:
        return []
    jobs = jobs or max(1, min(4, os.cpu_count() or 1, len(tasks)))
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init) as pool:
        return list(pool.map(_compile_task, tasks))


def format_table(rows: list[dict]) -> str:
    head = f"{'kernel':<30} {'variant':<38} {'target':<6} {'warps':>5} {'regs':>5} {'spills':>6} {'shared':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["error"]:
            lines.append(f"{r['kernel']:<30} {r['variant']:<38} {r['target']:<6} FAILED: {r['error'].splitlines()[0]}")
        else:
            lines.append(f"{r['kernel']:<30} {r['variant']:<38} {r['target']:<6} {r['num_warps']:>5} "
                         f"{r['registers']:>5} {r['spills']:>6} {r['shared']:>7}")
    return "\n".join(lines)


def split_path_rows(rows: list[dict]) -> list[dict]:
    """The split GroupNorm path as a whole: stats + combine + apply per (dtype, layout, add, silu), summed.

    Only for sm_90 rows with a roofline; registers are the largest of the three kernels, spills their sum.
    """
    by = {(r["kernel"], r["variant"]): r for r in rows
          if r["target"] == f"sm_{ROOFLINE_TARGET}" and not r["error"] and r.get("sass_per_element") is not None}
    out = []
    for d in _DTYPE_NAMES.values():
        for lay in ("nchw", "cl"):
            for add in ("", " add"):
                for silu in ("", " silu"):
                    parts = [by.get(("_gn_stats_kernel", f"{d} {lay}{add}")), by.get(("_gn_combine_kernel", f"{d}{add}")),
                             by.get(("_gn_apply_kernel", f"{d} {lay}{silu}"))]
                    if any(p is None for p in parts):
                        continue
                    row = dict(kernel="group_norm_split", variant=f"{d} {lay}{add}{silu}",
                               target=f"sm_{ROOFLINE_TARGET}", num_warps=max(p["num_warps"] for p in parts),
                               registers=max(p["registers"] for p in parts), spills=sum(p["spills"] for p in parts),
                               shared=max(p["shared"] for p in parts), error=None, shape=parts[0]["shape"],
                               elements=parts[0]["elements"], programs=sum(p["programs"] for p in parts),
                               parts=["_gn_stats_kernel", "_gn_combine_kernel", "_gn_apply_kernel"])
                    for key in ("sass_per_element", "mufu_per_element", "bytes_per_element", "predicted_memory_us",
                                "predicted_issue_us", "predicted_mufu_us"):
                        row[key] = sum(p[key] for p in parts)
                    row["loop_sass"] = max(p["loop_sass"] for p in parts)
                    row["load_bits"] = min(p["load_bits"] for p in (parts[0], parts[2]))
                    row["store_bits"] = parts[2]["store_bits"]
                    bounds = {"memory": row["predicted_memory_us"], "issue": row["predicted_issue_us"],
                              "mufu": row["predicted_mufu_us"]}
                    row["predicted_bound"] = max(bounds, key=bounds.get)
                    row["memory_margin"] = bounds["memory"] / max(bounds["issue"], bounds["mufu"]) - 1
                    out.append(row)
    return out


# The variants the sampler runs every step at scale: goal memory-bound with >= 15% margin (issue 9). Not hot:
# the Python-int step index (the graphed loop passes a device tensor), GroupNorm without affine (every UNet norm
# has one) and the unaligned channels_last Philox step (H * W % 4 != 0 needs odd H or W, which no UNet that
# down-samples even once accepts; the kernel runs for direct calls and is still listed with its margin).
HOT_KERNELS = ("_gn_single_kernel", "group_norm_split", "_update_step_kernel", "_update_step_cl_philox_kernel",
               "_update_step_cl_pairs_kernel", "_update_step_cl_rgb_kernel")
MARGIN_GOAL = 0.15


def is_hot(row: dict) -> bool:
    variant = row["variant"]
    return (row["kernel"] in HOT_KERNELS and "no-affine" not in variant and "step:int" not in variant
            and "unaligned" not in variant)


def format_roofline(rows: list[dict]) -> str:
    """The static roofline table of the sm_90 rows (hot variants marked with *)."""
    rows = [r for r in rows if not r["error"] and r.get("sass_per_element") is not None]
    if not rows:
        return ""
    c = H200
    head = (f"{'kernel':<30} {'variant':<34} {'shape':<16} {'SASS/el':>7} {'MUFU/el':>7} {'B/el':>5} {'ld/st':>7} "
            f"{'mem us':>8} {'issue us':>8} {'mufu us':>8} {'bound':>6} {'margin':>7}")
    lines = [f"Static roofline on an H200 (sm_90 SASS; memory {c['hbm_bytes_per_s'] / 1e12:.1f} TB/s, issue "
             f"{c['sms']} SMs x {c['schedulers_per_sm']} warp instructions per cycle, MUFU {c['sms']} x "
             f"{c['mufu_lanes_per_sm_per_cycle']} lanes per cycle, {c['clock_hz'] / 1e9:.2f} GHz); * = hot variant, "
             f"goal memory-bound with margin >= {MARGIN_GOAL:.0%}", head, "-" * len(head)]
    for r in rows:
        ldst = f"{r['load_bits'] or '-'}/{r['store_bits'] or '-'}"
        mark = "*" if is_hot(r) else " "
        lines.append(f"{mark}{r['kernel']:<29} {r['variant']:<34} {r['shape']:<16} {r['sass_per_element']:>7.1f} "
                     f"{r['mufu_per_element']:>7.2f} {r['bytes_per_element']:>5.2f} {ldst:>7} "
                     f"{r['predicted_memory_us']:>8.1f} {r['predicted_issue_us']:>8.1f} {r['predicted_mufu_us']:>8.1f} "
                     f"{r['predicted_bound']:>6} {r['memory_margin']:>+7.0%}")
    hot = [r for r in rows if is_hot(r)]
    if hot:
        ok = [r for r in hot if r["memory_margin"] >= MARGIN_GOAL]
        lines.append(f"hot variants memory-bound with >= {MARGIN_GOAL:.0%} margin: {len(ok)} of {len(hot)}")
        for r in hot:
            if r["memory_margin"] < MARGIN_GOAL:
                lines.append(f"  short of the goal: {r['kernel']} [{r['variant']}]: {r['predicted_bound']}-bound, "
                             f"margin {r['memory_margin']:+.0%}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """``fastdiff kernels``: print the resource table; exit status 1 if a variant fails or spills."""
    parser = argparse.ArgumentParser(prog="fastdiff kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="sm_80,sm_90", help="comma-separated targets, e.g. sm_80,sm_90")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: up to 4)")
    parser.add_argument("--kernels", default=None, help="comma-separated @triton.jit names to compile (default: all)")
    args = parser.parse_args(argv)
    try:
        targets = [int(t.strip().lower().removeprefix("sm_").removeprefix("sm")) for t in args.target.split(",") if t]
    except ValueError:
        parser.error(f"--target {args.target!r}: expected a list like sm_80,sm_90")
    start = time.perf_counter()
    variants = all_variants()
    if args.kernels:
        names = {k.strip() for k in args.kernels.split(",") if k.strip()}
        unknown = names - {v.kernel for v in variants}
        if unknown:
            parser.error(f"--kernels: unknown kernel(s) {sorted(unknown)}")
        variants = [v for v in variants if v.kernel in names]
    rows = compile_variants(targets, jobs=args.jobs, variants=variants)
    print(format_table(rows))
    failed = [r for r in rows if r["error"]]
    spilled = [r for r in rows if not r["error"] and r["spills"]]
    print(f"{len(rows)} variants, {len(failed)} failed, {len(spilled)} spilled, {time.perf_counter() - start:.0f} s")
    rows += split_path_rows(rows)
    table = format_roofline(rows)
    if table:
        print("\n" + table)
    if args.json:
        from fastdiff.fileio import atomic_write_text

        atomic_write_text(args.json, json.dumps(rows, indent=1) + "\n")
    return 1 if failed or spilled else 0


if __name__ == "__main__":
    sys.exit(main())
