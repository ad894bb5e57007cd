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
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
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

# Representative shapes: the largest group the single path takes (256 channels, 32 groups, 32x32) and a
# 16x128x256x256 activation for the split path; a 16x3x256x256 image for the update step.
GN_SINGLE_SHAPE = (2, 256, 32 * 32, 32)
GN_SPLIT_SHAPE = (16, 128, 256 * 256, 32)
STEP_SHAPE = (16, 3, 256 * 256)


def group_norm_variants() -> list[Variant]:
    from .group_norm_kernels import FP_FUSION, cpg_align, plan_group_norm

    out = []
    for dt in DTYPES:
        d = _DTYPE_NAMES[dt]
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
                        out.append(Variant("group_norm_kernels", "_gn_single_kernel", name, args, cx, p.num_warps, FP_FUSION))
            n, c, hw, g = GN_SPLIT_SHAPE
            p = plan_group_norm(n, c, hw, g, cl)
            assert p.path == "split"
            chunk_pixels = p.tiles_per_chunk * p.block_p
            for has_add in (False, True):
                args = dict(x_ptr=_ptr(dt), add_ptr=_ptr(dt), mean_ptr=_ptr(torch.float32), m2_ptr=_ptr(torch.float32),
                            C=c, HW=hw, chunk_pixels=chunk_pixels, tiles_per_chunk=p.tiles_per_chunk,
                            n_chunks=p.n_chunks, add_stride_n=c)
                cx = dict(CL=cl, HAS_ADD=has_add, BLOCK_C=p.block_c, BLOCK_P=p.block_p)
                out.append(Variant("group_norm_kernels", "_gn_stats_kernel", f"{d} {lay}{' add' if has_add else ''}", args, cx,
                                   p.num_warps, FP_FUSION))
            for silu in (False, True):
                args = dict(x_ptr=_ptr(dt), norm_ptr=_ptr(torch.float32), y_ptr=_ptr(dt), C=c, HW=hw)
                cx = dict(CL=cl, SILU=silu, BLOCK_C=p.block_c, BLOCK_P=p.block_p)
                out.append(Variant("group_norm_kernels", "_gn_apply_kernel", f"{d} {lay}{' silu' if silu else ''}", args, cx,
                                   p.num_warps, FP_FUSION))
            if not cl:  # the combine kernel does not see the layout
                for has_add in (False, True):
                    args = dict(mean_ptr=_ptr(torch.float32), m2_ptr=_ptr(torch.float32), add_ptr=_ptr(dt),
                                w_ptr=_ptr(dt), b_ptr=_ptr(dt), norm_ptr=_ptr(torch.float32), C=c, HW=hw, CPG=c // g,
                                chunk_pixels=chunk_pixels, n_chunks=p.n_chunks, add_stride_n=c, eps=1e-5)
                    cx = dict(HAS_ADD=has_add, HAS_WEIGHT=True, HAS_BIAS=True, BLOCK_K=p.combine_block_k,
                              BLOCK_CG=p.combine_block_cg)
                    out.append(Variant("group_norm_kernels", "_gn_combine_kernel", f"{d}{' add' if has_add else ''}", args,
                                       cx, p.combine_warps, FP_FUSION))
    return out


