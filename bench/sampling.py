"""``fastdiff bench sampling``: end-to-end image generation, fastdiff against its peers on the same weights.

Modes (one diffusers ``UNet2DModel`` with random weights per configuration; fastdiff's UNet gets a copy):

* ``reference``: fastdiff's Sampler with the reference ops, eager;
* ``triton``: the Triton ops, eager (CUDA only);
* ``triton+graphs``: the Triton ops with the step captured in a CUDA graph (CUDA only);
* ``diffusers``: diffusers' ``UNet2DModel`` stepped by diffusers' own DDIM/DDPM scheduler in a plain loop;
* ``compile``: ``torch.compile(mode=...)`` (default ``max-autotune``) of fastdiff's reference model, eager loop;
* ``pipeline`` / ``pipeline+accelerate``: diffusers' DDIMPipeline / DDPMPipeline call, plain and after
  ``fastdiff.accelerate`` (same call, same weights; ``bench/pipelines.py``), plus Stable-Diffusion-shaped rows.

Per run: median seconds of a whole sampling call, images/s, per-step latency, FLOPs per image per step counted
with ``torch.utils.flop_counter.FlopCounterMode`` (meta device, batch 1), achieved TFLOP/s and its fraction of a
matrix-multiply rate measured in the same run, peak memory, and through nvidia-ml-py the average power, energy
per image and clocks. DDIM runs are deterministic (eta = 0) and start from the same noise in every mode, so each
mode's images are compared with the reference mode's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from bench import common, pipelines

MODES = ("reference", "triton", "triton+graphs", "diffusers", "compile") + pipelines.PIPELINE_MODES
CUDA_ONLY = ("triton", "triton+graphs")

_BASE = {"act_fn": "silu", "attention_head_dim": None, "center_input_sample": False, "downsample_padding": 0,
         "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
         "mid_block_scale_factor": 1, "norm_eps": 1e-6, "norm_num_groups": 32, "time_embedding_type": "positional"}
# diffusers UNet2DModel configurations (as in the google/ddpm-* checkpoints' config.json).
MODEL_CONFIGS = {
    # google/ddpm-cifar10-32: 35.7M parameters, attention at 16x16.
    "cifar10-32": {**_BASE, "block_out_channels": [128, 256, 256, 256], "sample_size": 32,
                   "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
                   "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]},
    # google/ddpm-church-256: 113.7M parameters, attention at 16x16.
    "church-256": {**_BASE, "block_out_channels": [128, 128, 256, 256, 512, 512], "sample_size": 256,
                   "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
                   "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4},
    # A tiny model for CPU smoke runs (--quick on the CPU).
    "tiny-16": {**_BASE, "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8,
                "sample_size": 16, "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
                "up_block_types": ["AttnUpBlock2D", "UpBlock2D"]},
}
# The noise schedule of the google/ddpm-* checkpoints (diffusers scheduler config keys).
SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
            "clip_sample": True}

# DPM-Solver++ (2M) at 15 steps reaches the quality of DDIM at 50 (docs/dpm_solver.md): their images/s side by side
# are the speed-up at equal quality.
PRESETS = {
    # models, batches, (scheduler, steps) pairs, timed calls per run, seconds after which a run stops repeating
    "quick": {"models": ["tiny-16"], "batches": [1, 4], "schedulers": [("ddim", 10), ("ddpm", 3), ("dpmsolver++", 3)],
              "repeats": 3, "run_budget": 30},
    # the GPU check's: batch 1 first (the latency case), then 64
    "short": {"models": ["cifar10-32"], "batches": [1, 64],
              "schedulers": [("ddim", 50), ("dpmsolver++", 15), ("ddpm", 10)], "repeats": 3, "run_budget": 20},
    "full": {"models": ["cifar10-32", "church-256"], "batches": [1, 8, 64, 256],
             "schedulers": [("ddim", 50), ("dpmsolver++", 15), ("ddpm", 20)], "repeats": 3, "run_budget": 30},
    "cpu": {"models": ["cifar10-32"], "batches": [1], "schedulers": [("ddim", 50), ("dpmsolver++", 15), ("ddpm", 5)],
            "repeats": 2, "run_budget": 60},
}


# ----------------------------------------------------------------------------------------- models
def diffusers_problem() -> str | None:
    """Why diffusers' peer cannot run here ("diffusers missing"), or None."""
    return common.missing("diffusers")


