"""``fastdiff.accelerate`` on Stable Diffusion pipelines: UNet2DConditionModel + AutoencoderKL patched in place.

Tiny random components built in the test (UNet and VAE with 2 levels of 32/64 channels and 8 groups, a small CLIP
text model, a CLIP tokenizer over a vocabulary written here). Each test runs the pipeline unaccelerated, then
accelerates the same object and repeats the call with the same generator.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import kernel_device  # noqa: F401  (chooses compiled kernels or the interpreter before the kernels are imported)
from accelerate_helpers import tiny_sd_components
from fastdiff.testing import assert_close

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from diffusers import (  # noqa: E402
    DPMSolverMultistepScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)

import fastdiff  # noqa: E402
from fastdiff.diffusers.modules import FastdiffAttnProcessor, is_patched  # noqa: E402

STEPS = 2


@pytest.fixture
def pipe(tmp_path):
    return StableDiffusionPipeline(**tiny_sd_components(str(tmp_path)), requires_safety_checker=False)


def _run(pipe, prompt="the cat sitting", seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("output_type", "np")
    kwargs.setdefault("height", 16)
    kwargs.setdefault("width", 16)
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images


def _check(res, ref, what):
    assert_close(torch.from_numpy(np.asarray(res)), torch.from_numpy(np.asarray(ref)), torch.float32, what=what)


CALLS = {
    "guidance": dict(guidance_scale=7.5),
    "no guidance": dict(guidance_scale=1.0),
    "negative prompt, 2 per prompt": dict(guidance_scale=5.0, negative_prompt="a dog", num_images_per_prompt=2),
    "prompt list, 24x40": dict(prompt=["the cat", "a thing sitting"], height=24, width=40),
    "latents out": dict(output_type="latent"),
}


def test_stable_diffusion_gives_the_same_images_accelerated(pipe):
    def run_all():
        out = {}
        for name, kw in CALLS.items():
            kw = dict(kw)
            out[name] = _run(pipe, kw.pop("prompt", "the cat sitting"), seed=len(out), **kw)
        return out

    before = run_all()
    fastdiff.accelerate(pipe, backend="reference")
    for model, report in zip((pipe.unet, pipe.vae), pipe._fastdiff.reports):
        for kind in ("ResnetBlock2D", "Attention", "GroupNorm", "Transformer2DModel"):
            present = sum(type(m).__name__ == kind for m in model.modules())
            assert present > 0 or (kind == "Transformer2DModel" and model is pipe.vae), (kind, report.summary())
            if kind != "Transformer2DModel":
                assert report.patched[kind] == present, report.summary()
    unet_report, vae_report = pipe._fastdiff.reports
    assert type(pipe.scheduler) is fastdiff.DDIMScheduler, pipe._fastdiff.scheduler
    assert not unet_report.left and not vae_report.left
    after = run_all()
    assert after["negative prompt, 2 per prompt"].shape[0] == 2 and after["prompt list, 24x40"].shape[1:3] == (24, 40)
    for name in CALLS:
        _check(after[name], before[name], name)


def test_triton_backend_runs_kernels_in_the_unet_and_the_vae(pipe, monkeypatch):
    from fastdiff import kernels

    device = kernel_device.DEVICE
    pipe.to(device)
    before = _run(pipe, guidance_scale=3.0, num_inference_steps=1)
    fastdiff.accelerate(pipe, backend="triton", cuda_graphs=False)
    where = {"now": None}
    launches = {"unet": 0, "vae": 0, "fused add": 0}
    for name in ("unet", "vae"):
        model = getattr(pipe, name)
        model.register_forward_pre_hook(lambda m, a, name=name: where.update(now=name))
    # the VAE decodes through vae.decode, not its forward: label the decoder too
    pipe.vae.decoder.register_forward_pre_hook(lambda m, a: where.update(now="vae"))
    launcher = kernels.group_norm

    def counting(x, *args, add=None, **kwargs):
        launches[where["now"]] = launches.get(where["now"], 0) + 1
        launches["fused add"] += add is not None
        return launcher(x, *args, add=add, **kwargs)

    monkeypatch.setattr(kernels, "group_norm", counting)
    after = _run(pipe, guidance_scale=3.0, num_inference_steps=1)
    _check(after, before, "triton backend")
    unet_resnets = pipe._fastdiff.reports[0].patched["ResnetBlock2D"]
    assert launches["fused add"] == unet_resnets, launches  # one step, CFG in one batch: one fused norm2 per block
    assert launches["unet"] >= 2 * unet_resnets and launches["vae"] > 0, launches


def test_vae_decode_through_the_split_group_norm_path(pipe, monkeypatch):
    """The VAE decoder at 512x512 runs GroupNorms over groups too large for one program (the split path: statistics
    pass, then apply). Forced here on a small decode: every group norm of the accelerated decode takes that path,
    and the image equals diffusers' decode."""
    from fastdiff.kernels import group_norm_kernels

    device = kernel_device.DEVICE
    pipe.to(device)
    latents = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad():
        ref = pipe.vae.decode(latents).sample
    fastdiff.accelerate(pipe, backend="triton", cuda_graphs=False)
    monkeypatch.setenv("FASTDIFF_GN_MAX_SINGLE", "0")  # no group fits the single-program path
    monkeypatch.setenv("FASTDIFF_GN_TILE", "64")
    paths = []
    planner = group_norm_kernels.plan_group_norm

    def recording(*args, **kwargs):
        plan = planner(*args, **kwargs)
        paths.append(plan.path)
        return plan

    monkeypatch.setattr(group_norm_kernels, "plan_group_norm", recording)
    with torch.no_grad():
        out = pipe.vae.decode(latents).sample
    groupnorms = sum(isinstance(m, torch.nn.GroupNorm) for m in pipe.vae.decoder.modules())
    assert len(paths) == groupnorms and set(paths) == {"split"}, (len(paths), groupnorms, set(paths))
    assert_close(out, ref, torch.float32, what="VAE decode, split GroupNorm path")