def update_step_variants() -> list[Variant]:
    from .update_step_kernels import FP_FUSION, NOISE_NONE, NOISE_PHILOX, NOISE_TENSOR, plan_gaussian_noise, plan_update_step

    out = []
    n, c, hw = STEP_SHAPE
    n_steps = 1000
    for dt in DTYPES:
        d = _DTYPE_NAMES[dt]
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
                out.append(Variant("update_step_kernels", "_update_step_kernel", f"{d} nchw {mode_name} step:{step_kind}",
                                   args, cx, p.num_warps, FP_FUSION))
            for cl_c, cl_hw in ((4, 64 * 64), (3, 7 * 7)):
                p = plan_update_step(cl_c, cl_hw, "channels_last", True)
                args = dict(x_ptr=_ptr(dt), m_ptr=_ptr(dt), out_ptr=_ptr(dt), coeffs_ptr=_ptr(torch.float32), **step,
                            n_steps=n_steps, seeds_ptr=_ptr(torch.int64), streams_ptr=_ptr(torch.int64),
                            clip_lo=-1.0, clip_hi=1.0, C=cl_c, HW=cl_hw)
                cx = dict(QUADS=p.quads, BLOCK_P=p.block_p, BLOCK_C=p.block_c)
                out.append(Variant("update_step_kernels", "_update_step_cl_philox_kernel",
                                   f"{d} cl philox {'quads' if p.quads else 'per-element'} step:{step_kind}", args, cx,
                                   p.num_warps, FP_FUSION))
        p = plan_gaussian_noise()
        for stream_kind in ("int", "tensor"):
            stream = dict(stream_ptr=_ptr(torch.int64), stream_value=0, stream_from_ptr=1) if stream_kind == "tensor" \
                else dict(stream_ptr=_ptr(torch.int64), stream_value=5, stream_from_ptr=0)
            args = dict(out_ptr=_ptr(dt), seeds_ptr=_ptr(torch.int64), **stream, numel_img=c * hw)
            out.append(Variant("update_step_kernels", "_gaussian_noise_kernel", f"{d} stream:{stream_kind}", args,
                               dict(BLOCK=p.block), p.num_warps, FP_FUSION))
    return out


def dpm_solver_variants() -> list[Variant]:
    """The DPM-Solver step (kernels/dpm_solver_kernels.py): every noise mode, both layouts, both step forms."""
    from .dpm_solver_kernels import FP_FUSION, NOISE_NONE, NOISE_PHILOX, NOISE_TENSOR, plan_dpm_solver_step

    out = []
    n, c, hw = STEP_SHAPE
    for dt in DTYPES:
        for layout in ("nchw", "channels_last"):
            for mode, mode_name in ((NOISE_NONE, "ode"), (NOISE_TENSOR, "noise tensor"), (NOISE_PHILOX, "philox")):
                for step_kind in ("tensor", "int"):
                    if step_kind == "int" and (dt != torch.float16 or mode != NOISE_NONE):
                        continue  # same code; one variant shows the int-step specialisation compiles
                    step = dict(step_ptr=_ptr(torch.int64), step_value=0, step_from_ptr=1) if step_kind == "tensor" \
                        else dict(step_ptr=_ptr(torch.float32), step_value=17, step_from_ptr=0)
                    p = plan_dpm_solver_step(layout, mode == NOISE_PHILOX)
                    philox = mode == NOISE_PHILOX
                    args = dict(x_ptr=_ptr(dt), m_ptr=_ptr(dt), z_ptr=_ptr(dt), hist_ptr=_ptr(dt), out_ptr=_ptr(dt),
                                coeffs_ptr=_ptr(torch.float32), **step, n_steps=20, K=3,
                                seeds_ptr=_ptr(torch.int64 if philox else torch.float32),
                                streams_ptr=_ptr(torch.int32 if philox else torch.float32),
                                numel_img=c * hw, numel=n * c * hw, C=c, HW=hw)
                    cx = dict(NOISE=mode, CL=layout == "channels_last", BLOCK=p.block)
                    name = f"{_DTYPE_NAMES[dt]} {'cl' if layout != 'nchw' else 'nchw'} {mode_name} step:{step_kind}"
                    out.append(Variant("dpm_solver_kernels", "_dpm_step_kernel", name, args, cx, p.num_warps,
                                       FP_FUSION))
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
    except Exception as exc:  # reported per variant; main() turns it into a failure
        row.update(registers=None, spills=None, shared=None, error=f"{type(exc).__name__}: {exc}"[:2000])
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failed or spilled else 0


if __name__ == "__main__":
    sys.exit(main())