def count_flops(name: str) -> dict:
    """FLOPs of one forward pass for one image, counted on the meta device for fastdiff and diffusers."""
    from torch.utils.flop_counter import FlopCounterMode

    from fastdiff.shapes import flops_per_image
    from fastdiff.unet import UNetConfig

    cfg = MODEL_CONFIGS[name]
    out = {"how": "torch.utils.flop_counter.FlopCounterMode, one forward at batch 1 on the meta device "
                  "(convolutions, linear layers and attention matmuls; a multiply-add counts 2; norms and "
                  "elementwise ops not counted)",
           "fastdiff": flops_per_image(UNetConfig.from_diffusers_config(cfg))}
    problem = diffusers_problem()
    if problem:
        common.put(out, "diffusers", None, f"not measured: {problem}")
        return out
    from diffusers import UNet2DModel

    with torch.device("meta"):
        model = UNet2DModel(**cfg)
    size = cfg["sample_size"]
    x = torch.empty(1, cfg["in_channels"], size, size, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, torch.tensor([500], device="meta"))
    out["diffusers"] = counter.get_total_flops()
    return out


def count_launches(model, device, dtype) -> dict:
    """Launches of one sampling step (UNet forward + DDIM update) at batch 1, per backend, on this device."""
    from fastdiff.profiling import sampling_step_launches

    out = {"how": "fastdiff.profiling.sampling_step_launches: aten ops that launch work plus Triton kernels, "
                  "recorded with a TorchDispatchMode over one SamplingPlan.step at batch 1 (views and allocations "
                  "excluded; a library may split an op into several kernels, so a lower bound on CUDA); 'auto' "
                  "is the fast path where Triton runs (CUDA), the reference ops elsewhere",
           "batch": 1}
    for backend in ("reference", "auto"):
        try:
            counted = sampling_step_launches(model, fastdiff_scheduler("ddim"), backend=backend, device=device,
                                             dtype=dtype)
            common.put(out, backend, counted["launches"])
            out[backend + "_host_reads"] = len(counted["host_reads"])
        except Exception as exc:  # a counting problem must not stop the benchmark
            common.put(out, backend, None, f"not measured: {common.short_error(exc)}")
    return out


def build_models(name: str, device, dtype):
    """(fastdiff UNet, diffusers UNet2DModel or None, reason) with the same random weights."""
    from fastdiff.unet import UNet, UNetConfig

    cfg = MODEL_CONFIGS[name]
    torch.manual_seed(0)
    if diffusers_problem():
        model = UNet(UNetConfig.from_diffusers_config(cfg)).to(device=device, dtype=dtype).eval()
        return model, None, f"not measured: {diffusers_problem()}"
    from diffusers import UNet2DModel

    dmodel = UNet2DModel(**cfg).to(device=device).eval()
    if dtype != torch.float32:  # (a float32 model is left alone: diffusers warns about any dtype cast)
        dmodel = dmodel.to(dtype=dtype)
    model = UNet.from_diffusers(dmodel).eval()
    return model, dmodel, None


def schedule_for(kind: str) -> dict:
    """SCHEDULE as constructor arguments of ``kind``'s scheduler (DPM-Solver has no x0 clipping)."""
    return {k: v for k, v in SCHEDULE.items() if not (kind == "dpmsolver++" and k == "clip_sample")}


def fastdiff_scheduler(kind: str):
    from fastdiff.schedulers import SCHEDULERS

    return SCHEDULERS[kind](**schedule_for(kind))


def diffusers_loop(dmodel, kind: str, steps: int, x_start: torch.Tensor, generator_device):
    """diffusers' own scheduler loop (what DDPMPipeline / DDIMPipeline run, without the image post-processing)."""
    import diffusers

    cls = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "dpmsolver++": "DPMSolverMultistepScheduler"}[kind]
    sched = getattr(diffusers, cls)(**schedule_for(kind))
    generator = torch.Generator(device=generator_device).manual_seed(0)

    @torch.no_grad()
    def run():
        sched.set_timesteps(steps, device=x_start.device)  # per call, as the pipelines do (multistep state resets)
        image = x_start.clone()
        for t in sched.timesteps:
            model_output = dmodel(image, t).sample
            if kind == "ddim":
                image = sched.step(model_output, t, image, eta=0.0).prev_sample
            else:
                image = sched.step(model_output, t, image, generator=generator).prev_sample
        return image

    return run


