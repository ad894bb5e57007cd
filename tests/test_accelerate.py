"""``fastdiff.accelerate`` on DDPM/DDIM pipelines: the same images as the unaccelerated pipeline.

Every test builds tiny random diffusers components (no hub access), runs the pipeline unaccelerated, accelerates
the same object in place and runs the same call again with the same generator.
"""

from __future__ import annotations

import copy
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch

import kernel_device  # noqa: F401  (chooses compiled kernels or the interpreter before the kernels are imported)
from accelerate_helpers import perturb_zero_parameters, random_unet2d_config, tiny_unet2d
from fastdiff.testing import assert_close

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMPipeline, DDIMScheduler, DDPMParallelScheduler, DDPMPipeline, DDPMScheduler  # noqa: E402

import fastdiff  # noqa: E402
from fastdiff.diffusers import FastdiffAttnProcessor, patch_model, unpatch_model  # noqa: E402
from fastdiff.diffusers.modules import is_patched  # noqa: E402

STEPS = 3


def _pipeline(kind: str, config_index: int = 0, seed: int = 0):
    unet = tiny_unet2d(random_unet2d_config(config_index), seed)
    if kind == "ddpm":
        return DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100))
    return DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=100))


def _images(pipe, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("output_type", "np")
    generator = kwargs.pop("generator", None) or torch.Generator().manual_seed(seed)
    return pipe(generator=generator, **kwargs)


def _as_tensor(images) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images
    if isinstance(images, list):  # PIL
        return torch.from_numpy(np.stack([np.asarray(im, dtype=np.float64) for im in images]))
    return torch.from_numpy(np.asarray(images))


def _check_same(res, ref, what, rtol=None):
    assert_close(_as_tensor(res), _as_tensor(ref), torch.float32, rtol=rtol, what=what)


# ---------------------------------------------------------------------------------------------- same images
@pytest.mark.parametrize("config_index", range(4))
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_pipeline_gives_the_same_images_accelerated(kind, config_index):
    pipe = _pipeline(kind, config_index, seed=config_index)
    before = _images(pipe, seed=11, batch_size=2).images
    fastdiff.accelerate(pipe, backend="reference")
    assert pipe._fastdiff.reports[0].patched["ResnetBlock2D"] > 0
    expected = fastdiff.DDPMScheduler if kind == "ddpm" else fastdiff.DDIMScheduler
    assert type(pipe.scheduler) is expected and pipe.scheduler.backend == "reference", pipe._fastdiff.scheduler
    after = _images(pipe, seed=11, batch_size=2).images
    _check_same(after, before, f"{kind} config {config_index} ({random_unet2d_config(config_index)})")
    again = _images(pipe, seed=11, batch_size=2).images  # repeatable
    _check_same(again, after, "second accelerated call")
    assert pipe.unet.forward.captures == 0 and not pipe._fastdiff.loops, "no CUDA graph is made off CUDA"


def test_call_options_keep_their_meaning():
    """Generator lists, batch sizes, eta, use_clipped_model_output, output_type pil/np/pt and return_dict."""
    pipe = _pipeline("ddim", 1, seed=3)
    calls = [
        dict(batch_size=3, eta=1.0, generator=[torch.Generator().manual_seed(s) for s in (5, 6, 7)], output_type="pt"),
        dict(batch_size=1, eta=0.5, use_clipped_model_output=True, output_type="np", return_dict=False),
        dict(batch_size=2, output_type="pil"),
    ]

    def run_all():
        out = []
        for kw in calls:
            kw = dict(kw)
            if "generator" in kw:
                kw["generator"] = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
            result = _images(pipe, seed=2, **kw)
            out.append(result[0] if isinstance(result, tuple) else result.images)
        return out

    before = run_all()
    fastdiff.accelerate(pipe, backend="reference")
    after = run_all()
    assert isinstance(after[0], torch.Tensor) and after[0].shape[0] == 3
    assert isinstance(after[1], np.ndarray)
    assert isinstance(after[2], list) and len(after[2]) == 2
    for i, (a, b) in enumerate(zip(after, before)):
        # PIL images are rounded to 8 bits: a rounding flip moves one value by 1 of 255
        _check_same(a, b, f"call {i}", rtol=2e-3 if i == 2 else None)


def test_ddpm_pipeline_with_a_generator_list_and_pt_output():
    pipe = _pipeline("ddpm", 2, seed=4)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]  # noqa: E731
    before = pipe(batch_size=2, generator=gens(), num_inference_steps=STEPS, output_type="pt").images
    fastdiff.accelerate(pipe, backend="reference")
    after = pipe(batch_size=2, generator=gens(), num_inference_steps=STEPS, output_type="pt").images
    _check_same(after, before, "ddpm with a generator list")
    # image 0 of a batch of 2 equals the same generator alone: the per-image generators are honoured
    alone = pipe(batch_size=1, generator=gens()[:1], num_inference_steps=STEPS, output_type="pt").images
    _check_same(alone[0], after[0], "image 0 alone")


