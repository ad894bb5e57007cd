#!/usr/bin/env python
"""Plant known bugs one at a time on a copy of the repository and check that the tests catch each.

Each mutant is one or more exact textual replacements (file, old text, new text) and the tests that should
catch it. The script copies the working tree (tracked and untracked, not ignored, files: uncommitted edits
included) to a temporary folder, checks that every selection passes there unmutated, then for each mutant:
applies its replacements, runs its tests with pytest, restores the files. A mutant is

* caught: pytest reports failing tests (exit status 1);
* survived: its tests pass (exit status 0);
* error: anything else (no tests collected, usage error, timeout), or its pattern is not found exactly as often
  as the table says (the code moved on: refresh the table).

Exit status 0 only when every mutant is caught.

    PYTHONPATH=. python scripts/mutants.py                  # all mutants
    PYTHONPATH=. python scripts/mutants.py gn-eps seed-32   # some, by name
    PYTHONPATH=. python scripts/mutants.py --list

To add a mutant, add a row to MUTANTS: keep ``old`` short but unique (``count`` says how many times it occurs;
every occurrence is replaced) and ``tests`` as narrow as still catches it (the run is one pytest per mutant).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Edit:
    path: str  # relative to the repository root
    old: str  # exact text to replace
    new: str
    count: int = 1  # occurrences of ``old`` expected in the file (all are replaced)


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    bug: str  # what the planted bug does, in words
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]  # pytest arguments: files, node ids, -k expressions


GN = "kernels/group_norm_kernels.py"
STEP = "kernels/update_step_kernels.py"
GN_TESTS = "tests/test_kernel_group_norm.py"

MUTANTS = [
    # Update-step kernels: only the first block of each image written.
    Mutant("step-flat-pid0", "flat update-step kernel: program_id(0) replaced by 0",
           (Edit(STEP, "    pid = tl.program_id(0)\n    img = tl.program_id(1)\n    c, stream = _load_step(",
                 "    pid = 0\n    img = tl.program_id(1)\n    c, stream = _load_step("),),
           ("tests/test_kernel_update_step.py",)),
    Mutant("step-cl-pid_p0", "channels_last Philox update-step kernel: pid_p replaced by 0",
           (Edit(STEP, "pid_p = tl.program_id(0)", "pid_p = 0"),),
           ("tests/test_kernel_update_step.py",)),
    # GroupNorm
    Mutant("gn-combine-reset", "split GroupNorm: the combine loop resets its accumulator every pass",
           (Edit(GN, "acc += n_k[:, None] * mean_k", "acc = n_k[:, None] * mean_k"),),
           (GN_TESTS, "-k", "combine or split_path")),
    Mutant("gn-combine-reset-m2", "split GroupNorm: the combine loop resets its M2 accumulator every pass",
           (Edit(GN, "acc += tl.where(mask, m2_k", "acc = tl.where(mask, m2_k"),),
           (GN_TESTS, "-k", "combine or split_path")),
    Mutant("gn-no-eps", "GroupNorm ignores eps (both paths)",
           (Edit(GN, "tl.sqrt_rn(var + eps)", "tl.sqrt_rn(var)", count=2),),
           (GN_TESTS, "-k", "eps")),
    Mutant("gn-half-stats-single", "single-path GroupNorm: statistics in the input's half precision",
           (Edit(GN, "x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)\n    count = HW",
                 "x = tl.load(x_ptr + offs, mask=mask, other=0.0)\n    count = HW"),),
           (GN_TESTS, "-k", "f16 or bf16 or float16 or bfloat16 or half")),
    # (dropping the split stats pass's upcast changes nothing since its Welford slots are float32: the half
    # precision bug there is partial statistics kept at the input's precision)
    Mutant("gn-half-stats-split", "split-path GroupNorm: partial means rounded to the input's half precision",
           (Edit(GN, "tl.store(mean_ptr + out, mean, mask=cmask)",
                 "tl.store(mean_ptr + out, mean.to(x_ptr.dtype.element_ty).to(tl.float32), mask=cmask)"),),
           (GN_TESTS, "-k", "f16 or bf16 or float16 or bfloat16 or half")),
    # Image-to-image
    Mutant("img2img-start-minus-1", "image-to-image noises the init to timesteps[start - 1]",
           (Edit("fastdiff/sampling.py", "plan.timesteps[start]", "plan.timesteps[start - 1]"),),
           ("tests/test_img2img.py",)),
    Mutant("img2img-max-timestep", "image-to-image noises the init to the largest timestep",
           (Edit("fastdiff/sampling.py", "plan.timesteps[start]", "plan.timesteps[0]"),),
           ("tests/test_img2img.py",)),
    # Training
    Mutant("train-t-zero", "training never shows the model its timestep",
           (Edit("fastdiff/train.py", "model(x_t, t)", "model(x_t, t * 0)"),),
           ("tests/test_train.py", "-k", "objective")),
    # Philox: one constant changed in the kernel and the reference together
    Mutant("philox-constant", "Philox round multiplier changed in kernel and reference alike",
           (Edit(STEP, "tl.constexpr(0xD2511F53)", "tl.constexpr(0xD2511F55)"),
            Edit("fastdiff/ops/noise.py", "PHILOX_ROUND_A = 0xD2511F53", "PHILOX_ROUND_A = 0xD2511F55")),
           ("tests/test_noise.py",)),
    # Benchmarks
    Mutant("bench-constant-calls", "benchmark per-call timing replaced by a constant",
           (Edit("bench/common.py", "samples.append(time.perf_counter() - t0)", "samples.append(1e-3)"),),
           ("tests/test_bench.py", "-k", "known_duration")),
    Mutant("bench-constant-run", "benchmark run timing replaced by a constant",
           (Edit("bench/common.py", "return time.perf_counter() - t0, out", "return 0.5, out"),),
           ("tests/test_bench.py", "-k", "known_duration")),
    # Seeds
    Mutant("seed-32", "base seed truncated to 32 bits",
           (Edit("fastdiff/sampling.py", "    seed = check_seed(seed)\n",
                 "    seed = check_seed(seed) & 0xFFFFFFFF\n"),),
           ("tests/test_sampling.py", "tests/test_cli.py", "-k", "seed")),
]


def source_files(root: str) -> list[str]:
    """Tracked and untracked (not ignored) files of the working tree, relative to ``root``."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         check=True, capture_output=True).stdout.decode()
    return [p for p in out.split("\0") if p and os.path.isfile(os.path.join(root, p))]