# ----------------------------------------------------------------------------------------- one run
def _skip(rec: dict, status: str, reason: str) -> None:
    """Mark a run as not measured: every figure null with ``reason``."""
    rec["status"] = status
    rec["reason"] = reason
    for key in ("median_s", "images_per_s", "step_latency_s", "tflops", "fraction_of_matmul", "peak_memory_bytes",
                "energy_j", "energy_per_image_j", "avg_power_w", "sm_clock_mhz", "mem_clock_mhz",
                "forward_rel_error_vs_reference"):
        common.put(rec, key, None, reason)


def time_mode(rec: dict, fn, device, repeats: int, budget_s: float, monitor: common.GpuMonitor) -> None:
    """Warm-up call, then up to ``repeats`` timed calls (at least one) within ``budget_s``; fills ``rec``."""
    first_s, _ = common.time_run(fn, device)
    rec["first_run_s"] = first_s  # includes compilation, autotuning and graph capture
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    monitor.begin()
    samples = []
    try:
        while len(samples) < repeats and (not samples or sum(samples) + samples[-1] <= budget_s):
            t, _ = common.time_run(fn, device)
            samples.append(t)
    finally:
        readings = monitor.end()
    rec.update(samples_s=samples, repeats=len(samples), median_s=statistics.median(samples))
    if device.type == "cuda":
        rec["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    else:
        common.put(rec, "peak_memory_bytes", None, "not measured: CPU run (no allocator statistics)")
    rec.update(readings)
    images = rec["batch"] * len(samples)
    common.put(rec, "energy_per_image_j", common.ratio(readings.get("energy_j"), images),
               readings.get("energy_j_reason", "not measured: no energy reading"))


def _mode_problem(mode, ctx, args) -> tuple[str, str] | None:
    """(status, reason) when ``mode`` cannot or should not run here, else None."""
    device = ctx["device"]
    if mode in CUDA_ONLY and device.type != "cuda":
        return "not run", "not run: no CUDA (the Triton kernels and CUDA graphs need a GPU)"
    if mode in ("diffusers", *pipelines.PIPELINE_MODES) and ctx["dmodel"] is None:
        return "not run", ctx["dmodel_reason"]
    if mode == "compile":
        if args.no_compile:
            return "skipped", "skipped: --no-compile"
        if args.quick and device.type == "cpu":
            return "skipped", ("skipped: --quick on the CPU; compiling the UNet with torch.compile takes minutes on "
                               "a small CPU (run without --quick to measure it)")
    if ctx["elapsed"]() > args.time_budget:
        return "skipped", f"skipped: the time budget of {args.time_budget:.0f} s is used up"
    return None


def _build_diffusers(mode, ctx, rec, args, seeds):
    """diffusers' UNet2DModel stepped by diffusers' own scheduler, from fastdiff's starting noise."""
    from fastdiff import ops

    shape = (rec["batch"], *ctx["image_shape"])
    x_start = ops.gaussian_noise(seeds, ops.INITIAL_NOISE_STREAM, shape[1:], dtype=torch.float32,
                                 backend="reference").to(ctx["dtype"])
    fn = diffusers_loop(ctx["dmodel"], rec["scheduler"], rec["steps"], x_start, ctx["device"])

    def forward(x, t):
        return ctx["dmodel"](x, t).sample

    return fn, forward


def _build_pipeline(mode, ctx, rec, args, seeds):
    """diffusers' own pipeline, plain or after ``fastdiff.accelerate`` (bench/pipelines.py)."""
    return pipelines.pipeline_mode(mode, ctx, rec)


def _build_fastdiff(mode, ctx, rec, args, seeds):
    """fastdiff's Sampler: reference ops, Triton ops, Triton ops + CUDA graphs, or torch.compile of the model."""
    from fastdiff.sampling import Sampler

    model, backend, graphs = ctx["model"], "reference", False
    if mode in CUDA_ONLY:
        backend, graphs = "triton", mode == "triton+graphs"
    if mode == "compile":
        model.set_backend("reference")
        key = (id(model), rec["batch"])
        if ctx["compiled"].get("key") != key:  # a fresh compile per batch size: static shapes
            torch._dynamo.reset()
            ctx["compiled"] = {"key": key, "model": torch.compile(model, mode=args.compile_mode, dynamic=False)}
        model = ctx["compiled"]["model"]
        rec["compile_mode"] = args.compile_mode
    sampler = Sampler(model, fastdiff_scheduler(rec["scheduler"]), device=ctx["device"], dtype=ctx["dtype"],
                      backend=backend, cuda_graphs=graphs)

    def fn():
        return sampler.sample(seeds, steps=rec["steps"])

    return fn, sampler.model  # the model with this mode's backend set (the CUDA graph replays these same ops)


# Mode -> builder(mode, ctx, rec, args, seeds) returning (fn: one whole sampling call, forward(x, t): one UNet
# forward of this mode, checked against the reference mode's). A new mode adds itself to MODES, here, and where
# it cannot run to ``_mode_problem``; ``run_mode`` times it, counts its FLOPs and compares its forward.
MODE_BUILDERS = {"reference": _build_fastdiff, "triton": _build_fastdiff, "triton+graphs": _build_fastdiff,
                 "compile": _build_fastdiff, "diffusers": _build_diffusers,
                 **{mode: _build_pipeline for mode in pipelines.PIPELINE_MODES}}


def run_mode(mode, ctx, rec, args) -> None:
    """Time one mode for one (model, scheduler, batch) and check its forward pass; fills ``rec``."""
    from fastdiff.sampling import image_seeds

    device, batch, steps = ctx["device"], rec["batch"], rec["steps"]
    problem = _mode_problem(mode, ctx, args)
    if problem:
        return _skip(rec, *problem)
    seeds = image_seeds(0, range(batch), device=device)
    rec["flops_per_image_step"] = ctx["flops"]["diffusers" if mode in ("diffusers", *pipelines.PIPELINE_MODES)
                                                else "fastdiff"]
    try:
        fn, forward = MODE_BUILDERS[mode](mode, ctx, rec, args, seeds)
        time_mode(rec, fn, device, args.repeats, args.run_budget, ctx["monitor"])
    except Exception as exc:  # out of memory, an unsupported input, a failed compile: a result, not a crash
        if device.type == "cuda":
            torch.cuda.empty_cache()
        what = "out of memory" if "out of memory" in str(exc).lower() else "failed"
        _skip(rec, "failed", f"{what}: {common.short_error(exc)}")
        return
    rec["status"] = "ok"
    t = rec["median_s"]
    rec["images_per_s"] = batch / t
    rec["step_latency_s"] = t / steps
    rec["tflops"] = rec["flops_per_image_step"] * batch * steps / t / 1e12
    matmul = ctx["matmul"]
    common.put(rec, "fraction_of_matmul", common.ratio(rec["tflops"], matmul.get("tflops")),
               matmul.get("tflops_reason", "not measured"))
    try:
        check_forward(mode, forward, ctx, rec)
    except Exception as exc:  # the timing stands; the check says why it could not run
        common.put(rec, "forward_rel_error_vs_reference", None, f"not compared: {common.short_error(exc)}")


def check_forward(mode, forward, ctx, rec) -> None:
    """Relative error of one UNet forward of this mode against the reference mode's, on the same input.

    (Whole sampling runs cannot be compared: with random weights a 50-step trajectory is chaotic, and a
    1e-7 change of the starting noise already changes the images by tens of percent.)
    """
    from fastdiff.testing import relative_error

    batch = rec["batch"]
    if batch not in ctx["check_inputs"]:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, *ctx["image_shape"], generator=g).to(ctx["device"], ctx["dtype"])
        ctx["check_inputs"][batch] = (x, torch.tensor(500, device=ctx["device"]))  # a mid-schedule timestep
    with torch.no_grad():
        out = forward(*ctx["check_inputs"][batch]).float()
    if mode == "reference":
        ctx["reference_outputs"][batch] = out
    ref = ctx["reference_outputs"].get(batch)
    common.put(rec, "forward_rel_error_vs_reference", None if ref is None else relative_error(out, ref),
               "not compared: the reference mode did not run at this batch size")