def test_triton_backend_runs_the_kernels_and_matches(monkeypatch):
    """backend="triton" (compiled on CUDA, the interpreter on the CPU): every GroupNorm a kernel launch, same images."""
    from fastdiff import kernels

    device = kernel_device.DEVICE
    pipe = _pipeline("ddim", 0, seed=5).to(device)
    before = _images(pipe, seed=3, batch_size=2, output_type="pt").images
    fastdiff.accelerate(pipe, backend="triton", cuda_graphs=False)
    launches = {"fused add": 0, "silu": 0, "all": 0}
    launcher = kernels.group_norm

    def counting(x, *args, add=None, silu=False, **kwargs):
        launches["all"] += 1
        launches["fused add"] += add is not None
        launches["silu"] += bool(silu)
        return launcher(x, *args, add=add, silu=silu, **kwargs)

    steps_run = []
    update_launcher = kernels.update_step

    def counting_update(*args, **kwargs):
        steps_run.append(1)
        return update_launcher(*args, **kwargs)

    monkeypatch.setattr(kernels, "group_norm", counting)
    monkeypatch.setattr(kernels, "update_step", counting_update)
    after = _images(pipe, seed=3, batch_size=2, output_type="pt").images
    _check_same(after, before, "triton backend")
    # fastdiff's DDIM step is the fused update kernel: prev_sample and pred_original_sample, every step
    assert type(pipe.scheduler) is fastdiff.DDIMScheduler and len(steps_run) == 2 * STEPS, len(steps_run)
    report = pipe._fastdiff.reports[0]
    per_step = report.patched["GroupNorm"] + report.patched["ResnetBlock2D"]  # norm1+norm2 per block, conv_norm_out
    # each ResnetBlock2D launches 2 fused kernels, each attention its norm, plus conv_norm_out: every step
    resnets = report.patched["ResnetBlock2D"]
    assert launches["fused add"] == STEPS * resnets, launches
    assert launches["silu"] >= STEPS * 2 * resnets, launches
    assert launches["all"] >= STEPS * (2 * resnets + 1), (launches, per_step)


# ---------------------------------------------------------------------------------------------- in place
def test_module_tree_parameters_and_state_dict_are_diffusers_own(tmp_path):
    pipe = _pipeline("ddpm", 3, seed=6)
    params = {name: p for name, p in pipe.unet.named_parameters()}
    keys = list(pipe.unet.state_dict())
    modules = [type(m) for m in pipe.unet.modules()]
    before = _images(pipe, seed=1).images
    fastdiff.accelerate(pipe, backend="reference")
    assert isinstance(pipe, DDPMPipeline) and type(pipe).__name__ == "DDPMPipeline"
    assert [type(m) for m in pipe.unet.modules()] == modules
    assert list(pipe.unet.state_dict()) == keys
    assert all(p is params[name] for name, p in pipe.unet.named_parameters()), "parameters must be shared, not copied"
    pipe.save_pretrained(tmp_path)
    assert isinstance(pipe.scheduler, fastdiff.DDPMScheduler), "saving keeps fastdiff's scheduler in the pipeline"
    loaded = DDPMPipeline.from_pretrained(tmp_path)
    assert not any(is_patched(m) for m in loaded.unet.modules())
    assert type(loaded.scheduler) is DDPMScheduler and loaded.scheduler.config.num_train_timesteps == 100
    _check_same(_images(loaded, seed=1).images, before, "saved accelerated pipeline, loaded back unaccelerated")


