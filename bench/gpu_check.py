"""The one-call GPU check: ``python bench/gpu_check.py OUTDIR [--wheels DIR]`` from the repository root.

Made for the lent H200 (15 minutes of device time in all, machine start included): one call must produce every
headline number, in well under 7 minutes with its own start-up. Each part runs in its own process group with a
hard time limit (killed when it outlives it), in this order, headline numbers first:

1. ``fastdiff bench kernels --preset short --no-compile``: update steps first (batch 1 first), then GroupNorm;
   each case against torch eager and against a copy of the same bytes, plus a case of 256 MB or more per family;
2. ``fastdiff bench sampling --preset short --no-compile``: batch 1 first, then 64 (torch.compile stays in the
   full benchmark: compiling the UNet alone would eat the budget);
3. the GPU-marked tests (``pytest -m gpu``: graph replays against eager sampling, attention backends, ...);
4. the kernel tests on the real GPU (no ``TRITON_INTERPRET``; ``-n 4`` where pytest-xdist is installed);
5. the compile check with its static roofline (``fastdiff kernels --target sm_XY --json``) under the image's
   Triton.

OUTDIR receives ``gpu_check.json`` (written in a ``finally``: also when a part fails, times out or the check
itself breaks; provenance, the optional packages present, each part's status, test counts, the compile-check
rows and the benchmarks' headline numbers), ``gpu_check.log`` (every part's output) and the benchmark reports
``kernels.{json,md,png}`` and ``sampling.{json,md,png}`` (the PNGs only where matplotlib is installed).
Exit status: 0 when every part passed, 1 when one failed, 2 without CUDA (the summary says so and nothing ran;
``--cpu-rehearsal`` runs the same parts in their CPU form to prove the machinery without a GPU).

The lent image (Python 3.12, torch 2.11 with CUDA, Triton 3.6) has no diffusers, no xformers and no package
index. Every optional package is checked before use: what is missing is reported as "not measured: <package>
missing" (or a test skips with that reason). ``--wheels DIR`` installs the wheels in DIR (``pip install
--no-index --no-deps --target``, or unpacked where pip is absent) into a scratch folder put first on the path of
the check and of every part, so diffusers can be carried as a wheel. Build that folder on a machine with a
package index, from the repository root::

    python bench/gpu_check.py --download-wheels wheels/

which runs ``pip download --no-deps --only-binary=:all: -d wheels/`` for ``WHEELS_FOR_IMAGE``: diffusers
(pure Python) and importlib_metadata, the one requirement of diffusers missing from the image (declared, though
diffusers imports ``importlib.metadata`` on Python >= 3.8). The image already holds the others: filelock,
huggingface-hub 1.33 (>= 1.32 needed), numpy, regex, requests, safetensors 0.8 (>= 0.8 needed) and Pillow.
Keep the folder out of git (``echo /wheels/ >> .git/info/exclude``) and name it in the device call's carry.
"""

from __future__ import annotations

import time

T_START = time.monotonic()  # the check's own start-up counts against its limit

import argparse  # noqa: E402
import glob  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
import xml.etree.ElementTree as ET  # noqa: E402
import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `bench` and `fastdiff` importable from the checkout
    sys.path.insert(0, str(ROOT))

TOTAL_LIMIT_S = 400  # the whole check, its start-up included: under 7 minutes with room for the summary
SUMMARY_RESERVE_S = 8  # kept back from the last part for the summary
# Seconds a benchmark part keeps between its --time-budget and its hard limit (one case or run can outlast the
# budget, and the reports are written after it).
BENCH_MARGIN_S = {"bench kernels": 20, "bench sampling": 30}
# Files holding the kernel tests (whichever exist).
KERNEL_TEST_PATTERNS = ("tests/test_kernel*.py", "tests/test_group_norm*.py", "tests/test_update_step*.py",
                        "tests/test_noise*.py", "tests/test_ops*.py")  # the compile check is a part of its own
# Wheels for the lent image (see the module docstring).
WHEELS_FOR_IMAGE = ("diffusers==0.42.1", "importlib_metadata")
EXTRA_PATHS: list[str] = []  # folders put first on every part's PYTHONPATH (--wheels)


