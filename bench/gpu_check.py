"""The one-call GPU check: ``PYTHONPATH=. python bench/gpu_check.py OUTDIR`` from the repository root.

On a machine with a CUDA GPU it runs, each part in its own process with its own time limit and the whole
within 8 minutes:

1. the GPU-marked tests (``pytest -m gpu``: graph replays against eager sampling, attention backends, ...);
2. the kernel tests on the real GPU (no ``TRITON_INTERPRET``);
3. the compile check (``fastdiff kernels`` for this GPU's target: registers, spills, shared memory);
4. ``fastdiff bench kernels --preset short`` and 5. ``fastdiff bench sampling --preset short``.

It uses only what is installed (no network) and writes into OUTDIR: ``gpu_check.log`` (every part's output),
``gpu_check.json`` (provenance, each part's status, test counts, compile-check rows and the benchmarks'
headline ratios) and the benchmark reports ``kernels.{json,md,png}`` and ``sampling.{json,md,png}``.
Exit status 0 when every part passed; 2 without CUDA.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `bench` and `fastdiff` importable from the checkout
    sys.path.insert(0, str(ROOT))

TOTAL_LIMIT_S = 470  # under the 8 minutes promised, with room for start-up and the summary
# Seconds a benchmark part keeps between its --time-budget and its hard limit (one case or run can outlast the
# budget: a sampling run with torch.compile compiles first).
BENCH_MARGIN_S = {"bench kernels": 25, "bench sampling": 45}
# Files holding the kernel tests (whichever exist).
KERNEL_TEST_PATTERNS = ("tests/test_kernel*.py", "tests/test_group_norm*.py", "tests/test_update_step*.py",
                        "tests/test_noise*.py", "tests/test_ops*.py")  # the compile check is a part of its own


def kernel_test_files() -> list[str]:
    return sorted({f for pattern in KERNEL_TEST_PATTERNS for f in glob.glob(str(ROOT / pattern))})


def _env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the kernels must compile for the real GPU
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    env["HF_HUB_OFFLINE"] = "1"  # nothing may be fetched
    return env


def run_part(name: str, cmd: list[str], limit_s: float, log) -> dict:
    """Run one part in its own process group; kill the group when it outlives ``limit_s``."""
    log.write(f"\n===== {name}: {' '.join(cmd)} (limit {limit_s:.0f} s)\n")
    log.flush()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    timed_out = False
    try:
        output, _ = proc.communicate(timeout=max(limit_s, 1))
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)  # the part's own process group only
        output, _ = proc.communicate()
    seconds = time.perf_counter() - t0
    log.write(output)
    log.write(f"\n===== {name}: {'TIMED OUT' if timed_out else f'exit {proc.returncode}'} after {seconds:.1f} s\n")
    log.flush()
    tail = output.strip().splitlines()[-15:]
    return {"name": name, "command": cmd, "limit_s": limit_s, "seconds": seconds, "returncode": proc.returncode,
            "timed_out": timed_out, "passed": proc.returncode == 0 and not timed_out, "output_tail": tail}


def junit_counts(path: str) -> dict | None:
    """{tests, failures, errors, skipped} from a pytest JUnit XML file (None if it was not written)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}


