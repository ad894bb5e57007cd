"""diffusers pipelines with and without ``fastdiff.accelerate`` (``fastdiff bench sampling``).

Two additions to the sampling benchmark:

* the modes ``pipeline`` (diffusers' own DDIMPipeline / DDPMPipeline over the benchmark's UNet2DModel) and
  ``pipeline+accelerate`` (the same pipeline call over a copy of the same weights after ``fastdiff.accelerate``):
  the drop-in speed-up is the ratio of the two;
* Stable-Diffusion-shaped rows (``stable_diffusion_runs``): an SD-1.5-shaped ``UNet2DConditionModel`` (4 ->
  320/640/1280/1280 channels, cross-attention width 768, random weights) timed per denoising step (classifier-free
  guidance batch 2, 64x64 latents, 77 tokens, UNet forward + guidance + DDIM step) and the 512x512 ``AutoencoderKL``
  decode with its peak memory, for diffusers, diffusers + ``fastdiff.accelerate`` and ``torch.compile`` of
  diffusers' models. GPU only at these sizes; the CPU quick mode runs a tiny configuration instead.
"""

from __future__ import annotations

import copy

import torch

from bench import common

PIPELINE_MODES = ("pipeline", "pipeline+accelerate")
SD_MODES = ("diffusers", "diffusers+accelerate", "compile")

# SD 1.5's UNet is diffusers' UNet2DConditionModel default apart from these; its VAE is AutoencoderKL with 4 levels.
SD_CONFIGS = {
    "sd15": {"unet": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
             "vae": dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                         sample_size=512),
             "latent": 64, "tokens": 77, "batch": 1},
    "tiny": {"unet": dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                          cross_attention_dim=32, attention_head_dim=4,
                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
             "vae": dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                         latent_channels=4, sample_size=16),
             "latent": 8, "tokens": 16, "batch": 1},
}


# ----------------------------------------------------------------------------------------- pipeline modes
def _pipeline(ctx, kind: str, accelerated: bool):
    """diffusers' DDIM/DDPM pipeline over the benchmark's diffusers UNet (a copy of it when accelerated)."""
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler

    from bench.sampling import schedule_for

    cache = ctx.get("pipelines")
    if cache is None or cache["model"] is not ctx["dmodel"]:  # one set per benchmark model, kept across batches
        cache = ctx["pipelines"] = {"model": ctx["dmodel"]}
    key = (kind, accelerated)
    if key not in cache:
        unet = ctx["dmodel"]
        if accelerated:
            if "accelerated unet" not in cache:
                cache["accelerated unet"] = copy.deepcopy(unet)  # same weights, patched in place
            unet = cache["accelerated unet"]
        # DDPMPipeline's loop (set_timesteps, step with a generator) runs any scheduler without eta: DPM-Solver too
        cls, sched = {"ddim": (DDIMPipeline, DDIMScheduler), "ddpm": (DDPMPipeline, DDPMScheduler),
                      "dpmsolver++": (DDPMPipeline, DPMSolverMultistepScheduler)}[kind]
        pipe = cls(unet=unet, scheduler=sched(**schedule_for(kind)))
        pipe.set_progress_bar_config(disable=True)
        if accelerated:
            import fastdiff

            fastdiff.accelerate(pipe)
        cache[key] = pipe
    return cache[key]


def pipeline_mode(mode: str, ctx: dict, rec: dict):
    """(fn, forward) of a pipeline mode: ``fn()`` is one whole pipeline call, ``forward(x, t)`` its UNet."""
    kind, steps, batch, device = rec["scheduler"], rec["steps"], rec["batch"], ctx["device"]
    pipe = _pipeline(ctx, kind, mode == "pipeline+accelerate")
    extra = {"eta": 0.0} if kind == "ddim" else {}
    if mode == "pipeline+accelerate":
        rec["accelerate"] = pipe._fastdiff.summary()

    def fn():
        generator = torch.Generator(device=device).manual_seed(0)
        return pipe(batch_size=batch, generator=generator, num_inference_steps=steps, output_type="pt",
                    **extra).images

    def forward(x, t):
        return pipe.unet(x, t).sample

    return fn, forward