def test_weights_changed_in_place_after_accelerating_are_seen(pipe):
    twin = copy.deepcopy(pipe)
    fastdiff.accelerate(pipe, backend="reference")
    first = _run(pipe)
    with torch.no_grad():
        for p in (pipe, twin):  # the same change to both: a "fused LoRA" on attention and a norm, a VAE conv
            gen = torch.Generator().manual_seed(4)
            for name, param in p.unet.named_parameters():
                if name.endswith(("attn2.to_k.weight", "attn1.to_out.0.weight")):
                    param.add_(torch.randn(param.shape, generator=gen) * 0.2)
                if name.endswith("resnets.0.norm2.weight"):
                    param.mul_(1.3)
            p.vae.decoder.conv_out.weight.mul_(1.2)
    changed = _run(pipe)
    assert np.abs(changed - first).max() > 1e-3
    _check(changed, _run(twin), "changed weights: accelerated vs unaccelerated")


def test_dpm_solver_pipeline_gives_the_same_images(pipe):
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    before = _run(pipe, num_inference_steps=3, guidance_scale=4.0)
    fastdiff.accelerate(pipe, backend="reference")
    fast = getattr(fastdiff, "DPMSolverMultistepScheduler", None)
    if fast is not None and hasattr(fast, "from_config"):  # fastdiff's DPM-Solver++ takes over where it exists
        assert type(pipe.scheduler) is fast, pipe._fastdiff.scheduler
    else:
        assert type(pipe.scheduler) is DPMSolverMultistepScheduler
        assert "kept diffusers' DPMSolverMultistepScheduler" in pipe._fastdiff.scheduler
    after = _run(pipe, num_inference_steps=3, guidance_scale=4.0)
    _check(after, before, f"DPM-Solver++ ({pipe._fastdiff.scheduler})")


def test_img2img_pipeline_shares_the_accelerated_components(pipe):
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))  # in [0, 1]
    call = dict(prompt="the cat", image=image, strength=0.7, num_inference_steps=3, output_type="np")
    before = img2img(generator=torch.Generator().manual_seed(2), **call).images
    fastdiff.accelerate(img2img, backend="reference")
    processors = [m.processor for m in img2img.unet.modules() if hasattr(m, "processor")]
    assert processors and all(isinstance(p, FastdiffAttnProcessor) for p in processors)
    after = img2img(generator=torch.Generator().manual_seed(2), **call).images
    _check(after, before, "img2img")


def test_inpainting_pipeline_gives_the_same_images(tmp_path):
    from diffusers import StableDiffusionInpaintPipeline

    inpaint = StableDiffusionInpaintPipeline(**tiny_sd_components(str(tmp_path), seed=3, unet_in_channels=9),
                                             requires_safety_checker=False)
    gen = torch.Generator().manual_seed(5)
    image = torch.rand(1, 3, 16, 16, generator=gen)
    mask = (torch.rand(1, 1, 16, 16, generator=gen) > 0.5).float()
    call = dict(prompt="a cat", image=image, mask_image=mask, height=16, width=16, num_inference_steps=2,
                guidance_scale=3.0, output_type="np")
    before = inpaint(generator=torch.Generator().manual_seed(1), **call).images
    fastdiff.accelerate(inpaint, backend="reference")
    assert inpaint._fastdiff.reports[0].patched["ResnetBlock2D"] > 0
    _check(inpaint(generator=torch.Generator().manual_seed(1), **call).images, before, "inpainting")


