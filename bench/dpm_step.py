"""The fused DPM-Solver++ step against diffusers' ``DPMSolverMultistepScheduler.step`` (eager and torch.compile).

One second-order multistep DPM-Solver++ step (the common "DPM++ 2M" setting) on image-sized tensors:

* ``fastdiff``: ``fastdiff.ops.dpm_solver_step`` with ``backend="triton"``: one kernel reads x_t, the model output
  and the previous data prediction D_{-1}, writes x_{t-1} and the new D. Byte floor: 5 image-sized tensors
  (order 3: 6; order 1: 4), s bytes per element each: float16 10 bytes per element. CUDA only (on the CPU Triton
  runs only in its interpreter, too slow to time: reported as not run);
* ``reference``: fastdiff's reference op (plain torch, the same math), eager;
* ``diffusers``: diffusers' own ``step`` at a second-order step (model-output conversion, history shift,
  the multistep update: separate tensor ops, float32 upcast), eager;
* ``diffusers_compile``: that ``step`` under ``torch.compile(dynamic=False)`` (graph breaks allowed: diffusers'
  step branches on Python state).

The peers' floor is the same 5 tensors (what any implementation must move); GB/s = floor / median time, and the
fraction of a device-to-device copy measured in the same run. Results: JSON and Markdown in ``--out``.

    python bench/dpm_step.py --quick              # CPU: a small case, diffusers eager and the reference only
    python bench/dpm_step.py --device cuda        # GPU: every implementation, float16 and float32, 3 sizes
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

NAME = "dpm_step"
IMPLS = ("fastdiff", "reference", "diffusers", "diffusers_compile")
SHAPES = {"quick": [(8, 3, 32, 32)], "full": [(64, 3, 32, 32), (8, 3, 256, 256), (16, 4, 128, 128)]}
STEPS = 20  # the schedule the step is taken from; the timed step is a middle one (second order)


def _schedulers(device):
    import diffusers

    from fastdiff import DPMSolverMultistepScheduler

    ours = DPMSolverMultistepScheduler(solver_order=2)
    ours.set_timesteps(STEPS, device=device)
    ref = diffusers.DPMSolverMultistepScheduler(solver_order=2)
    ref.set_timesteps(STEPS, device=device)
    return ours, ref


def make_case(shape, dtype, device, n_sets):
    """Input sets (x, m, D_{-1}) of fresh random data, plus the implementations, for one shape and dtype."""
    from fastdiff import ops
    from fastdiff.ops import dpm_reference

    ours, ref = _schedulers(device)
    index = STEPS // 2
    sets = []
    for _ in range(n_sets):
        x = torch.randn(shape, device=device, dtype=dtype)
        m = torch.randn(shape, device=device, dtype=dtype)
        hist = torch.randn((2, *shape), device=device, dtype=dtype)  # ring of 2: slot (index - 1) % 2 is D_{-1}
        sets.append((x, m, hist))

    def fastdiff(x, m, hist):
        return ops.dpm_solver_step(x, m, hist, ours.coeffs, index, backend="triton")

    def reference(x, m, hist):
        return dpm_reference.dpm_solver_step(x, m, hist, ours.coeffs, index)

    def diffusers_step(x, m, hist):
        ref._step_index = index  # the scheduler's own counter: a middle, second-order step
        ref.lower_order_nums = 2
        ref.model_outputs = [None, hist[(index - 1) % 2]]  # step shifts: D_{-1} must be the newest
        return ref.step(m, ref.timesteps[index], x, return_dict=False)[0]

    return sets, {"fastdiff": fastdiff, "reference": reference, "diffusers": diffusers_step}


def run_case(shape, dtype, device, copy_gbps, args) -> dict:
    from fastdiff.testing import RTOL, relative_error

    elem = torch.empty((), dtype=dtype).element_size()
    floor = 5 * math.prod(shape) * elem
    n_sets = common.rotation_sets(floor, device)
    sets, fns = make_case(shape, dtype, device, n_sets)
    rec = {"shape": list(shape), "dtype": common.dtype_name(dtype), "elem_bytes": elem, "floor_bytes": floor,
           "bytes_per_element": 5 * elem, "input_sets": n_sets, "impls": {}}
    check = fns["reference"](*[t.clone() for t in sets[0]])
    for impl in IMPLS:
        r = rec["impls"][impl] = {}
        fn = fns.get(impl)
        if impl == "fastdiff" and device.type != "cuda":
            r.update(status="not run", reason="no CUDA (on the CPU Triton runs only in its interpreter)")
            continue
        if impl == "diffusers_compile":
            if args.no_compile:
                r.update(status="not run", reason="skipped: --no-compile")
                continue
            t0 = time.perf_counter()
            try:
                torch._dynamo.reset()
                fn = torch.compile(fns["diffusers"], dynamic=False)
                fn(*sets[0])
                common.sync(device)
                r["compile_s"] = time.perf_counter() - t0
            except Exception as exc:  # a compile failure is a result
                r.update(status="failed", reason=f"torch.compile failed: {common.short_error(exc)}")
                continue
        try:
            out = fn(*[t.clone() for t in sets[0]])
            r["rel_error_vs_reference"] = relative_error(out, check)
            r["within_tolerance"] = r["rel_error_vs_reference"] <= max(RTOL[dtype], 1e-5)
            timing = common.time_calls(fn, sets, device, target_s=args.target_time, max_reps=50 if args.quick else 200)
        except Exception as exc:
            r.update(status="failed", reason=f"failed: {common.short_error(exc)}")
            continue
        r.update(status="ok", **{k: v for k, v in timing.items() if k != "samples_s"})
        r["gbps"] = floor / timing["median_s"] / 1e9
        r["fraction_of_copy"] = r["gbps"] / copy_gbps
    return rec


def markdown(report: dict) -> str:
    lim = report["copy"]
    lines = [f"# DPM-Solver++ 2M step: fastdiff's fused kernel vs diffusers ({report['device']})", "",
             common.provenance_markdown(report["provenance"]), "",
             f"Copy bandwidth in this run: {lim['gbps']:.1f} GB/s. Byte floor: x_t, the model output and D_(-1) read, "
             "x_(t-1) and D written (5 tensors). Times: median microseconds; GB/s from the floor, fraction of the "
             "copy in brackets; n/m = not measured (reason below).", ""]
    headers = ["N x C x H x W", "dtype", "bytes / element"] + [f"{i} µs" for i in IMPLS] + [f"{i} GB/s" for i in IMPLS]
    rows = []
    for c in report["cases"]:
        i = c["impls"]
        times = [common.fmt(i[k].get("median_s") and i[k]["median_s"] * 1e6, ".1f") for k in IMPLS]
        bws = [f"{i[k]['gbps']:.1f} ({100 * i[k]['fraction_of_copy']:.0f}%)" if i[k].get("gbps") else "n/m"
               for k in IMPLS]
        rows.append(["x".join(map(str, c["shape"])), c["dtype"], c["bytes_per_element"]] + times + bws)
    lines.append(common.markdown_table(headers, rows))
    reasons = sorted({f"{k}: {v['reason']}" for c in report["cases"] for k, v in c["impls"].items() if v.get("reason")})
    if reasons:
        lines += ["", "Not measured:"] + [f"- {r}" for r in reasons]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="one small case (the CPU default)")
    p.add_argument("--dtypes", default=None, help="comma-separated (default: float16,float32 on CUDA, float32 on CPU)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--target-time", type=float, default=0.25, help="seconds of timed calls per implementation")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 for CPU --quick)")
    p.add_argument("--out", default=None, help="output folder (default: bench/results/<device>-<date>)")
    args = p.parse_args(argv)
    from fastdiff.devices import resolve_device

    device = resolve_device(args.device)
    quick = args.quick or device.type != "cuda"
    threads = common.default_threads(device, quick, args.threads)
    if threads:
        torch.set_num_threads(threads)
    dtypes = common.parse_dtypes(args.dtypes) if args.dtypes else (
        [torch.float16, torch.float32] if device.type == "cuda" else [torch.float32])
    copy = common.measure_copy_bandwidth(device, quick=quick)
    cases = [run_case(shape, dt, device, copy["gbps"], args) for shape in SHAPES["quick" if quick else "full"]
             for dt in dtypes]
    report = {"device": device.type, "copy": {k: v for k, v in copy.items() if k != "samples_s"}, "cases": cases,
              "provenance": common.provenance(device, argv, "python bench/dpm_step.py "
                                              + " ".join(sys.argv[1:] if argv is None else argv))}
    out = Path(args.out) if args.out else common.default_out_dir(device)
    out.mkdir(parents=True, exist_ok=True)
    common.write_json_atomic(out / f"{NAME}.json", report)
    common.write_text_atomic(out / f"{NAME}.md", markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