def add_ratios(group: list[dict]) -> None:
    """Speedups of each run of one (model, scheduler, steps, batch) over the other modes' median times."""
    med = {r["mode"]: r.get("median_s") for r in group}
    why = {r["mode"]: r.get("median_s_reason") for r in group}
    for r in group:
        for peer, key in (("diffusers", "speedup_vs_diffusers"), ("reference", "speedup_vs_reference"),
                          ("compile", "speedup_vs_compile")):
            if peer not in med:
                reason = f"not measured: the {peer} mode was not run"
            else:
                reason = f"not measured: {why[r['mode']] or why[peer]}"
            common.put(r, key, common.ratio(med.get(peer), med[r["mode"]]), reason)


# ----------------------------------------------------------------------------------------- reports
def markdown(report: dict) -> str:
    prov = report["provenance"]
    cpu = report["settings"]["device"] == "cpu"
    label = "CPU" if cpu else f"GPU ({prov.get('gpu')})"
    lines = [f"# fastdiff sampling benchmark: {label}", "", common.provenance_markdown(prov), ""]
    mm = report["limits"]["matmul"]
    mm_text = f"{mm['tflops']:.3g} TFLOP/s ({mm['what']})" if mm.get("tflops") else mm.get("tflops_reason")
    lines += [f"Matrix-multiply rate measured in this run: {mm_text}. dtype {report['settings']['dtype']}. "
              f"Median of the timed sampling calls after one warm-up call; n/m = not measured (reasons in the JSON).",
              ""]
    for name, m in report["models"].items():
        launches = m.get("launches_per_step", {})
        lines.append(f"- `{name}`: {m['params'] / 1e6:.2f}M parameters, {m['flops']['fastdiff'] / 1e9:.3g} GFLOP "
                     f"per image per step (counted); launches per step at batch 1: reference "
                     f"{launches.get('reference', 'n/m')}, auto {launches.get('auto', 'n/m')}")
    lines.append("")
    headers = ["model", "sched", "steps", "batch", "mode", "images/s", "ms/step", "vs diffusers", "vs reference",
               "TFLOP/s (% matmul)", "peak GiB", "W", "J/image", "forward rel. err vs reference"]
    rows = []
    for r in report["runs"]:
        tf = "n/m" if r.get("tflops") is None else (
            f"{r['tflops']:.3g}" + (f" ({100 * r['fraction_of_matmul']:.1f}%)" if r.get("fraction_of_matmul") else ""))
        mem = None if r.get("peak_memory_bytes") is None else r["peak_memory_bytes"] / 2**30
        rows.append([r["model"], r["scheduler"], r["steps"], r["batch"], r["mode"],
                     common.fmt(r.get("images_per_s"), ".3g"),
                     common.fmt(None if r.get("step_latency_s") is None else r["step_latency_s"] * 1e3, ".3g"),
                     common.fmt(r.get("speedup_vs_diffusers"), ".2f"), common.fmt(r.get("speedup_vs_reference"), ".2f"),
                     tf, common.fmt(mem, ".2f"), common.fmt(r.get("avg_power_w"), ".0f"),
                     common.fmt(r.get("energy_per_image_j"), ".3g"),
                     common.fmt(r.get("forward_rel_error_vs_reference"), ".1e")])
    lines.append(common.markdown_table(headers, rows))
    reasons = sorted({r["reason"] for r in report["runs"] if r.get("reason")})
    if reasons:
        lines += ["", "Not measured:"] + [f"- {x}" for x in reasons]
    lines += pipelines.sd_markdown(report.get("stable_diffusion"))
    return "\n".join(lines) + "\n"