def test_save_pretrained_of_an_accelerated_pipeline(pipe, tmp_path):
    before = _run(pipe)
    fastdiff.accelerate(pipe, backend="reference")
    pipe.save_pretrained(tmp_path / "saved")
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert not any(is_patched(m) for m in loaded.unet.modules())
    assert type(loaded.scheduler).__module__.startswith("diffusers") and loaded.scheduler.config.steps_offset == 1
    _check(_run(loaded), before, "saved after accelerating, loaded unaccelerated")


def test_accelerated_unet_forward_reads_nothing_back_to_the_host(pipe):
    """What a CUDA graph of the accelerated UNet captures, with the guidance that follows: no op reads a value back
    to the host (checked on the CPU with a dispatch mode). The scheduler step after it is not guarded here: on the
    CPU fastdiff's step reads a CPU timestep with .item() (no device involved); on CUDA it locates an element of
    .timesteps from its storage offset (the scheduler protocol's tests)."""
    from accelerate_helpers import HostReadGuard

    fastdiff.accelerate(pipe, backend="reference")
    pipe.scheduler.set_timesteps(4)
    latents = torch.randn(1, 4, 8, 8)
    text = torch.randn(2, 12, 32)
    t = pipe.scheduler.timesteps[1]
    with torch.no_grad():
        pipe.unet(torch.cat([latents] * 2), t, encoder_hidden_states=text)  # warm-up outside the guard
        with HostReadGuard():
            noise = pipe.unet(torch.cat([latents] * 2), t, encoder_hidden_states=text, return_dict=False)[0]
            uncond, cond = noise.chunk(2)
            guided = uncond + 5.0 * (cond - uncond)
        pipe.scheduler.step(guided, t, latents, return_dict=False)


def test_sdxl_shaped_unet_forward_matches_diffusers():
    """SDXL's UNet (linear projections, several transformer layers per block, text-time added conditioning) is
    built from the same blocks: every ResnetBlock2D, GroupNorm and Attention runs on fastdiff, same output."""
    from diffusers import UNet2DConditionModel

    from accelerate_helpers import perturb_zero_parameters
    from fastdiff.diffusers import patch_model

    torch.manual_seed(5)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
    ).eval()
    perturb_zero_parameters(unet, torch.Generator().manual_seed(6))
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    text = torch.randn(2, 5, 32, generator=gen)
    added = {"text_embeds": torch.randn(2, 32, generator=gen), "time_ids": torch.rand(2, 6, generator=gen) * 64}
    with torch.no_grad():
        ref = unet(x, 400, encoder_hidden_states=text, added_cond_kwargs=added).sample
        report = patch_model(unet, "reference")
        out = unet(x, 400, encoder_hidden_states=text, added_cond_kwargs=added).sample
    assert not report.left and report.patched["Attention"] == sum(
        type(m).__name__ == "Attention" for m in unet.modules()) == 16, report.summary()  # 8 blocks x self+cross
    assert_close(out, ref, torch.float32, what="SDXL-shaped UNet")


@pytest.mark.gpu
def test_unet_cuda_graphs_per_shape_with_weights_read_in_place(pipe):
    """On CUDA the UNet forward is replayed from graphs keyed by batch (CFG doubling), latent shape and text length;
    a weight changed in place after the capture is seen; replaced parameters (pipe.to) drop the graphs."""
    pipe.to("cuda")
    twin = copy.deepcopy(pipe)  # stays diffusers' own
    calls = [dict(guidance_scale=7.5), dict(guidance_scale=1.0), dict(guidance_scale=7.5, height=24, width=40)]
    eager = [_run(twin, seed=i, **kw) for i, kw in enumerate(calls)]
    fastdiff.accelerate(pipe, backend="auto", cuda_graphs=True)
    graphed = pipe.unet.forward
    for _ in range(2):  # the second round replays the graphs captured in the first
        for i, kw in enumerate(calls):
            res = torch.from_numpy(_run(pipe, seed=i, **kw))
            # compiled kernels vs diffusers' eager ops on the GPU: see test_accelerate.py's CUDA test
            assert_close(res, torch.from_numpy(eager[i]), torch.float32, rtol=1e-4, what=f"graphed call {kw}")
    assert graphed.captures == 3 and graphed.replays == 2 * 3 * STEPS, (graphed.captures, graphed.replays)
    with torch.no_grad():
        for p in (pipe, twin):
            p.unet.conv_out.weight.mul_(1.5)
    res = torch.from_numpy(_run(pipe, seed=0, **calls[0]))
    assert_close(res, torch.from_numpy(_run(twin, seed=0, **calls[0])), torch.float32, rtol=1e-4,
                 what="weight changed after capture is seen")
    assert graphed.captures == 3
    pipe.to(torch.float16)  # parameters replaced: graphs dropped and captured again
    _run(pipe, seed=0, **calls[0])
    assert graphed.captures == 4 and len(graphed.graphs) == 1