def kernel_test_files() -> list[str]:
    return sorted({f for pattern in KERNEL_TEST_PATTERNS for f in glob.glob(str(ROOT / pattern))})


_started = T_START  # reset by main(); a script run keeps the interpreter's start


def elapsed() -> float:
    return time.monotonic() - _started


def _env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the kernels must compile for the real GPU
    paths = [str(ROOT), *EXTRA_PATHS] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env["HF_HUB_OFFLINE"] = "1"  # nothing may be fetched
    return env


def run_part(name: str, cmd: list[str], limit_s: float, log) -> dict:
    """Run one part in its own process group; kill the group when it outlives ``limit_s``."""
    log.write(f"\n===== {name}: {' '.join(cmd)} (limit {limit_s:.0f} s)\n")
    log.flush()
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)
    except OSError as exc:
        log.write(f"===== {name}: could not start: {exc}\n")
        return {"name": name, "command": cmd, "limit_s": limit_s, "seconds": 0.0, "returncode": None,
                "timed_out": False, "passed": False, "reason": f"could not start: {exc}", "output_tail": []}
    timed_out = False
    try:
        output, _ = proc.communicate(timeout=max(limit_s, 1))
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)  # the part's own process group only
        output, _ = proc.communicate()
    except BaseException:  # interrupted: never leave the part running
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    seconds = time.perf_counter() - t0
    log.write(output)
    log.write(f"\n===== {name}: {'TIMED OUT' if timed_out else f'exit {proc.returncode}'} after {seconds:.1f} s\n")
    log.flush()
    tail = output.strip().splitlines()[-15:]
    return {"name": name, "command": cmd, "limit_s": limit_s, "seconds": seconds, "returncode": proc.returncode,
            "timed_out": timed_out, "passed": proc.returncode == 0 and not timed_out, "output_tail": tail}


# ----------------------------------------------------------------------------------------- wheels
def add_wheels(wheel_dir: str, scratch: str) -> dict:
    """Install every wheel of ``wheel_dir`` into ``scratch/site`` and put it first on the path (this process and
    every part). pip with ``--no-index --no-deps --target``; without pip, the wheels are unpacked (enough for
    pure-Python wheels such as diffusers)."""
    wheels = sorted(glob.glob(os.path.join(wheel_dir, "*.whl")))
    info = {"dir": os.path.abspath(wheel_dir), "wheels": [os.path.basename(w) for w in wheels]}
    if not os.path.isdir(wheel_dir):
        info["error"] = f"--wheels {wheel_dir}: no such folder"
        return info
    if not wheels:
        info["error"] = f"--wheels {wheel_dir}: no .whl files there"
        return info
    site = os.path.join(scratch, "site")
    os.makedirs(site, exist_ok=True)
    if importlib.util.find_spec("pip") is not None:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--disable-pip-version-check", "--target", site, *wheels]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        info["how"] = "pip install --no-index --no-deps --target"
        if done.returncode != 0:
            info["error"] = f"pip install failed: {(done.stderr or done.stdout).strip()[-500:]}"
            return info
    else:
        for w in wheels:
            with zipfile.ZipFile(w) as z:
                z.extractall(site)
        info["how"] = "unpacked (no pip here)"
    info["site"] = site
    info["error"] = None
    EXTRA_PATHS.insert(0, site)
    sys.path.insert(0, site)
    importlib.invalidate_caches()
    return info


def download_wheels(dest: str) -> int:
    """Here, with a package index: ``pip download --no-deps`` the wheels the lent image lacks into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", dest,
           *WHEELS_FOR_IMAGE]
    print(" ".join(cmd), file=sys.stderr)
    return subprocess.run(cmd).returncode


# ----------------------------------------------------------------------------------------- reports
def junit_counts(path: str) -> dict | None:
    """{tests, failures, errors, skipped} from a pytest JUnit XML file (None if it was not written)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


LARGE_CASE_BYTES = 256 * 10**6  # a case whose byte floor is at least this runs from HBM, not from cache