def chart(report: dict, path: Path) -> None:
    plt = common.pyplot()
    groups = []
    for r in report["runs"]:
        key = (r["model"], r["scheduler"], r["steps"])
        if key not in groups:
            groups.append(key)
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(5.5 * max(1, len(groups)), 4.2), squeeze=False,
                             layout="constrained")
    colors = dict(zip(MODES, ("tab:gray", "tab:orange", "tab:red", "tab:blue", "tab:green", "tab:cyan",
                              "tab:purple")))
    for ax, (model, sched, steps) in zip(axes[0], groups):
        runs = [r for r in report["runs"] if (r["model"], r["scheduler"], r["steps"]) == (model, sched, steps)]
        batches = sorted({r["batch"] for r in runs})
        measured = [m for m in MODES if any(r["mode"] == m and r.get("images_per_s") for r in runs)]
        width = 0.8 / max(1, len(measured))
        for j, mode in enumerate(measured):
            label = mode  # on the first bar of each mode only
            for i, b in enumerate(batches):
                r = next((r for r in runs if r["batch"] == b and r["mode"] == mode), None)
                if not r or not r.get("images_per_s"):
                    continue
                x = i + (j - len(measured) / 2 + 0.5) * width
                ax.bar(x, r["images_per_s"], width, color=colors[mode], label=label)
                label = None
                if r.get("speedup_vs_diffusers") is not None and mode != "diffusers":
                    ax.annotate(f"x{r['speedup_vs_diffusers']:.2f}", (x, r["images_per_s"]), ha="center",
                                va="bottom", fontsize=7)
        ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        values = [r["images_per_s"] for r in runs if r.get("images_per_s")]
        if values and max(values) > 20 * min(values):  # batch sizes spread throughput over decades
            ax.set_yscale("log")
            common.plain_log_axis(ax.yaxis)
        else:
            ax.set_ylim(0, 1.12 * max(values, default=1))
        ax.set_ylabel("images / s  (label: speedup over diffusers)")
        ax.set_title(f"{model}, {sched.upper()} {steps} steps", fontsize=10)
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)
    label = "CPU" if report["settings"]["device"] == "cpu" else report["provenance"].get("gpu")
    fig.suptitle(f"fastdiff sampling throughput vs diffusers and torch.compile "
                 f"({label}, {report['settings']['dtype']})")
    common.save_png(fig, path)
    plt.close(fig)