def test_weights_changed_after_accelerating_are_seen():
    pipe = _pipeline("ddim", 0, seed=7)
    twin = copy.deepcopy(pipe)
    fastdiff.accelerate(pipe, backend="reference")
    first = _images(pipe, seed=4).images
    with torch.no_grad():
        for model in (pipe.unet, twin.unet):  # the same change to both
            gen = torch.Generator().manual_seed(9)
            state = dict(model.named_parameters())
            norm = next(n for n in state if n.endswith("resnets.0.norm2.weight"))
            for name in (norm, "conv_out.weight"):
                state[name].mul_(1.5)
            attention = [n for n in state if ".to_q.weight" in n]
            for name in attention:
                state[name].add_(torch.randn(state[name].shape, generator=gen) * 0.3)
    changed = _images(pipe, seed=4).images
    assert np.abs(changed - first).max() > 1e-3, "the weight change must change the images"
    _check_same(changed, _images(twin, seed=4).images, "accelerated with changed weights vs unaccelerated twin")


def test_accelerating_twice_is_harmless_and_to_keeps_working():
    pipe = _pipeline("ddim", 2, seed=8)
    twin = copy.deepcopy(pipe)
    before = _images(pipe, seed=5).images
    fastdiff.accelerate(pipe, backend="reference")
    counts = dict(pipe._fastdiff.reports[0].patched)
    fastdiff.accelerate(pipe, backend="reference")
    assert dict(pipe._fastdiff.reports[0].patched) == counts
    _check_same(_images(pipe, seed=5).images, before, "accelerated twice")
    pipe.to("cpu")
    _check_same(_images(pipe, seed=5).images, before, "after pipe.to('cpu')")
    pipe.to(torch.float64)
    twin.to(torch.float64)  # float64 noise is drawn differently: compare with the unaccelerated pipeline in float64
    assert pipe.unet.dtype == torch.float64
    _check_same(_images(pipe, seed=5).images, _images(twin, seed=5).images, "after pipe.to(float64)")


def test_a_copy_of_an_accelerated_pipeline_is_accelerated_and_independent():
    pipe = _pipeline("ddim", 3, seed=16)
    before = _images(pipe, seed=2).images
    fastdiff.accelerate(pipe, backend="reference")
    twin = copy.deepcopy(pipe)
    assert twin.unet.forward.model is twin.unet and twin._fastdiff.loops == {}
    assert all(is_patched(m) == is_patched(n) for m, n in zip(pipe.unet.modules(), twin.unet.modules()))
    _check_same(_images(twin, seed=2).images, before, "deep copy of an accelerated pipeline")
    with torch.no_grad():
        twin.unet.conv_out.weight.mul_(2.0)
    _check_same(_images(pipe, seed=2).images, before, "the original after changing the copy's weights")


