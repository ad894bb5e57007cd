"""SASS instructions per element of the update-step kernels, per coefficient-row path, without a GPU.

Compiles every update-step variant of kernels/compile_check.py for one target, disassembles the cubin with the
cuobjdump that ships with Triton, and counts the instructions one thread executes from entry to EXIT, divided
by the elements a thread handles (BLOCK / (32 num_warps)). The kernels have no loops, only uniform branches on
the coefficient row, so each path is a straight walk: "ddpm" (no eps term), "ddim eps=m" (epsilon-prediction
DDIM rows), "general" (every term). The masked tail's early EXIT is not taken (a full block).

    PYTHONPATH=. python scripts/update_step_sass.py [--target 90]
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for real targets

_LINE = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"(@!?U?P\d\s+)?BRA\s+(0x[0-9a-f]+)")


def disassemble(variant, cc: int) -> list[tuple[int, str]]:
    """(address, instruction) of the variant's cubin for sm_<cc>."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastdiff.kernels import compile_check

    fn = getattr(importlib.import_module(f"fastdiff.kernels.{variant.module}"), variant.kernel)
    signature, consts, attrs = compile_check._signature(fn, variant.args, variant.constexprs)
    compiled = triton.compile(ASTSource(fn, signature, consts, attrs), target=GPUTarget("cuda", cc, 32),
                              options=dict(num_warps=variant.num_warps, num_stages=1,
                                           enable_fp_fusion=variant.fp_fusion))
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        text = subprocess.run([compile_check._cuobjdump(), "--dump-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(f.name)
    return [(int(m.group(1), 16), m.group(2)) for m in map(_LINE.match, text.splitlines()) if m]


def walk(code: list[tuple[int, str]], choices: str) -> int:
    """Instructions executed from entry to EXIT, taking conditional branch k iff choices[k] == 't'."""
    index = {address: i for i, (address, _) in enumerate(code)}
    i, count, k = 0, 0, 0
    while i < len(code):
        op = code[i][1]
        if op.startswith("NOP"):
            i += 1
            continue
        count += 1
        if op == "EXIT":
            break
        m = _BRANCH.match(op)
        if m and (m.group(1) is None or (k < len(choices) and choices[k] == "t")):
            k += m.group(1) is not None
            i = index[int(m.group(2), 16)]
            continue
        k += bool(m)
        i += 1
    return count


def elements_per_thread(variant) -> float:
    cx = variant.constexprs
    per_program = cx["BLOCK"] if "BLOCK" in cx else cx["BLOCK_P"] * cx["BLOCK_C"] * (4 if cx["QUADS"] else 1)
    return per_program / (32 * variant.num_warps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=int, default=90, help="compute capability, e.g. 80 or 90")
    args = parser.parse_args()
    from fastdiff.kernels import compile_check

    print(f"{'kernel':<31}{'variant':<40}{'ddpm':>7}{'eps=m':>7}{'general':>8}  global accesses")
    for v in compile_check.update_step_variants():
        if "step:int" in v.variant or v.kernel == "_gaussian_noise_kernel":
            continue
        code = disassemble(v, args.target)
        per = elements_per_thread(v)
        # uniform branches: every path is some choice string; shortest = ddpm, longest = general, else eps = m
        counts = sorted({walk(code, choices) / per for choices in ("", "t", "tt", "tn", "nt")})
        ddpm, eps_m, general = counts[0], counts[min(1, len(counts) - 1)], counts[-1]
        unpredicated = [op.split(None, 1)[1] if op.startswith("@") else op for _, op in code]
        widths = sorted({op.split()[0] for op in unpredicated if re.match(r"(LDG|STG)\.E", op)} - {"LDG.E"})
        print(f"{v.kernel:<31}{v.variant:<40}{ddpm:7.1f}{eps_m:7.1f}{general:8.1f}  {' '.join(widths)}")


if __name__ == "__main__":
    main()