def write_reports(report: dict, out: Path, final: bool) -> None:
    """JSON (also while running), then the Markdown table and, where matplotlib is installed, the chart."""
    if final:
        common.put(report, "chart", None if common.chart_problem() else "sampling.png", common.chart_problem())
    common.write_json_atomic(out / "sampling.json", report)
    if final:
        common.write_text_atomic(out / "sampling.md", markdown(report))
        if report["chart"]:
            chart(report, out / "sampling.png")
        else:
            print(f"bench sampling: chart {report['chart_reason']}", file=sys.stderr)


# ----------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastdiff bench sampling", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--quick", action="store_true", help="a tiny model and a few steps (CPU-friendly, under a minute)")
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="quick (= --quick), short (the GPU check's), full (the GPU default), cpu (the CPU default)")
    p.add_argument("--out", default=None, help="output folder (default bench/results/<device>-<date>/)")
    p.add_argument("--dtype", choices=tuple(common.DTYPES), default=None,
                   help="model dtype (default float16 on CUDA, float32 on the CPU)")
    p.add_argument("--models", default=None, help=f"comma-separated from {', '.join(MODEL_CONFIGS)}")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated modes to run")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per run (after one warm-up call)")
    p.add_argument("--run-budget", type=float, default=None,
                   help="seconds after which a run stops repeating (at least one timed call; default per preset)")
    p.add_argument("--time-budget", type=float, default=float("inf"),
                   help="seconds after which the remaining runs are recorded as skipped")
    p.add_argument("--compile-mode", default="max-autotune", help="torch.compile mode of the compile peer")
    p.add_argument("--no-compile", action="store_true", help="do not run the torch.compile peer")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: 1 for --quick on the CPU, else torch's choice)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    device = common.resolve_device(args.device)
    preset_name = args.preset or ("quick" if args.quick else ("full" if device.type == "cuda" else "cpu"))
    args.quick = preset_name == "quick"
    with common.cpu_threads(common.default_threads(device, args.quick, args.threads)):
        return _run(args, argv, device, preset_name)