def test_dtype_casts_the_pipeline_first():
    pipe = _pipeline("ddim", 0, seed=17)
    twin = copy.deepcopy(pipe).to(torch.bfloat16)
    fastdiff.accelerate(pipe, backend="reference", dtype=torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16
    images = _images(pipe, seed=3, output_type="pt").images
    assert images.dtype == torch.bfloat16
    # bfloat16 through fastdiff's float32-statistics GroupNorm vs torch's bfloat16 ops: the bfloat16 tolerance
    assert_close(images.float(), _images(twin, seed=3, output_type="pt").images.float(), torch.bfloat16,
                 what="bfloat16 pipeline")


def test_unaccelerate_restores_diffusers_forwards():
    pipe = _pipeline("ddpm", 1, seed=9)
    fastdiff.accelerate(pipe, backend="reference")
    assert any(is_patched(m) for m in pipe.unet.modules())
    unpatch_model(pipe.unet)
    assert not any(is_patched(m) for m in pipe.unet.modules())
    assert not any(isinstance(p, FastdiffAttnProcessor) for p in _processors(pipe.unet))


def _processors(model):
    from diffusers.models.attention_processor import Attention

    return [m.processor for m in model.modules() if isinstance(m, Attention)]


# ---------------------------------------------------------------------------------------------- schedulers
def test_unsupported_scheduler_is_kept_and_logged(caplog):
    pipe = _pipeline("ddpm", 0, seed=10)
    pipe.scheduler = DDPMParallelScheduler(num_train_timesteps=100)
    before = _images(pipe, seed=6).images
    with caplog.at_level(logging.INFO, logger="fastdiff.diffusers"):
        fastdiff.accelerate(pipe, backend="reference")
    assert isinstance(pipe.scheduler, DDPMParallelScheduler)
    assert "kept diffusers' DDPMParallelScheduler" in caplog.text
    assert any(isinstance(p, FastdiffAttnProcessor) for p in _processors(pipe.unet)) or not _processors(pipe.unet)
    _check_same(_images(pipe, seed=6).images, before, "DDPMParallelScheduler kept")


def test_scheduler_config_fastdiff_cannot_run_keeps_diffusers_scheduler(caplog):
    pipe = _pipeline("ddpm", 1, seed=15)
    pipe.scheduler = DDPMScheduler(num_train_timesteps=100, variance_type="learned_range")
    with caplog.at_level(logging.INFO, logger="fastdiff.diffusers"):
        fastdiff.accelerate(pipe, backend="reference")
    assert type(pipe.scheduler) is DDPMScheduler
    assert "kept diffusers' DDPMScheduler (its config is not supported by fastdiff" in caplog.text
    assert "learned_range" in pipe._fastdiff.scheduler


def test_custom_pipeline_holding_a_unet_and_scheduler():
    """A user's own DiffusionPipeline subclass: its UNet and scheduler are accelerated, its loop is its own."""
    from diffusers import DiffusionPipeline

    class MyPipeline(DiffusionPipeline):
        def __init__(self, unet, scheduler):
            super().__init__()
            self.register_modules(unet=unet, scheduler=scheduler)

        @torch.no_grad()
        def __call__(self, generator, steps=STEPS):
            x = torch.randn(2, self.unet.config.in_channels, 8, 8, generator=generator)
            self.scheduler.set_timesteps(steps)
            for t in self.scheduler.timesteps:
                x = self.scheduler.step(self.unet(x, t).sample, t, x, generator=generator).prev_sample
            return x

    unet = tiny_unet2d(dict(random_unet2d_config(0), sample_size=8), 12)
    pipe = MyPipeline(unet, DDPMScheduler(num_train_timesteps=50))
    before = pipe(torch.Generator().manual_seed(0))
    fastdiff.accelerate(pipe, backend="reference")
    assert type(pipe) is MyPipeline and type(pipe.scheduler) is fastdiff.DDPMScheduler
    _check_same(pipe(torch.Generator().manual_seed(0)), before, "custom pipeline")


# ---------------------------------------------------------------------------------------------- bad input
def test_what_cannot_be_accelerated_gets_a_clear_error():
    pipe = _pipeline("ddpm", 0)
    with pytest.raises(TypeError, match="takes a diffusers pipeline, got the model UNet2DModel"):
        fastdiff.accelerate(pipe.unet)

    class NoDenoiser:
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(TypeError, match=r"NoDenoiser is not supported.*transformer=Linear"):
        fastdiff.accelerate(NoDenoiser())
    with pytest.raises(ValueError, match="backend 'cuda' is not one of"):
        fastdiff.accelerate(pipe, backend="cuda")
    with pytest.raises(TypeError, match="cuda_graphs must be None, True or False"):
        fastdiff.accelerate(pipe, cuda_graphs="yes")
    with pytest.raises(ValueError, match="dtype must be one of"):
        fastdiff.accelerate(pipe, dtype=torch.int8)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device"):
            fastdiff.accelerate(pipe, cuda_graphs=True)
    assert not any(is_patched(m) for m in pipe.unet.modules()), "a refused call must leave the pipeline alone"


def test_importing_fastdiff_does_not_import_diffusers():
    code = ("import sys, fastdiff; assert 'diffusers' not in sys.modules, 'fastdiff imported diffusers'; "
            "import fastdiff.diffusers; assert fastdiff.accelerate is fastdiff.diffusers.accelerate")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# ---------------------------------------------------------------------------------------------- module units
def _attention(**kwargs):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(kwargs.pop("seed", 0))
    attn = Attention(**kwargs).eval()
    perturb_zero_parameters(attn, torch.Generator().manual_seed(1))
    return attn


@pytest.mark.parametrize("case", ["vae", "self", "cross", "cross_mask", "norm_cross"])
def test_attention_processor_matches_diffusers(case):
    gen = torch.Generator().manual_seed(20)
    if case == "vae":  # 4-D input, group norm, residual, rescale: the VAE's and UNet2DModel's attention
        attn = _attention(query_dim=24, heads=3, dim_head=8, norm_num_groups=4, residual_connection=True,
                          rescale_output_factor=2.0, bias=True, upcast_softmax=True, _from_deprecated_attn_block=True)
        args = (torch.randn(2, 24, 5, 3, generator=gen),)
        kwargs = {}
    elif case == "self":
        attn = _attention(query_dim=20, heads=5, dim_head=4)
        args, kwargs = (torch.randn(3, 7, 20, generator=gen),), {}
    else:
        attn = _attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=6,
                          cross_attention_norm="layer_norm" if case == "norm_cross" else None)
        args = (torch.randn(2, 9, 16, generator=gen),)
        kwargs = {"encoder_hidden_states": torch.randn(2, 5, 12, generator=gen)}
        if case == "cross_mask":
            keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
            kwargs["attention_mask"] = (1 - keep.float()) * -10000.0  # diffusers' additive mask
    with torch.no_grad():
        ref = attn(*args, **kwargs)
        attn.set_processor(FastdiffAttnProcessor("reference"))
        out = attn(*args, **kwargs)
    assert_close(out, ref, torch.float32, what=f"attention {case}")


