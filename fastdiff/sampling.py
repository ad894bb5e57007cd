"""Sampling: batched DDPM/DDIM generation with per-image seeds, image-to-image and CUDA graphs.

Reproducibility contract: image ``i`` of a run with base seed ``s`` depends only on ``(s, i)``. Its
starting noise and every step's noise are Philox draws keyed by ``image_seed(s, i)``
(``fastdiff/ops/noise.py``), and every op of the UNet is per-sample, so the batch an image is drawn in
does not change it (up to the platform's convolution kernels, which may round differently per batch size).

The denoising step (UNet forward + scheduler update) reads its timestep and coefficients from device
buffers through a device-side step counter, so the same function runs eagerly or captured once in a
CUDA graph and replayed for every step with no host work and no host synchronisation.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import numbers
import os

import torch
from tqdm.auto import tqdm

from . import images as imageio
from . import ops

log = logging.getLogger("fastdiff.sampling")

_MASK64 = (1 << 64) - 1
SEED_LIMIT = 1 << 64  # base seeds are integers in [0, 2**64): every bit of a 64-bit seed counts


def check_seed(seed) -> int:
    """``seed`` as an int, or ValueError unless it is an integer in [0, 2**64) (bool excluded)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return int(seed)


def image_seed(seed: int, index: int) -> int:
    """Seed of image ``index`` (an integer >= 0) in a run with base seed ``seed`` (an integer in [0, 2**64)):
    SplitMix64 of both, top bit dropped so it fits in int64. Every bit of the base seed counts."""
    seed = check_seed(seed)
    if isinstance(index, bool) or not isinstance(index, numbers.Integral) or index < 0:
        raise ValueError(f"image index must be an integer >= 0, got {index!r}")
    z = (seed * 0x9E3779B97F4A7C15 + (int(index) + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def image_seeds(seed: int, indices, device=None) -> torch.Tensor:
    return torch.tensor([image_seed(seed, i) for i in indices], dtype=torch.int64, device=device)


@dataclasses.dataclass
class LoopState:
    """The static buffers a captured step reads and writes."""

    x: torch.Tensor  # [N, C, H, W] current sample x_t, updated in place to x_{t-1}
    seeds: torch.Tensor  # int64 [N] per-image Philox seeds
    step_index: torch.Tensor  # int64 0-dim: index into the plan's timesteps, advanced on the device


class SamplingPlan:
    """One scheduler with its timesteps set: device buffers that never change after creation."""

    def __init__(self, scheduler, steps: int, eta: float, device: torch.device):
        self.scheduler = copy.deepcopy(scheduler)
        self.scheduler.set_timesteps(steps, device=device, eta=eta)
        self.steps = steps
        self.eta = eta
        self.timesteps = self.scheduler.timesteps.to(device)

    def step(self, model, state: LoopState) -> None:
        """x_t -> x_{t-1} for the step at ``state.step_index``; capturable (no sync, no host branch)."""
        t = self.timesteps[state.step_index]
        model_output = model(state.x, t)
        seeds = state.seeds if self.scheduler.needs_noise else None
        new = self.scheduler.step_at(model_output, state.step_index, state.x, seeds=seeds)
        state.x.copy_(new)
        state.step_index.add_(1)


class _CapturedLoop:
    """A CUDA graph of ``SamplingPlan.step`` over static buffers, replayed once per step."""

    def __init__(self, plan: SamplingPlan, model, shape, dtype, device, warmup: int = 2):
        self.plan = plan
        self.state = LoopState(
            x=torch.randn(shape, device=device, dtype=dtype),
            seeds=torch.zeros(shape[0], dtype=torch.int64, device=device),
            step_index=torch.zeros((), dtype=torch.int64, device=device),
        )
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):  # autotuning, lazy init and allocator warm-up happen outside capture
                self.state.step_index.zero_()
                plan.step(model, self.state)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        self.state.step_index.zero_()
        with torch.cuda.graph(self.graph):
            plan.step(model, self.state)
        self.replays = 0

    def run(self, x: torch.Tensor, seeds: torch.Tensor, start: int, on_step=None) -> torch.Tensor:
        n = x.shape[0]
        self.state.x[:n].copy_(x)
        self.state.seeds[:n].copy_(seeds)
        if n < self.state.x.shape[0]:  # pad a smaller final batch; the padding images are discarded
            self.state.x[n:].copy_(self.state.x[:1].expand_as(self.state.x[n:]))
            self.state.seeds[n:].fill_(0)
        self.state.step_index.fill_(start)
        for _ in range(start, self.plan.steps):
            self.graph.replay()
            self.replays += 1
            if on_step:
                on_step()
        return self.state.x[:n].clone()


class Sampler:
    """Draws images from a UNet with a DDPM or DDIM scheduler.

    ``backend`` ("reference", "triton", "auto") is set on the model and the scheduler. CUDA graphs are
    used on CUDA unless ``cuda_graphs=False``; graphs are cached per (plan, batch, shape, dtype) and
    reused across calls, a smaller batch replays a cached larger graph, and weights changed in place
    (fine-tuning, a LoRA merge) are seen by the next replay because the graph reads the parameters.
    """

    def __init__(self, model, scheduler, *, device="cpu", dtype=torch.float32, backend=None, cuda_graphs=None):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = dtype
        self.backend = ops.check_backend(backend)
        self.model = model.to(device=self.device, dtype=dtype).eval()
        if hasattr(self.model, "set_backend"):
            self.model.set_backend(self.backend)
        self.scheduler = scheduler
        scheduler.backend = self.backend
        self.cuda_graphs = (self.device.type == "cuda") if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self._plans: dict[tuple, SamplingPlan] = {}
        self._graphs: dict[tuple, _CapturedLoop] = {}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        cfg = self.model.config
        size = cfg.sample_size
        if size is None:
            raise ValueError("the model's config has no sample_size; pass the image size explicitly")
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (cfg.in_channels, h, w)

    def plan(self, steps: int, eta: float = 0.0) -> SamplingPlan:
        key = (int(steps), float(eta))
        if key not in self._plans:
            self._plans[key] = SamplingPlan(self.scheduler, int(steps), float(eta), self.device)
        return self._plans[key]

    def _graph(self, plan: SamplingPlan, shape) -> _CapturedLoop:
        for (p, cached_shape), loop in self._graphs.items():  # a cached graph of a larger batch serves too
            if p is plan and cached_shape[1:] == tuple(shape[1:]) and cached_shape[0] >= shape[0]:
                return loop
        key = (plan, tuple(shape))
        self._graphs[key] = _CapturedLoop(plan, self.model, tuple(shape), self.dtype, self.device)
        return self._graphs[key]

    @property
    def graph_count(self) -> int:
        return len(self._graphs)

    @torch.no_grad()
    def sample(self, seeds: torch.Tensor, *, steps: int, eta: float = 0.0, init: torch.Tensor | None = None,
               strength: float = 1.0, image_shape=None, on_step=None) -> torch.Tensor:
        """Images [len(seeds), C, H, W] in the model's output range (about [-1, 1]).

        ``init``: an image batch (1 or len(seeds) images) noised to ``strength`` and denoised from there.
        """
        _check_positive_int("steps", steps)
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        seeds = seeds.to(device=self.device, dtype=torch.int64)
        plan = self.plan(steps, eta)
        shape = tuple(image_shape or self.image_shape)
        noise = ops.gaussian_noise(seeds, ops.INITIAL_NOISE_STREAM, shape, dtype=torch.float32, backend=self.backend)
        start = 0
        if init is not None:
            start = plan.scheduler.img2img_start(strength)
            if start >= plan.steps:  # strength 0: nothing to denoise
                return init.to(self.device, self.dtype).expand(len(seeds), *shape).clone()
            _set_begin_index(plan.scheduler, start)
            init = init.to(self.device, torch.float32).expand(len(seeds), *shape)
            t_start = plan.timesteps[start].expand(len(seeds))
            x = plan.scheduler.add_noise(init, noise, t_start)
        else:
            _set_begin_index(plan.scheduler, 0)
            x = noise * plan.scheduler.init_noise_sigma
        x = x.to(self.dtype)
        if self.cuda_graphs:
            return self._graph(plan, x.shape).run(x, seeds, start, on_step)
        state = LoopState(x=x, seeds=seeds, step_index=torch.tensor(start, dtype=torch.int64, device=self.device))
        for _ in range(start, plan.steps):
            plan.step(self.model, state)
            if on_step:
                on_step()
        return state.x


def _set_begin_index(scheduler, start: int) -> None:
    """Multistep schedulers (DPM-Solver) warm up from the first step taken: their table is rewritten in place."""
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class NonFiniteOutputError(ValueError):
    """A batch came out with NaN or infinite values (broken weights, or a float16 overflow)."""


def check_init_image(init: torch.Tensor | None, image_shape) -> torch.Tensor | None:
    """``init`` as [1 or N, C, H, W] matching ``image_shape`` (C, H, W); ValueError saying what differs."""
    if init is None:
        return None
    if not isinstance(init, torch.Tensor):
        raise ValueError(f"init must be a tensor [N, C, H, W], got {type(init).__name__}")
    if init.dim() == 3:
        init = init[None]
    if init.dim() != 4 or tuple(init.shape[1:]) != tuple(image_shape):
        c, h, w = image_shape
        raise ValueError(f"init image has shape {tuple(init.shape)}; the model samples [N, {c}, {h}, {w}] "
                         f"({c} channels of {h}x{w}): convert and resize it first (fastdiff.images.load_image)")
    return init


@dataclasses.dataclass
class GenerateResult:
    written: list[str]  # PNGs written by this call
    skipped: int  # images already on disk (resumed)
    grid: str | None
    manifest: str | None = None  # the run manifest (out_dir/run.json)
    regenerated: list[str] = dataclasses.field(default_factory=list)  # unreadable images found and drawn again


def _images_to_draw(out_dir: str, num_images: int, image_shape) -> tuple[list[int], list[str]]:
    """(indices to draw, unreadable existing images to draw again); a folder in an image's place is an error."""
    todo, broken = [], []
    for i in range(num_images):
        path = imageio.image_path(out_dir, i)
        if not os.path.lexists(path):
            todo.append(i)
        elif os.path.isdir(path):
            raise ValueError(f"{path} is a folder, not an image; move it out of the output folder")
        elif not imageio.is_sample_png(path, image_shape):
            log.warning("%s is not a readable %s PNG; drawing it again", path, "x".join(map(str, image_shape)))
            todo.append(i)
            broken.append(path)
    return todo, broken


def _check_finite(images: torch.Tensor, indices, batch_number: int, num_batches: int) -> None:
    """One device-side reduction and one host read per batch (never per step)."""
    finite = torch.isfinite(images).flatten(1).all(1)
    if bool(finite.all()):
        return
    bad = [indices[k] for k in (~finite).nonzero().flatten().tolist()]
    raise NonFiniteOutputError(
        f"batch {batch_number + 1} of {num_batches} (images {indices[0]}..{indices[-1]}) has NaN or infinite values "
        f"in {len(bad)} images, first image {bad[0]}; nothing was written for it (non-finite model weights, "
        "or a float16 overflow: try float32)")


def generate(sampler: Sampler, *, num_images: int, batch_size: int, seed: int, steps: int, out_dir: str,
             eta: float = 0.0, init: torch.Tensor | None = None, strength: float = 1.0, grid: bool = True,
             progress: bool = True, image_shape=None, overwrite: bool = False,
             model_source: str | None = None) -> GenerateResult:
    """Write ``num_images`` PNGs (``out_dir/000000.png`` ...) in batches, plus ``grid.png`` and ``run.json``.

    Before sampling: ``out_dir`` is created and proven writable, and its run manifest (``fastdiff.manifest``)
    is checked: a rerun with the same settings resumes (images already there, if readable, are kept), other
    settings raise ``RunMismatchError`` unless ``overwrite`` (which removes the old images first). A batch
    with NaN or infinite values raises ``NonFiniteOutputError`` and writes nothing. ``model_source`` (a path
    or a description of the weights) is recorded in the manifest.
    """
    from .fileio import prepare_output_dir
    from .manifest import RunManifest

    _check_positive_int("num_images", num_images)
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("steps", steps)
    check_seed(seed)
    image_shape = tuple(image_shape or sampler.image_shape)
    init = check_init_image(init, image_shape)
    first_step = sampler.plan(steps, eta).scheduler.img2img_start(strength) if init is not None else 0
    prepare_output_dir(out_dir)
    manifest = RunManifest.for_sampling(sampler, seed=seed, steps=steps, eta=eta, image_shape=image_shape, init=init,
                                        strength=strength, num_images=num_images, model=model_source)
    manifest.check_or_write(out_dir, overwrite)
    todo, broken = _images_to_draw(out_dir, num_images, image_shape)
    skipped = num_images - len(todo)
    if skipped:
        log.info("resuming: %d of %d images already in %s", skipped, num_images, out_dir)
    batches = [todo[k:k + batch_size] for k in range(0, len(todo), batch_size)]
    steps_per_batch = max(steps - first_step, 0)
    written = []
    bar = tqdm(total=len(batches) * steps_per_batch, unit="step", disable=not progress,
               desc=f"{len(todo)} images")
    try:
        for number, indices in enumerate(batches):
            seeds = image_seeds(seed, indices)
            out = sampler.sample(seeds, steps=steps, eta=eta, init=init, strength=strength, image_shape=image_shape,
                                 on_step=bar.update if progress else None)
            _check_finite(out, indices, number, len(batches))
            written += imageio.save_images(out, out_dir, indices)
    finally:
        bar.close()
    grid_path = None
    if grid:
        pictures = imageio.load_png_folder(out_dir, range(num_images))
        grid_path = os.path.join(out_dir, "grid.png")
        imageio.save_png_atomic(imageio.make_grid(pictures, ncols=math.ceil(math.sqrt(num_images))), grid_path)
    return GenerateResult(written=written, skipped=skipped, grid=grid_path,
                          manifest=os.path.join(out_dir, "run.json"), regenerated=broken)