def copy_tree(root: str, dest: str) -> None:
    for rel in source_files(root):
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(root, rel), target)


def run_tests(tree: str, tests: tuple[str, ...], timeout: float) -> tuple[int | None, str]:
    """(pytest exit status or None on timeout, last lines of its output), run in ``tree`` as a fresh process."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = tree  # the copy's fastdiff, not an installed one
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", *tests]
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return proc.returncode, "\n".join(lines[-3:])


def apply(tree: str, edits: tuple[Edit, ...]) -> dict[str, str]:
    """Apply ``edits``; returns the original text of every file touched. Raises ValueError on a pattern that is
    not found exactly ``count`` times (nothing is left modified then)."""
    originals: dict[str, str] = {}
    try:
        for e in edits:
            path = os.path.join(tree, e.path)
            with open(path) as f:
                text = f.read()
            originals.setdefault(e.path, text)
            found = text.count(e.old)
            if found != e.count:
                raise ValueError(f"{e.path}: pattern {e.old!r} found {found} times, expected {e.count}; "
                                 "the code changed: refresh this mutant in scripts/mutants.py")
            with open(path, "w") as f:
                f.write(text.replace(e.old, e.new))
    except Exception:
        restore(tree, originals)
        raise
    return originals


def restore(tree: str, originals: dict[str, str]) -> None:
    for rel, text in originals.items():
        with open(os.path.join(tree, rel), "w") as f:
            f.write(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="mutants to plant (default: all)")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of each test selection")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per pytest run (default 1200)")
    args = p.parse_args(argv)
    known = {m.name: m for m in MUTANTS}
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:24s} {m.bug}\n{'':24s} tests: {' '.join(m.tests)}")
        return 0
    unknown = [n for n in args.names if n not in known]
    if unknown:
        p.error(f"unknown mutants {unknown}; see --list")
    chosen = [known[n] for n in args.names] if args.names else MUTANTS

    with tempfile.TemporaryDirectory(prefix="fastdiff-mutants-") as tree:
        copy_tree(ROOT, tree)
        print(f"copy of {ROOT} in {tree}", flush=True)
        if not args.no_baseline:
            for tests in dict.fromkeys(m.tests for m in chosen):
                rc, tail = run_tests(tree, tests, args.timeout)
                if rc != 0:
                    print(f"baseline FAILED (exit {rc}) for {' '.join(tests)}: the unmutated tests must pass first\n"
                          f"{tail}")
                    return 2
                print(f"baseline ok: {' '.join(tests)}", flush=True)
        results = []
        for m in chosen:
            start = time.monotonic()
            try:
                originals = apply(tree, m.edits)
            except ValueError as exc:
                results.append((m, "error", str(exc)))
                print(f"{m.name:24s} ERROR     {exc}", flush=True)
                continue
            try:
                rc, tail = run_tests(tree, m.tests, args.timeout)
            finally:
                restore(tree, originals)
            verdict = {0: "survived", 1: "caught"}.get(rc, "error")
            detail = tail.splitlines()[-1] if tail else ""
            results.append((m, verdict, detail))
            print(f"{m.name:24s} {verdict.upper():9s} {time.monotonic() - start:6.1f} s  {detail}", flush=True)

    caught = sum(v == "caught" for _, v, _ in results)
    print(f"\n{caught} of {len(results)} mutants caught")
    for m, verdict, detail in results:
        if verdict != "caught":
            print(f"  {verdict}: {m.name} ({m.bug}): {detail}")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