@pytest.mark.parametrize("case", ["default", "scale_shift", "mish", "no_temb", "up", "down", "shortcut_scale"])
def test_resnet_block_matches_diffusers(case):
    from diffusers.models.resnet import ResnetBlock2D

    kw = dict(in_channels=12, out_channels=12, temb_channels=10, groups=4, eps=1e-6)
    if case == "scale_shift":
        kw["time_embedding_norm"] = "scale_shift"
    if case == "mish":
        kw["non_linearity"] = "mish"
    if case == "no_temb":
        kw["temb_channels"] = None
    if case in ("up", "down"):
        kw[case] = True
    if case == "shortcut_scale":
        kw.update(out_channels=18, groups_out=3, output_scale_factor=2.0)
    torch.manual_seed(3)
    block = ResnetBlock2D(**kw).eval()
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(2, 12, 6, 4, generator=gen)
    temb = None if case == "no_temb" else torch.randn(2, 10, generator=gen)
    with torch.no_grad():
        ref = block(x, temb)
        report = patch_model(block, "reference")
        assert report.patched["ResnetBlock2D"] == 1
        out = block(x, temb)
    assert_close(out, ref, torch.float32, what=f"ResnetBlock2D {case}")


# ---------------------------------------------------------------------------------------------- step loop
@pytest.mark.parametrize("kind, eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_step_loop_gives_diffusers_images(kind, eta):
    """The loop CUDA replays (graphs.StepLoop: timestep gathered on the device, fastdiff's fused update, each
    step's noise drawn from the caller's generator as diffusers draws it) run eagerly on the CPU: same images."""
    from fastdiff.schedulers import DDIMScheduler as FastDDIM
    from fastdiff.schedulers import DDPMScheduler as FastDDPM

    pipe = _pipeline(kind, 2, seed=14)
    kwargs = dict(batch_size=2, num_inference_steps=4, output_type="pt")
    if kind == "ddim":
        kwargs["eta"] = eta
    gens = lambda: [torch.Generator().manual_seed(s) for s in (3, 4)]  # noqa: E731
    before = pipe(generator=gens(), **kwargs).images
    fastdiff.accelerate(pipe, backend="reference")
    assert type(pipe.scheduler) is (FastDDIM if kind == "ddim" else FastDDPM)
    pipe._fastdiff.step_loop_off_cuda = True
    assert pipe._use_step_graph()
    after = pipe(generator=gens(), **kwargs).images
    again = pipe(generator=gens(), **kwargs).images
    assert len(pipe._fastdiff.loops) == 1, "the second call reuses the loop"
    _check_same(after, before, f"{kind} eta={eta} step loop vs diffusers")
    _check_same(again, before, "second call")


def test_the_captured_step_reads_nothing_back_to_the_host():
    """StepLoop.step (what CUDA captures): UNet forward on fastdiff's ops + fused update, no host read (and so
    capturable), checked op by op with a dispatch mode; the guard itself fires on a host read."""
    from accelerate_helpers import HostReadGuard

    for kind in ("ddpm", "ddim"):
        pipe = _pipeline(kind, 1, seed=18)
        fastdiff.accelerate(pipe, backend="reference")
        pipe._fastdiff.step_loop_off_cuda = True
        shape = (2, pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
        eta = 1.0 if kind == "ddim" else 0.0
        loop = pipe._fastdiff.step_loop(pipe, shape, torch.float32, torch.device("cpu"), 3, eta, False, kind == "ddim")
        loop.x.normal_()
        loop.noise.normal_()
        with torch.no_grad(), HostReadGuard():
            for _ in range(3):
                loop.step()
        assert int(loop.step_index) == 3
    with pytest.raises(AssertionError, match="host read inside the step"), HostReadGuard():
        torch.ones(3)[torch.tensor(1)].item()


def test_graph_keys_follow_shapes_not_values():
    """GraphedForward's cache key: batch (CFG doubling), latent shape, text length and dtypes, never a timestep value;
    arguments it cannot copy into a static buffer make the call eager (no key)."""
    from fastdiff.diffusers.graphs import GraphedForward

    graphed = GraphedForward(torch.nn.Linear(1, 1), eager_forward=None)
    cpu = torch.device("cpu")

    def key(batch=2, size=8, tokens=7, t=5, **kw):
        x, text = torch.randn(batch, 4, size, size), torch.randn(batch, tokens, 32)
        return graphed._key((x, torch.tensor(t)), {"encoder_hidden_states": text, "return_dict": False, **kw}, cpu)[0]

    assert key(t=5) == key(t=900)
    assert len({key(), key(batch=4), key(size=16), key(tokens=77), key(return_dict=True)}) == 5
    time_ids = lambda n: {"time_ids": torch.zeros(2, n)}  # noqa: E731
    assert key(added_cond_kwargs=time_ids(6)) != key(added_cond_kwargs=time_ids(5))
    assert key(cross_attention_kwargs={"scale": 0.5}) != key(cross_attention_kwargs={"scale": 1.0})
    assert key(callback=object()) is None


# ---------------------------------------------------------------------------------------------- CUDA graphs
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_cuda_graph_step_loop_gives_the_same_images(kind):
    """On CUDA the whole denoising step is one graph: same images as eager diffusers, replayed across calls, and a
    weight changed in place after the capture is seen by the next call."""
    pipe = _pipeline(kind, 1, seed=13).to("cuda")
    twin = copy.deepcopy(pipe)  # stays diffusers' own
    kwargs = dict(batch_size=2, output_type="pt", num_inference_steps=4)
    if kind == "ddim":
        kwargs["eta"] = 1.0
    eager = _images(twin, seed=8, **kwargs).images
    fastdiff.accelerate(pipe, backend="auto", cuda_graphs=True)
    assert pipe._use_step_graph(), pipe._fastdiff.scheduler
    first = _images(pipe, seed=8, **kwargs).images
    second = _images(pipe, seed=8, **kwargs).images
    loops = pipe._fastdiff.loops
    assert len(loops) == 1 and next(iter(loops.values())).replays == 2 * 4
    # compiled kernels round differently from diffusers' eager ops (GUIDE: approximate / and sqrt on the GPU), and
    # four steps of a random network amplify that: a looser bound than one op's 1e-5, still far below a wrong step
    _check_same(first, eager, "graphed step loop vs eager diffusers", rtol=1e-4)
    _check_same(second, first, "second graphed call", rtol=1e-6)
    with torch.no_grad():
        for p in (pipe, twin):
            p.unet.conv_out.weight.mul_(1.5)
    changed = _images(pipe, seed=8, **kwargs).images
    assert (changed - first).abs().max() > 1e-3
    _check_same(changed, _images(twin, seed=8, **kwargs).images, "a weight changed after capture is seen", rtol=1e-4)
    assert len(loops) == 1, "an in-place change needs no new capture"