def kernel_headlines(path: Path) -> dict | None:
    """Per op: median speedup over eager and torch.compile, and median fraction of copy bandwidth."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    out = {"copy_gbps": report["limits"]["copy"]["gbps"], "cases": len(report["cases"])}
    for op in sorted({c["op"] for c in report["cases"]}):
        cases = [c for c in report["cases"] if c["op"] == op]

        def med(values):
            values = [v for v in values if v is not None]
            return statistics.median(values) if values else None

        out[op] = {"median_speedup_vs_eager": med(c["speedup_vs_eager"] for c in cases),
                   "median_speedup_vs_compile": med(c["speedup_vs_compile"] for c in cases),
                   "median_fastdiff_fraction_of_copy": med(c["impls"]["fastdiff"].get("fraction_of_copy")
                                                           for c in cases)}
    return out


def sampling_headlines(path: Path) -> dict | None:
    """images/s per mode and the speedups over diffusers, per (model, scheduler, steps, batch)."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    out = {}
    for r in report["runs"]:
        key = f"{r['model']} {r['scheduler']}-{r['steps']} batch {r['batch']}"
        out.setdefault(key, {})[r["mode"]] = {"images_per_s": r.get("images_per_s"),
                                              "speedup_vs_diffusers": r.get("speedup_vs_diffusers"),
                                              "forward_rel_error_vs_reference": r.get("forward_rel_error_vs_reference")}
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: PYTHONPATH=. python bench/gpu_check.py OUTDIR", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: this check needs a CUDA GPU and none is available here; nothing was run "
              "(the CPU test suite is `make test`)", file=sys.stderr)
        return 2
    from bench import common

    out = Path(argv[0]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    device = common.resolve_device("cuda")
    major, minor = torch.cuda.get_device_capability(device)
    py = sys.executable
    scratch = tempfile.mkdtemp(prefix="fastdiff-gpu-check-")
    kernel_tests = kernel_test_files()
    # a test module that cannot import (say, diffusers missing) must not stop the others
    pytest = [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--continue-on-collection-errors"]
    parts = [
        ("gpu-marked tests", [*pytest, "-m", "gpu", f"--junitxml={scratch}/gpu_tests.xml", "tests"], 100),
        # --quick and 4 workers: about 130 distinct kernel compilations must fit the limit
        ("kernel tests on the GPU", [*pytest, "--quick", "-n", "4", f"--junitxml={scratch}/kernel_tests.xml",
                                     *kernel_tests], 120),
        ("compile check", [py, "-m", "fastdiff.cli", "kernels", "--target", f"sm_{major}{minor}",
                           "--json", f"{scratch}/compile_check.json"], 30),
        ("bench kernels", [py, "-m", "fastdiff.cli", "bench", "kernels", "--device", "cuda", "--preset", "short",
                           "--out", str(out), "--time-budget", "{budget}"], 80),
        ("bench sampling", [py, "-m", "fastdiff.cli", "bench", "sampling", "--device", "cuda", "--preset", "short",
                            "--compile-mode", "default", "--out", str(out), "--time-budget", "{budget}"], 130),
    ]
    results = []
    with open(out / "gpu_check.log", "w") as log:
        log.write(f"fastdiff GPU check, {time.strftime('%Y-%m-%d %H:%M:%S')}, {torch.cuda.get_device_name(device)}\n")
        for name, cmd, limit in parts:
            if name == "kernel tests on the GPU" and not kernel_tests:
                results.append({"name": name, "passed": None, "reason": "no kernel test files found "
                                f"({', '.join(KERNEL_TEST_PATTERNS)})"})
                continue
            remaining = TOTAL_LIMIT_S - (time.perf_counter() - start)
            if remaining < 10:
                results.append({"name": name, "passed": None, "reason": "skipped: the 8-minute limit is used up"})
                continue
            limit = min(limit, remaining)
            # a benchmark stops starting new work early enough to write its reports before its limit
            cmd = [c.format(budget=int(max(5, limit - BENCH_MARGIN_S[name]))) if c == "{budget}" else c for c in cmd]
            results.append(run_part(name, cmd, limit, log))
    tests = {"gpu-marked tests": "gpu_tests.xml", "kernel tests on the GPU": "kernel_tests.xml"}
    for r in results:
        if r["name"] in tests:
            r["counts"] = junit_counts(os.path.join(scratch, tests[r["name"]]))
        if r["name"] == "compile check":
            try:
                r["rows"] = json.loads(Path(scratch, "compile_check.json").read_text())
            except (OSError, ValueError):
                r["rows"] = None
    summary = {
        "schema": "fastdiff-gpu-check/1",
        "provenance": common.provenance(device, argv, "python bench/gpu_check.py " + " ".join(argv)),
        "passed": all(r.get("passed") is not False for r in results) and any(r.get("passed") for r in results),
        "seconds": time.perf_counter() - start,
        "parts": results,
        "kernel_test_files": [os.path.relpath(f, ROOT) for f in kernel_tests],
        "headlines": {"kernels": kernel_headlines(out / "kernels.json"),
                      "sampling": sampling_headlines(out / "sampling.json")},
    }
    common.write_json_atomic(out / "gpu_check.json", summary)
    for r in results:
        status = "skipped" if r.get("passed") is None else ("ok" if r["passed"] else "FAILED")
        extra = f" {r['counts']}" if r.get("counts") else (f" ({r['reason']})" if r.get("reason") else "")
        print(f"gpu_check: {r['name']}: {status}{extra}", file=sys.stderr)
    print(f"gpu_check: {'passed' if summary['passed'] else 'FAILED'} in {summary['seconds']:.0f} s -> {out}",
          file=sys.stderr)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