def _run(args, argv, device, preset_name) -> int:
    preset = PRESETS[preset_name]
    dtype = common.DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    models = [m.strip() for m in args.models.split(",")] if args.models else preset["models"]
    unknown = [m for m in models if m not in MODEL_CONFIGS]
    if unknown:
        raise ValueError(f"--models: unknown {unknown}; choose from {', '.join(MODEL_CONFIGS)}")
    batches = common.parse_ints(args.batches, "--batches") if args.batches else preset["batches"]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        raise ValueError(f"--modes: choose from {', '.join(MODES)}, got {args.modes!r}")
    if "reference" not in modes:
        modes.insert(0, "reference")  # every mode's forward pass is checked against it
    args.repeats = args.repeats or preset["repeats"]
    args.run_budget = args.run_budget if args.run_budget is not None else preset["run_budget"]
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    out = Path(args.out) if args.out else common.default_out_dir(device)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    print(f"bench sampling: {device}, preset {preset_name}, {common.dtype_name(dtype)}; measuring limits ...",
          file=sys.stderr)
    monitor = common.GpuMonitor(device)
    report = {
        "schema": "fastdiff-bench-sampling/1",
        "provenance": common.provenance(device, argv, "fastdiff bench sampling " + " ".join(argv)),
        "settings": {"device": device.type, "preset": preset_name, "dtype": common.dtype_name(dtype),
                     "models": models, "batches": batches, "modes": modes,
                     "schedulers": [list(s) for s in preset["schedulers"]], "schedule": SCHEDULE,
                     "repeats": args.repeats, "run_budget_s": args.run_budget, "compile_mode": args.compile_mode,
                     "timer": "time.perf_counter around a whole sampling call, device synchronised before and after",
                     "seeds": "fastdiff.sampling.image_seeds(0, range(batch)); DDIM starts every mode from the same "
                              "Philox noise"},
        "limits": {"matmul": common.measure_matmul(device, dtype, quick=args.quick),
                   "copy": common.measure_copy_bandwidth(device, quick=args.quick)},
        "gpu": monitor.info(),
        "models": {},
        "runs": [],
    }
    ctx = {"device": device, "dtype": dtype, "monitor": monitor, "matmul": report["limits"]["matmul"],
           "elapsed": lambda: time.perf_counter() - t_start, "compiled": {}}
    for name in models:
        flops = count_flops(name)
        model, dmodel, dreason = build_models(name, device, dtype)
        cfg = MODEL_CONFIGS[name]
        report["models"][name] = {"diffusers_config": cfg, "params": model.num_parameters(), "flops": flops,
                                   "launches_per_step": count_launches(model, device, dtype)}
        common.put(report["models"][name], "params_diffusers",
                   sum(p.numel() for p in dmodel.parameters()) if dmodel is not None else None, dreason)
        ctx.update(model=model, dmodel=dmodel, dmodel_reason=dreason, flops=flops, compiled={},
                   image_shape=(cfg["in_channels"], cfg["sample_size"], cfg["sample_size"]),
                   check_inputs={}, reference_outputs={})
        for batch in batches:
            for kind, steps in preset["schedulers"]:
                group = []
                for mode in modes:
                    rec = {"model": name, "scheduler": kind, "steps": steps, "batch": batch, "mode": mode,
                           "dtype": common.dtype_name(dtype)}
                    run_mode(mode, ctx, rec, args)
                    group.append(rec)
                    report["runs"].append(rec)
                    print(f"{name} {kind}-{steps} batch {batch} {mode}: " + (
                        f"{rec['images_per_s']:.3g} images/s, {rec['step_latency_s'] * 1e3:.3g} ms/step"
                        if rec.get("images_per_s") else rec.get("reason", "")), file=sys.stderr)
                    add_ratios(group)
                    write_reports(report, out, final=False)  # partial results survive an interrupted run
        del model, dmodel
        ctx.update(model=None, dmodel=None, compiled={}, pipelines=None)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if any(m in modes for m in pipelines.PIPELINE_MODES) and ctx["elapsed"]() <= args.time_budget:
        report["stable_diffusion"] = pipelines.stable_diffusion_runs(device, dtype, args.quick, args, monitor,
                                                                     ctx["elapsed"])
    from fastdiff.attention import chosen_backends
    from fastdiff.ops import fallback_counts

    report["attention_backends"] = chosen_backends()
    report["op_fallbacks"] = {f"{op}: {why}": n for (op, why), n in fallback_counts().items()}
    report["elapsed_s"] = time.perf_counter() - t_start
    write_reports(report, out, final=True)
    print(f"bench sampling: {len(report['runs'])} runs in {report['elapsed_s']:.0f} s -> "
          f"{out}/sampling.{{json,md{',png' if report['chart'] else ''}}}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