def build_pipeline(mode: str, ctx: dict, rec: dict, args, seeds):
    """``pipeline_mode`` with the signature of the sampling benchmark's mode builders (mode -> (fn, forward))."""
    return pipeline_mode(mode, ctx, rec)


# ----------------------------------------------------------------------------------------- Stable Diffusion rows
def _sd_models(name: str, device, dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cfg = SD_CONFIGS[name]
    torch.manual_seed(0)
    with torch.device(device):  # random weights made on the device: an 860M-parameter init on the CPU is slow
        unet = UNet2DConditionModel(**cfg["unet"]).eval()
        vae = AutoencoderKL(**cfg["vae"]).eval()
    if dtype != torch.float32:  # (float32 is left alone: diffusers warns about any dtype cast)
        unet, vae = unet.to(dtype), vae.to(dtype)
    return unet, vae


class _Components:
    """The part of a StableDiffusionPipeline a denoising step and a decode use (what ``accelerate`` patches)."""

    def __init__(self, unet, vae, scheduler):
        self.unet, self.vae, self.scheduler = unet, vae, scheduler


def _sd_step_fn(parts, latents, text, guidance: float = 7.5):
    """One denoising step as StableDiffusionPipeline runs it: CFG UNet forward, guidance, scheduler step."""
    sched = parts.scheduler
    t = sched.timesteps[len(sched.timesteps) // 2]

    @torch.no_grad()
    def step():
        noise = parts.unet(torch.cat([latents] * 2), t, encoder_hidden_states=text, return_dict=False)[0]
        uncond, cond = noise.chunk(2)
        guided = uncond + guidance * (cond - uncond)
        return sched.step(guided, t, latents, return_dict=False)[0]

    return step


def stable_diffusion_runs(device, dtype, quick: bool, args, monitor, elapsed=lambda: 0.0) -> dict:
    """Per-step time of an SD-shaped UNet and the VAE decode time and peak memory, three modes each.

    A mode starting after ``args.time_budget`` seconds (``elapsed()``) is recorded as skipped.
    """
    from bench.sampling import diffusers_problem

    name = "sd15" if device.type == "cuda" and not quick else "tiny"
    cfg = SD_CONFIGS[name]
    out = {"config": name, "shapes": {"latent": cfg["latent"], "tokens": cfg["tokens"], "batch": cfg["batch"],
                                      "cfg_batch": 2 * cfg["batch"]}, "runs": []}
    problem = diffusers_problem()
    if device.type == "cpu" and not quick:
        problem = problem or "the SD-1.5-shaped rows need a GPU (run with --quick on the CPU for the tiny rows)"
    if problem:
        out["reason"] = f"not measured: {problem}"
        return out
    from diffusers import DDIMScheduler

    unet, vae = _sd_models(name, device, dtype)
    g = torch.Generator().manual_seed(0)
    b, lat = cfg["batch"], cfg["latent"]
    latents = torch.randn(b, 4, lat, lat, generator=g).to(device, dtype)
    text = torch.randn(2 * b, cfg["tokens"], unet.config.cross_attention_dim, generator=g).to(device, dtype)
    decode_in = torch.randn(b, 4, lat, lat, generator=g).to(device, dtype)
    sd_schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                       set_alpha_to_one=False, steps_offset=1)
    reference = {}
    for mode in SD_MODES:
        why = None
        if mode == "compile" and (args.no_compile or (quick and device.type == "cpu")):
            why = ("skipped: --no-compile" if args.no_compile
                   else "skipped: --quick on the CPU (compiling takes minutes)")
        elif elapsed() > args.time_budget:
            why = f"skipped: the time budget of {args.time_budget:.0f} s is used up"
        if why:
            out["runs"] += [{"what": w, "mode": mode, "status": "skipped", "reason": why} for w in ("step", "decode")]
            continue
        sched = DDIMScheduler(**sd_schedule)
        sched.set_timesteps(50, device=device)
        parts = _Components(unet, vae, sched)
        if mode == "diffusers+accelerate":
            parts = _Components(copy.deepcopy(unet), copy.deepcopy(vae), sched)
            import fastdiff

            fastdiff.accelerate(parts)
            if hasattr(parts.scheduler, "set_timesteps") and parts.scheduler is not sched:
                parts.scheduler.set_timesteps(50, device=device)
        elif mode == "compile":
            torch._dynamo.reset()
            parts = _Components(torch.compile(unet, mode=args.compile_mode, dynamic=False),
                                torch.compile(vae.decode, mode=args.compile_mode, dynamic=False), sched)
        decode = parts.vae.decode if mode != "compile" else parts.vae

        def decode_fn(decode=decode):
            with torch.no_grad():
                return decode(decode_in).sample

        for what, fn in (("step", _sd_step_fn(parts, latents, text)), ("decode", decode_fn)):
            rec = {"what": what, "mode": mode, "config": name}
            try:
                rec["first_run_s"], _ = common.time_run(fn, device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    resident = torch.cuda.memory_allocated(device)  # weights (all modes' copies) and inputs
                timing = common.time_calls(fn, [()], device, target_s=0.5 if not quick else 0.1, min_reps=3,
                                           max_reps=50)
                rec.update(status="ok", median_s=timing["median_s"], repeats=timing["repeats"], timer=timing["timer"])
                if device.type == "cuda":
                    rec["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
                    rec["working_memory_bytes"] = rec["peak_memory_bytes"] - resident  # the call's own peak
                else:
                    for key in ("peak_memory_bytes", "working_memory_bytes"):
                        common.put(rec, key, None, "not measured: CPU run (no allocator statistics)")
                result = fn().float()
                if mode == "diffusers":
                    reference[what] = result
                from fastdiff.testing import relative_error

                common.put(rec, "rel_error_vs_diffusers",
                           relative_error(result, reference[what]) if what in reference else None,
                           "not compared: the diffusers mode did not run")
            except Exception as exc:  # out of memory or a failed compile is a result, not a crash
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rec.update(status="failed", reason=f"failed: {common.short_error(exc)}")
            out["runs"].append(rec)
        del parts
    base = {r["what"]: r.get("median_s") for r in out["runs"] if r["mode"] == "diffusers"}
    for r in out["runs"]:
        common.put(r, "speedup_vs_diffusers", common.ratio(base.get(r["what"]), r.get("median_s")),
                   "not measured")
    return out


def sd_markdown(sd: dict) -> list[str]:
    """The SD rows as Markdown lines."""
    if not sd:
        return []
    lines = ["", f"## Stable-Diffusion-shaped UNet and VAE ({sd['config']}: latents {sd['shapes']['latent']}x"
                 f"{sd['shapes']['latent']}, {sd['shapes']['tokens']} tokens, CFG batch {sd['shapes']['cfg_batch']},"
                 f" random weights)", ""]
    if sd.get("reason"):
        return lines + [sd["reason"]]
    rows = []
    for r in sd["runs"]:
        mem = r.get("working_memory_bytes")
        ms = None if r.get("median_s") is None else r["median_s"] * 1e3
        rows.append([r["what"], r["mode"], common.fmt(ms, ".3g"),
                     common.fmt(r.get("speedup_vs_diffusers"), ".2f"),
                     common.fmt(None if mem is None else mem / 2**30, ".2f"),
                     common.fmt(r.get("rel_error_vs_diffusers"), ".1e"), r.get("reason", "")])
    headers = ["what", "mode", "ms", "vs diffusers", "working GiB (peak - resident)", "rel. err vs diffusers", "note"]
    return lines + [common.markdown_table(headers, rows)]