def kernel_headlines(path: Path) -> dict | None:
    """Per op: median speedup over eager (and torch.compile, where run), median fraction of a copy of the same
    bytes and of the peak copy, and each large case (byte floor >= 256 MB) on its own."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    out = {"copy_gbps": report["limits"]["copy"]["gbps"], "cases": len(report["cases"]),
           "stopped_early": report.get("stopped_early")}
    for op in sorted({c["op"] for c in report["cases"]}):
        cases = [c for c in report["cases"] if c["op"] == op]
        fd = [c["impls"]["fastdiff"] for c in cases]
        out[op] = {"median_speedup_vs_eager": _median(c["speedup_vs_eager"] for c in cases),
                   "median_speedup_vs_compile": _median(c["speedup_vs_compile"] for c in cases),
                   "median_fastdiff_fraction_of_copy": _median(r.get("fraction_of_copy") for r in fd),
                   "median_fastdiff_fraction_of_peak_copy": _median(r.get("fraction_of_peak_copy") for r in fd),
                   "large_cases": [{"shape": c["shape"], "dtype": c["dtype"], "layout": c["layout"],
                                    "floor_bytes": c["impls"]["fastdiff"]["floor_bytes"],
                                    "fastdiff_us": None if c["impls"]["fastdiff"].get("median_s") is None
                                    else c["impls"]["fastdiff"]["median_s"] * 1e6,
                                    "fraction_of_copy": c["impls"]["fastdiff"].get("fraction_of_copy"),
                                    "speedup_vs_eager": c["speedup_vs_eager"]}
                                   for c in cases if c["impls"]["fastdiff"]["floor_bytes"] >= LARGE_CASE_BYTES]}
    return out


def sampling_headlines(path: Path) -> dict | None:
    """images/s, ms per step and the speedups over diffusers, per (model, scheduler, steps, batch) and mode."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    out = {}
    for r in report["runs"]:
        key = f"{r['model']} {r['scheduler']}-{r['steps']} batch {r['batch']}"
        latency = r.get("step_latency_s")
        out.setdefault(key, {})[r["mode"]] = {
            "images_per_s": r.get("images_per_s"), "ms_per_step": None if latency is None else latency * 1e3,
            "speedup_vs_diffusers": r.get("speedup_vs_diffusers"),
            "speedup_vs_reference": r.get("speedup_vs_reference"),
            "forward_rel_error_vs_reference": r.get("forward_rel_error_vs_reference"),
            **({"reason": r["reason"]} if r.get("reason") else {})}
    return out


def roofline_headlines(rows) -> dict | None:
    """The hot variants of the compile check's static roofline: how many are memory-bound with margin."""
    if not rows:
        return None
    from fastdiff.kernels.compile_check import MARGIN_GOAL, is_hot

    hot = [r for r in rows if not r.get("error") and r.get("memory_margin") is not None and is_hot(r)]
    if not hot:
        return None
    short = [f"{r['kernel']} [{r['variant']}]: {r['predicted_bound']}-bound, margin {r['memory_margin']:+.0%}"
             for r in hot if r["memory_margin"] < MARGIN_GOAL]
    return {"hot_variants": len(hot), "memory_bound_with_margin": len(hot) - len(short), "margin_goal": MARGIN_GOAL,
            "short_of_goal": short}


