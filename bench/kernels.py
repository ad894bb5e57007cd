"""``fastdiff bench kernels``: each fused op against torch eager and torch.compile, on the UNet's real shapes.

Ops: GroupNorm+SiLU, GroupNorm with the time-embedding add + SiLU, plain GroupNorm, the DDPM step, the
DDIM step and the DPM-Solver++ step. Implementations timed per case:

* ``fastdiff``: the Triton kernel through ``fastdiff.ops`` with ``backend="triton"`` (CUDA only: on the CPU
  Triton runs only in its interpreter, far too slow to time, so it is reported as not run);
* ``eager``: the same computation as diffusers runs it: ``F.group_norm`` then ``F.silu`` (the time embedding
  added as ``x + temb[:, :, None, None]`` first), and the update step as the separate tensor ops of
  ``fastdiff.ops.reference.update_step`` with a noise tensor;
* ``compile``: that eager function under ``torch.compile(dynamic=False, fullgraph=True)``, compiled per case.

Byte floors (what an ideal kernel must move; GB/s = floor / median time):

* group norm: read x once + write y once + weight and bias (+ the [N, C] time embedding), all implementations;
* DDPM step: fastdiff reads x_t and the model output and writes x_{t-1} (its Philox noise is made in the kernel
  and costs no bytes); the peers also read their noise tensor, so their floor has 4 image-sized tensors;
* DDIM step (eta = 0, no noise): read x_t and the model output, write x_{t-1}, all implementations;
* DPM-Solver++ 2M step (``dpm_step``, a second-order step; eager: ``fastdiff.ops.dpm_reference``): read x_t, the
  model output and the previous data prediction, write x_{t-1} and the new one, all implementations (diffusers'
  own step, eager and compiled, is timed against the kernel by ``bench/dpm_step.py``).

Each implementation's GB/s is also given as a fraction of a device-to-device copy that moves the same bytes
(``fraction_of_copy``; measured in the same run, once per size) and of the large copy in ``limits``
(``fraction_of_peak_copy``). Update steps run first, then group norms; the short preset (the GPU check's)
starts at batch 1 and has a case of 256 MB or more per family.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import common

OPS = ("group_norm_silu", "group_norm_temb_silu", "group_norm", "ddpm_step", "ddim_step", "dpm_step")
GN_OPS = OPS[:3]
IMPLS = ("fastdiff", "eager", "compile")
LAYOUTS = ("nchw", "channels_last")
GROUPS = 32
EPS = 1e-6  # DDPM checkpoints' GroupNorm epsilon

# Per UNet configuration: the image (channels, size) the update step runs on, and the (channels, size) of the
# GroupNorm inputs at each level (block_out_channels at each resolution).
CONFIGS = {
    # google/ddpm-cifar10-32: block_out_channels 128, 256, 256, 256 at 32x32.
    "cifar10-32": {"image": (3, 32), "levels": [(128, 32), (256, 16), (256, 8), (256, 4)]},
    # google/ddpm-church-256: 128, 128, 256, 256, 512, 512 at 256x256.
    "church-256": {"image": (3, 256), "levels": [(128, 256), (128, 128), (256, 64), (256, 32), (512, 16), (512, 8)]},
    # The classic 512x512 layout with 128 base channels (channel multipliers 1, 1, 2, 2, 4, 4).
    "classic-512": {"image": (3, 512), "levels": [(128, 512), (128, 256), (256, 128), (256, 64), (512, 32),
                                                  (512, 16)]},
}

FLOORS = {
    "group_norm_silu": "read x + write y + weight and bias (all implementations)",
    "group_norm": "read x + write y + weight and bias (all implementations)",
    "group_norm_temb_silu": "read x + write y + weight and bias + the [N, C] time embedding (all implementations)",
    "ddpm_step": "fastdiff: read x_t + read model output + write x_{t-1} (in-kernel noise costs no bytes); "
                 "eager and compile: the same plus reading their noise tensor",
    "ddim_step": "read x_t + read model output + write x_{t-1} (eta = 0: no noise; all implementations)",
    "dpm_step": "DPM-Solver++ 2M step: read x_t + model output + previous data prediction, write x_{t-1} + the new "
                "one (all implementations; diffusers' own step is timed by bench/dpm_step.py)",
}

# (op kind, config, channels, size, batch): "gn" cases run the three GroupNorm ops, "step" cases both steps.
# Cases run in this order, update steps first (see ``order_cases``), batch 1 first within a family.
PRESET_CASES = {
    "quick": [("step", "cifar10-32", 3, 32, 8), ("gn", "cifar10-32", 128, 32, 2), ("gn", "cifar10-32", 256, 8, 8)],
    # the GPU check's: batch 1 (the latency case), the UNets' own batches, and per family one case whose
    # byte floor is 256 MB or more in float16 (steps: 128x3x512x512, 604 MB; group norm: 16x128x256x256, the
    # split path's headline shape, 537 MB)
    "short": [("step", "cifar10-32", 3, 32, 1), ("step", "church-256", 3, 256, 8), ("step", "classic-512", 3, 512, 128),
              ("gn", "cifar10-32", 128, 32, 1), ("gn", "church-256", 128, 256, 1), ("gn", "cifar10-32", 128, 32, 64),
              ("gn", "church-256", 512, 16, 8), ("gn", "church-256", 128, 256, 16)],
}
FULL_BATCHES = (1, 8, 64)


def order_cases(todo: list[tuple]) -> list[tuple]:
    """Update steps before group norms (the check's time limit must not cut the fused step), otherwise as given."""
    return sorted(todo, key=lambda t: t[0] in GN_OPS)


def full_cases(configs, batches) -> list[tuple]:
    cases = []
    for name in configs:
        cfg = CONFIGS[name]
        for batch in batches:
            cases += [("gn", name, c, s, batch) for c, s in cfg["levels"]]
            cases.append(("step", name, *cfg["image"], batch))
    return cases


# ----------------------------------------------------------------------------------------- implementations
def _gn_eager(op):
    if op == "group_norm_silu":
        return lambda x, w, b: F.silu(F.group_norm(x, GROUPS, w, b, EPS))
    if op == "group_norm":
        return lambda x, w, b: F.group_norm(x, GROUPS, w, b, EPS)
    return lambda x, w, b, temb: F.silu(F.group_norm(x + temb[:, :, None, None], GROUPS, w, b, EPS))


def _gn_fastdiff(op):
    from fastdiff import ops

    if op == "group_norm_temb_silu":
        return lambda x, w, b, temb: ops.group_norm(x, GROUPS, w, b, EPS, add=temb, silu=True, backend="triton")
    silu = op == "group_norm_silu"
    return lambda x, w, b: ops.group_norm(x, GROUPS, w, b, EPS, silu=silu, backend="triton")


def _gn_reference(op):
    from fastdiff.ops import reference

    if op == "group_norm_temb_silu":
        return lambda x, w, b, temb: reference.group_norm(x, GROUPS, w, b, EPS, add=temb, silu=True)
    silu = op == "group_norm_silu"
    return lambda x, w, b: reference.group_norm(x, GROUPS, w, b, EPS, silu=silu)


class StepTables:
    """Coefficient tables of the real schedulers (DDPM 1000 steps, DDIM 50 steps with eta = 0), one row used."""

    def __init__(self, device):
        from fastdiff.schedulers import DDIMScheduler, DDPMScheduler

        self.ddpm = DDPMScheduler()
        self.ddpm.set_timesteps(1000, device=device)
        self.ddim = DDIMScheduler()
        self.ddim.set_timesteps(50, device=device)
        from fastdiff.schedulers import DPMSolverMultistepScheduler

        self.dpm = DPMSolverMultistepScheduler(solver_order=2)  # a middle step of 20 is second order
        self.dpm.set_timesteps(20, device=device)

    def get(self, op):
        sched = {"ddpm_step": self.ddpm, "dpm_step": self.dpm}.get(op, self.ddim)
        index = sched.num_inference_steps // 2  # a middle step: noise_std > 0 for DDPM
        return sched, index


def _step_impls(op, tables: StepTables):
    from fastdiff import ops
    from fastdiff.ops import reference

    sched, index = tables.get(op)
    coeffs, streams, clip = sched.coeffs, sched.noise_streams, getattr(sched, "clip_range", None)
    if op == "ddpm_step":
        return {
            "fastdiff": lambda x, m, noise, seeds: ops.ddpm_step(x, m, coeffs, index, clip_range=clip, seeds=seeds,
                                                                 noise_streams=streams, backend="triton"),
            "eager": lambda x, m, noise, seeds: reference.update_step(x, m, coeffs, index, clip_range=clip,
                                                                      noise=noise),
            # the reference with the same Philox noise as fastdiff: the check for fastdiff's output
            "reference_seeded": lambda x, m, noise, seeds: reference.update_step(
                x, m, coeffs, index, clip_range=clip, seeds=seeds, noise_streams=streams),
        }
    if op == "dpm_step":
        from fastdiff.ops import dpm_reference

        return {  # hist: the ring of 2 data predictions; the step reads slot (index - 1) % 2, writes index % 2
            "fastdiff": lambda x, m, hist: ops.dpm_solver_step(x, m, hist, coeffs, index, backend="triton"),
            "eager": lambda x, m, hist: dpm_reference.dpm_solver_step(x, m, hist, coeffs, index),
        }
    return {
        "fastdiff": lambda x, m: ops.ddim_step(x, m, coeffs, index, clip_range=clip, backend="triton"),
        "eager": lambda x, m: reference.update_step(x, m, coeffs, index, clip_range=clip),
    }


# ----------------------------------------------------------------------------------------- inputs
def _to_layout(t, layout):
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t.contiguous()


def make_inputs(op, shape, dtype, layout, device, n_sets) -> list[dict]:
    """``n_sets`` freshly randomised input sets (never zeros), each a dict of named tensors."""
    n, c = shape[:2]
    sets = []
    for _ in range(n_sets):
        x = _to_layout(torch.randn(shape, device=device, dtype=dtype), layout)
        if op in GN_OPS:
            s = {"x": x, "w": (1 + 0.1 * torch.randn(c, device=device)).to(dtype),
                 "b": (0.1 * torch.randn(c, device=device)).to(dtype)}
            if op == "group_norm_temb_silu":
                s["temb"] = torch.randn(n, c, device=device, dtype=dtype)
        else:
            s = {"x": x, "m": _to_layout(torch.randn(shape, device=device, dtype=dtype), layout)}
            if op == "ddpm_step":
                s["noise"] = _to_layout(torch.randn(shape, device=device, dtype=dtype), layout)
                s["seeds"] = torch.randint(0, 2**62, (n,), device=device, dtype=torch.int64)
            if op == "dpm_step":  # history slots in the sample's layout, one after the other
                hist = torch.randn((2, n, *shape[2:], c) if layout == "channels_last" else (2, *shape),
                                   device=device, dtype=dtype)
                s["hist"] = hist.permute(0, 1, 4, 2, 3) if layout == "channels_last" else hist
        sets.append(s)
    return sets


def floor_bytes(op, shape, elem) -> dict:
    n, c = shape[:2]
    numel = math.prod(shape)
    if op in GN_OPS:
        b = 2 * numel * elem + 2 * c * elem + (n * c * elem if op == "group_norm_temb_silu" else 0)
        return {impl: b for impl in IMPLS}
    if op == "ddpm_step":
        return {"fastdiff": 3 * numel * elem, "eager": 4 * numel * elem, "compile": 4 * numel * elem}
    if op == "dpm_step":
        return {impl: 5 * numel * elem for impl in IMPLS}
    return {impl: 3 * numel * elem for impl in IMPLS}


# ----------------------------------------------------------------------------------------- one case
def _not_run(record: dict, reason: str) -> dict:
    record["status"] = "not run"
    record["reason"] = reason
    for key in ("median_s", "gbps", "fraction_of_copy", "fraction_of_peak_copy"):
        common.put(record, key, None, reason)
    return record


def copy_at(floor: int, device, state, args) -> dict:
    """The copy that moves ``floor`` bytes (read + written), measured once per size in this run."""
    cache = state.setdefault("copies", {})
    if floor not in cache:
        cache[floor] = common.measure_copy_bandwidth(device, nbytes=floor // 2, target_s=args.target_time / 2)
    return cache[floor]


def run_case(op, config, shape, dtype, layout, device, peak_copy_gbps, state, args) -> dict:
    """Time the three implementations of one (op, shape, dtype, layout); never raises for an implementation."""
    from fastdiff.testing import RTOL, relative_error

    elem = torch.empty((), dtype=dtype).element_size()
    floors = floor_bytes(op, shape, elem)
    set_bytes = floors["eager"] + math.prod(shape) * elem  # inputs plus one output
    n_sets = common.rotation_sets(set_bytes, device)
    sets = make_inputs(op, shape, dtype, layout, device, n_sets)
    rec = {"op": op, "config": config, "shape": list(shape), "groups": GROUPS if op in GN_OPS else None,
           "dtype": common.dtype_name(dtype), "layout": layout, "elem_bytes": elem, "input_sets": n_sets,
           "floor": FLOORS[op], "impls": {}}
    if op not in GN_OPS:
        rec["groups_reason"] = "not a GroupNorm op"

    if op in GN_OPS:
        keys = ("x", "w", "b", "temb") if op == "group_norm_temb_silu" else ("x", "w", "b")
        fns = {"fastdiff": _gn_fastdiff(op), "eager": _gn_eager(op)}
        check_ref = {"fastdiff": _gn_reference(op), "eager": _gn_reference(op), "compile": _gn_reference(op)}
    else:
        keys = {"ddpm_step": ("x", "m", "noise", "seeds"), "dpm_step": ("x", "m", "hist")}.get(op, ("x", "m"))
        step = _step_impls(op, state["tables"])
        fns = {"fastdiff": step["fastdiff"], "eager": step["eager"]}
        check_ref = {"fastdiff": step.get("reference_seeded", step["eager"]), "eager": step["eager"],
                     "compile": step["eager"]}
    arg_sets = [tuple(s[k] for k in keys) for s in sets]

    for impl in IMPLS:
        r = {"floor_bytes": floors[impl]}
        rec["impls"][impl] = r
        fn = fns.get(impl)
        if impl == "fastdiff" and device.type != "cuda":
            _not_run(r, "not run: no CUDA (on the CPU Triton runs only in its interpreter, far too slow to time)")
            continue
        if impl == "compile":
            if args.no_compile:
                _not_run(r, "skipped: --no-compile")
                continue
            if state["compile_budget"] is not None and state["compile_spent"] >= state["compile_budget"]:
                _not_run(r, f"skipped: the torch.compile budget ({state['compile_budget']:.0f} s of compilation; "
                            f"--compile-budget, 30 s with --quick) is used up")
                continue
            t0 = time.perf_counter()
            try:
                torch._dynamo.reset()  # a fresh cache per case: no recompile limit, no shape-generic kernel
                fn = torch.compile(fns["eager"], dynamic=False, fullgraph=True)
                fn(*arg_sets[0])
                common.sync(device)
                r["compile_s"] = time.perf_counter() - t0
                state["compile_spent"] += r["compile_s"]
            except Exception as exc:  # compile failure is a result, not a crash
                state["compile_spent"] += time.perf_counter() - t0
                _not_run(r, f"torch.compile failed: {common.short_error(exc)}")
                r["status"] = "failed"
                continue
        try:
            out = fn(*arg_sets[0])
            ref = check_ref[impl](*arg_sets[0])
            err = relative_error(out, ref)
            r["rel_error_vs_reference"] = err
            r["tolerance"] = RTOL[dtype]
            r["within_tolerance"] = err <= RTOL[dtype]
            timing = common.time_calls(fn, arg_sets, device, target_s=args.target_time,
                                       max_reps=50 if args.quick else 200)
        except Exception as exc:  # an implementation that cannot run this input is reported, not fatal
            _not_run(r, f"failed: {common.short_error(exc)}")
            r["status"] = "failed"
            continue
        r["status"] = "ok"
        r.update(timing)
        r["gbps"] = floors[impl] / timing["median_s"] / 1e9
        copy = copy_at(floors[impl], device, state, args)
        r["copy_same_bytes"] = {k: copy[k] for k in ("buffer_bytes", "bytes_moved", "median_s", "gbps", "repeats")}
        r["fraction_of_copy"] = r["gbps"] / copy["gbps"]  # against a copy of the same bytes
        r["fraction_of_peak_copy"] = r["gbps"] / peak_copy_gbps  # against the large copy of "limits"
    del sets, arg_sets

    med = {k: v.get("median_s") for k, v in rec["impls"].items()}
    why = {k: v.get("median_s_reason") for k, v in rec["impls"].items()}
    for name, num, den in (("speedup_vs_eager", "eager", "fastdiff"), ("speedup_vs_compile", "compile", "fastdiff"),
                           ("compile_speedup_vs_eager", "eager", "compile")):
        common.put(rec, name, common.ratio(med[num], med[den]),
                   f"not measured: {why[den] or why[num]}" if (med[num] is None or med[den] is None) else
                   "not measured: zero time")
    return rec


# ----------------------------------------------------------------------------------------- reports
def _cell_time(impl: dict) -> str:
    return common.fmt(impl["median_s"] * 1e6 if impl.get("median_s") is not None else None, ".1f")


def _cell_bw(impl: dict) -> str:
    if impl.get("gbps") is None:
        return "n/m"
    return f"{impl['gbps']:.1f} ({100 * impl['fraction_of_copy']:.0f}%)"


def markdown(report: dict) -> str:
    prov = report["provenance"]
    label = "CPU" if report["settings"]["device"] == "cpu" else f"GPU ({prov.get('gpu')})"
    lim = report["limits"]["copy"]
    lines = [f"# fastdiff kernel benchmark: {label}", "", common.provenance_markdown(prov), "",
             f"Peak copy bandwidth measured in this run: **{lim['gbps']:.1f} GB/s** (bytes read + written, "
             f"{lim['buffer_bytes'] / 2**20:.0f} MiB buffer). Times are medians in microseconds; GB/s are from each "
             f"op's byte floor, with in brackets the fraction of a copy that moves the same bytes, timed the same "
             f"way in this run (the fraction of the peak copy is in the JSON); n/m = not measured "
             f"(reasons in the JSON).", ""]
    for op, text in FLOORS.items():
        lines.append(f"- `{op}` floor: {text}")
    lines.append("")
    headers = ["op", "config", "N x C x H x W", "dtype", "layout", "fastdiff µs", "eager µs", "compile µs",
               "fastdiff GB/s", "eager GB/s", "compile GB/s", "vs eager", "vs compile", "compile vs eager"]
    rows = []
    for c in report["cases"]:
        i = c["impls"]
        rows.append([c["op"], c["config"], "x".join(map(str, c["shape"])), c["dtype"], c["layout"],
                     _cell_time(i["fastdiff"]), _cell_time(i["eager"]), _cell_time(i["compile"]),
                     _cell_bw(i["fastdiff"]), _cell_bw(i["eager"]), _cell_bw(i["compile"]),
                     common.fmt(c["speedup_vs_eager"], ".2f"), common.fmt(c["speedup_vs_compile"], ".2f"),
                     common.fmt(c["compile_speedup_vs_eager"], ".2f")])
    lines.append(common.markdown_table(headers, rows))
    reasons = sorted({v["reason"] for c in report["cases"] for v in c["impls"].values() if v.get("reason")})
    if reasons:
        lines += ["", "Not measured:"] + [f"- {r}" for r in reasons]
    wrong = [f"- {c['op']} {'x'.join(map(str, c['shape']))} {c['dtype']} {c['layout']}: {name} relative error "
             f"{v['rel_error_vs_reference']:.2e} > {v['tolerance']:.1e}"
             for c in report["cases"] for name, v in c["impls"].items() if v.get("within_tolerance") is False]
    if wrong:
        lines += ["", "**Outputs outside the tolerance of fastdiff/testing.py** (timed anyway):"] + wrong
    return "\n".join(lines) + "\n"


def chart(report: dict, path: Path) -> None:
    plt = common.pyplot()
    ops_present = [op for op in OPS if any(c["op"] == op for c in report["cases"])]
    fig, axes = plt.subplots(1, len(ops_present), figsize=(4.2 * len(ops_present), 3.8), squeeze=False)
    copy = report["limits"]["copy"]["gbps"]
    styles = {"fastdiff": ("o", "tab:red"), "eager": ("s", "tab:blue"), "compile": ("^", "tab:green")}
    from matplotlib.ticker import EngFormatter

    for ax, op in zip(axes[0], ops_present):
        cases = [c for c in report["cases"] if c["op"] == op]
        top = copy
        for impl, (marker, color) in styles.items():
            pts = [(c["impls"][impl]["floor_bytes"], c["impls"][impl]["gbps"]) for c in cases
                   if c["impls"][impl].get("gbps") is not None]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, color=color, label=impl, alpha=0.8)
                top = max(top, max(p[1] for p in pts))
        ax.axhline(copy, color="gray", linestyle="--", label=f"copy {copy:.3g} GB/s")
        ax.set_xscale("log")
        common.plain_log_axis(ax.xaxis, EngFormatter(unit="B"), subs=(1.0, 3.0))
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.set_ylim(0, 1.1 * top)
        ax.set_title(op, fontsize=10)
        ax.set_xlabel("byte floor per call")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("achieved GB/s (byte floor / median time)")
    label = "CPU" if report["settings"]["device"] == "cpu" else report["provenance"].get("gpu")
    fig.suptitle(f"fastdiff kernels vs torch eager and torch.compile ({label})")
    common.save_png(fig, path)
    plt.close(fig)


def write_reports(report: dict, out: Path, final: bool) -> None:
    """JSON (also while running), then the Markdown table and, where matplotlib is installed, the chart."""
    if final:
        common.put(report, "chart", None if common.chart_problem() else "kernels.png", common.chart_problem())
    common.write_json_atomic(out / "kernels.json", report)
    if final:
        common.write_text_atomic(out / "kernels.md", markdown(report))
        if report["chart"]:
            chart(report, out / "kernels.png")
        else:
            print(f"bench kernels: chart {report['chart_reason']}", file=sys.stderr)


# ----------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastdiff bench kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--quick", action="store_true", help="a handful of small shapes (CPU-friendly, about a minute)")
    p.add_argument("--preset", choices=("quick", "short", "full"), default=None,
                   help="shape set: quick (= --quick), short (the GPU check's), full (default)")
    p.add_argument("--out", default=None, help="output folder (default bench/results/<device>-<date>/)")
    p.add_argument("--dtypes", default=None, help="comma-separated float32,float16,bfloat16 "
                   "(default: all three on CUDA, float32 on the CPU; the short preset uses float16)")
    p.add_argument("--layouts", default=None, help="comma-separated nchw,channels_last (default: both; quick: nchw)")
    p.add_argument("--configs", default=",".join(CONFIGS), help="full preset: UNet configurations to take shapes from")
    p.add_argument("--batches", default=",".join(map(str, FULL_BATCHES)), help="full preset: batch sizes")
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated ops to run")
    p.add_argument("--max-tensor-mib", type=float, default=None,
                   help="skip shapes whose input tensor is larger (default 1024 on CUDA, 64 on the CPU)")
    p.add_argument("--target-time", type=float, default=None, help="seconds of timed calls per measurement")
    p.add_argument("--no-compile", action="store_true", help="do not run the torch.compile peer")
    p.add_argument("--time-budget", type=float, default=float("inf"),
                   help="seconds after which no further case is started (the report says how many were left)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: 1 for --quick on the CPU, else torch's choice)")
    p.add_argument("--compile-budget", type=float, default=None,
                   help="seconds of torch.compile compilation after which further compiles are skipped "
                        "(default: 30 with --quick, unlimited otherwise)")
    return p


def _select(text: str, allowed, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise ValueError(f"{what}: unknown {bad or text!r}; choose from {', '.join(allowed)}")
    return items


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    device = common.resolve_device(args.device)
    preset = args.preset or ("quick" if args.quick else "full")
    args.quick = preset == "quick"
    with common.cpu_threads(common.default_threads(device, args.quick, args.threads)):
        return _run(args, argv, device, preset)


def _run(args, argv, device, preset) -> int:
    if args.dtypes:
        dtypes = common.parse_dtypes(args.dtypes)
    elif device.type == "cpu":
        dtypes = [torch.float32]
    elif preset == "short":
        dtypes = [torch.float16]
    else:
        dtypes = [torch.float16, torch.bfloat16, torch.float32] if preset == "full" else [torch.float16]
    layouts = _select(args.layouts, LAYOUTS, "--layouts") if args.layouts else (
        ["nchw"] if preset == "quick" else list(LAYOUTS))
    ops = _select(args.ops, OPS, "--ops")
    if preset == "full":
        cases = full_cases(_select(args.configs, CONFIGS, "--configs"), common.parse_ints(args.batches, "--batches"))
    else:
        cases = PRESET_CASES[preset]
    max_mib = args.max_tensor_mib or (1024 if device.type == "cuda" else 64)
    if args.target_time is None:
        args.target_time = 0.1 if preset != "full" else 0.25
    budget = args.compile_budget if args.compile_budget is not None else (30.0 if args.quick else None)
    out = Path(args.out) if args.out else common.default_out_dir(device)
    out.mkdir(parents=True, exist_ok=True)

    t_start = time.perf_counter()
    print(f"bench kernels: {device}, preset {preset}, measuring limits ...", file=sys.stderr)
    copy = common.measure_copy_bandwidth(device, quick=preset != "full")
    report = {
        "schema": "fastdiff-bench-kernels/1",
        "provenance": common.provenance(device, argv, "fastdiff bench kernels " + " ".join(argv)),
        "settings": {"device": device.type, "preset": preset, "dtypes": [common.dtype_name(d) for d in dtypes],
                     "layouts": layouts, "ops": ops, "groups": GROUPS, "eps": EPS, "max_tensor_mib": max_mib,
                     "target_time_s": args.target_time, "compile_budget_s": budget,
                     "compile": "torch.compile(eager_fn, dynamic=False, fullgraph=True), torch._dynamo.reset() "
                                "before each case"},
        "limits": {"copy": copy},
        "floors": FLOORS,
        "cases": [],
    }
    if budget is None:
        report["settings"]["compile_budget_s_reason"] = "no budget: every case is compiled"
    state = {"compile_budget": budget, "compile_spent": 0.0, "tables": None}
    todo = []
    for kind, config, c, s, n in cases:
        for op in ops:
            if (op in GN_OPS) != (kind == "gn"):
                continue
            for dtype in dtypes:
                elem = torch.empty((), dtype=dtype).element_size()
                if n * c * s * s * elem > max_mib * 2**20:
                    continue
                for layout in layouts:
                    todo.append((op, config, (n, c, s, s), dtype, layout))
    todo = order_cases(todo)
    if any(t[0] not in GN_OPS for t in todo):
        state["tables"] = StepTables(device)
    for i, (op, config, shape, dtype, layout) in enumerate(todo):
        if time.perf_counter() - t_start > args.time_budget:
            report["stopped_early"] = (f"the time budget of {args.time_budget:.0f} s was used up; "
                                       f"{len(todo) - i} of {len(todo)} cases not run")
            print(f"bench kernels: {report['stopped_early']}", file=sys.stderr)
            break
        rec = run_case(op, config, shape, dtype, layout, device, copy["gbps"], state, args)
        report["cases"].append(rec)
        print(f"[{i + 1}/{len(todo)}] {op} {config} {'x'.join(map(str, shape))} {common.dtype_name(dtype)} "
              f"{layout}: " + ", ".join(f"{k} {_cell_time(v)} µs" for k, v in rec["impls"].items()), file=sys.stderr)
        write_reports(report, out, final=False)  # partial results survive an interrupted run
    report["settings"]["compile_spent_s"] = state["compile_spent"]
    report["elapsed_s"] = time.perf_counter() - t_start
    write_reports(report, out, final=True)
    print(f"bench kernels: {len(report['cases'])} cases in {report['elapsed_s']:.0f} s -> "
          f"{out}/kernels.{{json,md{',png' if report['chart'] else ''}}}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