# ----------------------------------------------------------------------------------------- the parts
def plan_parts(mode: str, target: str, out: Path, scratch: str) -> list[tuple[str, list[str], float]]:
    """(name, command, limit in seconds) of each part, in the order they run.

    ``mode``: "gpu" (the real check) or "cpu-rehearsal" (each part in a CPU form: quick CPU benchmarks, test
    collection instead of the interpreter's kernel tests, a two-kernel compile check).
    """
    py = sys.executable
    gpu = mode == "gpu"
    # a test module that cannot import (an optional package missing) must not stop the others
    pytest = [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--continue-on-collection-errors"]
    xdist = ["-n", "4"] if gpu and importlib.util.find_spec("xdist") is not None else []
    bench_device = ["--device", "cuda", "--preset", "short"] if gpu else ["--device", "cpu", "--quick"]
    kernel_tests = kernel_test_files()
    compile_kernels = [] if gpu else ["--kernels", "_gn_combine_kernel"]
    return [
        ("bench kernels", [py, "-m", "fastdiff.cli", "bench", "kernels", *bench_device, "--no-compile",
                           "--out", str(out), "--time-budget", "{budget}"], 95),
        ("bench sampling", [py, "-m", "fastdiff.cli", "bench", "sampling", *bench_device, "--no-compile",
                            "--out", str(out), "--time-budget", "{budget}"], 115),
        ("gpu-marked tests", [*pytest, "-m", "gpu", f"--junitxml={scratch}/gpu_tests.xml", "tests"], 60),
        # --quick and 4 workers: about 130 distinct kernel compilations must fit the limit
        ("kernel tests on the GPU", [*pytest, "--quick", *xdist, f"--junitxml={scratch}/kernel_tests.xml",
                                     *([] if gpu else ["--collect-only"]), *kernel_tests], 80),
        ("compile check", [py, "-m", "fastdiff.kernels.compile_check", "--target", target, "--jobs", "8" if gpu else "2",
                           "--json", f"{scratch}/compile_check.json", *compile_kernels], 60),
    ]


def environment() -> dict:
    """Python, torch, Triton, CUDA and every optional package, as the check sees them (never raises)."""
    env = {"python": platform.python_version(), "executable": sys.executable}
    try:
        import torch

        env.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if env["cuda_available"]:
            env["gpu"] = torch.cuda.get_device_name(0)
    except Exception as exc:
        env["torch_error"] = repr(exc)[:300]
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as exc:
        env["triton_error"] = repr(exc)[:300]
    try:
        from bench import common

        env["optional_packages"] = common.optional_packages()
    except Exception as exc:
        env["optional_packages_error"] = repr(exc)[:300]
    env["pip"] = importlib.util.find_spec("pip") is not None
    return env


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", help="output folder")
    p.add_argument("--wheels", metavar="DIR", help="install the wheels of DIR on the path first (diffusers, ...)")
    p.add_argument("--cpu-rehearsal", action="store_true",
                   help="without CUDA: run every part in its CPU form (proves the machinery, measures nothing)")
    p.add_argument("--download-wheels", metavar="DIR",
                   help="here, with a package index: download the wheels the lent image lacks into DIR, then exit")
    p.add_argument("--total-limit", type=float, default=TOTAL_LIMIT_S, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    """The check; ``started``: the monotonic time its limit counts from (default: now)."""
    global _started
    _started = time.monotonic() if started is None else started
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.download_wheels:
        return download_wheels(args.download_wheels)
    if not args.out:
        print("usage: python bench/gpu_check.py OUTDIR [--wheels DIR] [--cpu-rehearsal]", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="fastdiff-gpu-check-")
    summary = {"schema": "fastdiff-gpu-check/2", "command": "python bench/gpu_check.py " + " ".join(argv or sys.argv[1:]),
               "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "mode": None, "passed": False,
               "total_limit_s": args.total_limit, "parts": []}
    results = summary["parts"]
    status = 1
    log = open(out / "gpu_check.log", "w")
    try:
        if args.wheels:
            summary["wheels"] = add_wheels(args.wheels, scratch)
            if summary["wheels"]["error"]:
                print(f"gpu_check: {summary['wheels']['error']}", file=sys.stderr)
        summary["environment"] = env = environment()
        if not env.get("cuda_available"):
            why = ("no CUDA GPU is available here" if env.get("torch_cuda") else
                   f"this torch ({env.get('torch', 'not importable')}) has no CUDA")
            if not args.cpu_rehearsal:
                summary["mode"] = "no-cuda"
                summary["reason"] = f"nothing was run: {why} (the CPU test suite is `make test`)"
                print(f"gpu_check: this check needs a CUDA GPU: {why}; nothing was run. The summary is in "
                      f"{out / 'gpu_check.json'} (--cpu-rehearsal runs the parts' CPU forms)", file=sys.stderr)
                status = 2
                return status
            summary["mode"] = "cpu-rehearsal"
            print(f"gpu_check: {why}: CPU rehearsal (every part in its CPU form; no GPU figure is measured)",
                  file=sys.stderr)
            target = "sm_90"
        else:
            import torch

            summary["mode"] = "gpu"
            major, minor = torch.cuda.get_device_capability(0)
            target = f"sm_{major}{minor}"
        log.write(f"fastdiff GPU check ({summary['mode']}), {summary['date_utc']}, {env.get('gpu', 'no GPU')}\n")
        for name, cmd, limit in plan_parts(summary["mode"], target, out, scratch):
            if name == "kernel tests on the GPU" and not kernel_test_files():
                results.append({"name": name, "passed": None, "reason": "no kernel test files found "
                                f"({', '.join(KERNEL_TEST_PATTERNS)})"})
                continue
            remaining = args.total_limit - elapsed() - SUMMARY_RESERVE_S
            if remaining < 10:
                results.append({"name": name, "passed": None,
                                "reason": f"skipped: the check's limit of {args.total_limit:.0f} s is used up"})
                continue
            limit = min(limit, remaining)
            # a benchmark stops starting new work early enough to write its reports before its limit
            budget = int(max(5, limit - BENCH_MARGIN_S.get(name, 0)))
            cmd = [str(budget) if c == "{budget}" else c for c in cmd]
            results.append(run_part(name, cmd, limit, log))
        status = 0 if all(r.get("passed") is not False for r in results) and any(r.get("passed") for r in results) \
            else 1
        return status
    except Exception as exc:  # the check itself broke: said in the summary, never a traceback alone
        summary["error"] = f"{type(exc).__name__}: {exc}"[:500]
        log.write("\n" + traceback.format_exc())
        print(f"gpu_check: the check broke: {summary['error']} (traceback in gpu_check.log)", file=sys.stderr)
        status = 1
        return status
    finally:
        summary["passed"] = status == 0 and summary["mode"] == "gpu"
        summary["seconds"] = elapsed()
        _finish(summary, out, scratch, log)


def _finish(summary: dict, out: Path, scratch: str, log) -> None:
    """Counts, rows and headlines of whatever ran, then gpu_check.json; never raises."""
    tests = {"gpu-marked tests": "gpu_tests.xml", "kernel tests on the GPU": "kernel_tests.xml"}
    for r in summary["parts"]:
        try:
            if r["name"] in tests:
                r["counts"] = junit_counts(os.path.join(scratch, tests[r["name"]]))
            if r["name"] == "compile check":
                r["rows"] = json.loads(Path(scratch, "compile_check.json").read_text())
        except Exception as exc:  # a part that wrote nothing readable
            r.setdefault("rows", None)
            r["rows_reason"] = f"not read: {type(exc).__name__}: {exc}"[:300]
    rows = next((r.get("rows") for r in summary["parts"] if r["name"] == "compile check"), None)
    for key, fn, arg in (("kernels", kernel_headlines, out / "kernels.json"),
                         ("sampling", sampling_headlines, out / "sampling.json"),
                         ("roofline", roofline_headlines, rows)):
        try:
            summary.setdefault("headlines", {})[key] = fn(arg)
        except Exception as exc:
            summary.setdefault("headlines", {})[key] = None
            summary["headlines"][f"{key}_reason"] = f"not read: {type(exc).__name__}: {exc}"[:300]
    try:
        from bench import common

        if summary.get("mode") == "gpu":
            import torch

            summary["provenance"] = common.provenance(torch.device("cuda"), None, summary["command"])
        text = json.dumps(summary, indent=1, default=str) + "\n"
        common.write_text_atomic(out / "gpu_check.json", text)
    except Exception as exc:  # the summary must land: fall back to a plain write
        summary["summary_error"] = f"{type(exc).__name__}: {exc}"[:300]
        (out / "gpu_check.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    for r in summary["parts"]:
        state = "skipped" if r.get("passed") is None else ("ok" if r["passed"] else
                                                           ("TIMED OUT" if r.get("timed_out") else "FAILED"))
        extra = f" {r['counts']}" if r.get("counts") else (f" ({r['reason']})" if r.get("reason") else "")
        seconds = f" in {r['seconds']:.0f} s" if r.get("seconds") is not None else ""
        print(f"gpu_check: {r['name']}: {state}{seconds}{extra}", file=sys.stderr)
    verdict = {"gpu": "passed" if summary["passed"] else "FAILED", "cpu-rehearsal": "rehearsal done",
               "no-cuda": "not run (no CUDA)", None: "FAILED before any part"}[summary.get("mode")]
    print(f"gpu_check: {verdict} in {summary['seconds']:.0f} s -> {out}", file=sys.stderr)
    log.close()
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(started=T_START))
