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
import functools
import inspect
import logging
import math
import numbers
import os
import time

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


def make_loop_state(shape, dtype, device, memory_format=torch.contiguous_format) -> LoopState:
    """Fresh static buffers for a batch of ``shape`` (x random, seeds and step index zero)."""
    return LoopState(
        x=torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=memory_format),
        seeds=torch.zeros(shape[0], dtype=torch.int64, device=device),
        step_index=torch.zeros((), dtype=torch.int64, device=device),
    )


class SamplingPlan:
    """One scheduler with its timesteps set: device buffers that never change after creation."""

    def __init__(self, scheduler, steps: int, eta: float, device: torch.device):
        self.scheduler = copy.deepcopy(scheduler)
        self.scheduler.set_timesteps(steps, device=device, eta=eta)
        self.steps = steps
        self.eta = eta
        self.timesteps = self.scheduler.timesteps.to(device)
        # a scheduler whose step_at takes out= writes x_{t-1} over x_t (no extra copy per step)
        self._update_in_place = "out" in inspect.signature(self.scheduler.step_at).parameters

    def step(self, model, state: LoopState) -> None:
        """x_t -> x_{t-1} for the step at ``state.step_index``; capturable (no sync, no host branch).

        The timestep is gathered on the device as a [1] tensor: indexing with the 0-dim step index
        (``timesteps[step_index]``) would read it back to the host (``aten._local_scalar_dense``).
        """
        t = self.timesteps.index_select(0, state.step_index.reshape(1))
        model_output = model(state.x, t)
        seeds = state.seeds if self.scheduler.needs_noise else None
        if self._update_in_place:
            self.scheduler.step_at(model_output, state.step_index, state.x, seeds=seeds, out=state.x)
        else:
            state.x.copy_(self.scheduler.step_at(model_output, state.step_index, state.x, seeds=seeds))
        state.step_index.add_(1)


class CaptureError(RuntimeError):
    """A CUDA-graph capture failed; the process is back on its own stream and out of capture mode."""


def capture_graph(graph, fn, *, stream, pool=None, device=None, stream_context=None) -> None:
    """Capture ``fn()`` into ``graph`` on ``stream``, drawing memory from ``pool`` (None: the graph's own).

    Unlike ``torch.cuda.graph``, a failure inside ``fn`` (a host read, an unsupported op) ends the capture
    and leaves the capture stream before the error propagates, so the caller's stream, the allocator and
    later captures are as they were. ``stream_context`` (default ``torch.cuda.stream``) exists for tests.
    """
    stream_context = torch.cuda.stream if stream_context is None else stream_context
    hint = "(sample with cuda_graphs=False / --no-cuda-graphs to run it eagerly)"
    with stream_context(stream):
        graph.capture_begin(*(() if pool is None else (pool,)))
        try:
            fn()
        except BaseException as exc:
            try:
                graph.capture_end()  # ends capture mode (an invalidated capture raises here, after ending it)
            except Exception:  # the body's error is the one to report
                _end_pool_routing(pool, device)
            if not isinstance(exc, Exception):  # KeyboardInterrupt and the like pass through as they are
                raise
            raise CaptureError(f"CUDA-graph capture of the sampling step failed: {type(exc).__name__}: {exc} "
                               f"{hint}") from exc
        try:
            graph.capture_end()
        except Exception as exc:
            _end_pool_routing(pool, device)
            raise CaptureError(f"ending the CUDA-graph capture of the sampling step failed: {exc} {hint}") from exc


def _end_pool_routing(pool, device) -> None:
    """Stop sending the capture stream's allocations to ``pool`` when capture_end raised before doing so."""
    if pool is None or device is None:
        return
    try:
        torch._C._cuda_endAllocateToPool(device.index, pool)
    except Exception:  # capture_end had ended it already
        pass


def _weights_signature(model) -> tuple:
    """Where the model's tensors live: a captured graph reads these addresses, so a change means recapture."""
    return tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in list(model.parameters()) + list(model.buffers()))


class _CapturedLoop:
    """A CUDA graph of ``SamplingPlan.step`` over static buffers, replayed once per step."""

    def __init__(self, plan: SamplingPlan, model, shape, dtype, device, *, pool=None, memory_format=None,
                 warmup: int = 2):
        self.plan = plan
        self.batch = shape[0]
        self.state = make_loop_state(shape, dtype, device, memory_format or torch.contiguous_format)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):  # autotuning, cuDNN benchmarking, lazy init and allocator warm-up: not in capture
                self.state.step_index.zero_()
                plan.step(model, self.state)
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        self.graph = torch.cuda.CUDAGraph()
        self.state.step_index.zero_()
        capture_graph(self.graph, lambda: plan.step(model, self.state), stream=stream, pool=pool, device=device)
        self.weights = _weights_signature(model)
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
        return self.state.x[:n].clone(memory_format=torch.contiguous_format)  # never a view of the static buffer


# A cached graph serves a smaller batch (padded) only up to this factor: a batch of 1 never pays for 64.
GRAPH_REUSE_MAX_FACTOR = 2


class Sampler:
    """Draws images from a UNet with a DDPM or DDIM scheduler.

    ``backend`` ("reference", "triton", "auto") is set on the model and the scheduler. CUDA graphs are
    used on CUDA unless ``cuda_graphs=False``; graphs are cached per (plan, batch, shape, dtype), share one
    memory pool, and are reused across calls; a smaller batch replays a cached larger graph only when that
    graph is at most ``GRAPH_REUSE_MAX_FACTOR`` times its size. Weights changed in place (fine-tuning, a
    LoRA merge, ``load_state_dict``) are seen by the next replay because the graph reads the parameters;
    weights replaced by new tensors (``.to()``, ``load_state_dict(assign=True)``) make the next call capture
    again.

    GPU defaults: on CUDA ``torch.backends.cudnn.benchmark`` is switched on before any warm-up, and with
    float16/bfloat16 the model and the sample are channels_last (what cuDNN's tensor-core convolutions
    prefer); ``memory_format`` overrides that choice. Half precision is the recommended dtype on CUDA;
    float32 stays available.
    """

    def __init__(self, model, scheduler, *, device="cpu", dtype=torch.float32, backend=None, cuda_graphs=None,
                 memory_format=None):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = dtype
        self.backend = ops.check_backend(backend)
        self.memory_format = default_memory_format(self.device, dtype) if memory_format is None else memory_format
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # pick convolution algorithms once, during warm-up
        # (NCHW by default only for the input: a model the caller made channels_last is left so)
        layout = {} if memory_format is None and self.memory_format == torch.contiguous_format else {
            "memory_format": self.memory_format}
        self.model = model.to(device=self.device, dtype=dtype, **layout).eval()
        if hasattr(self.model, "set_backend"):
            self.model.set_backend(self.backend)
        self.scheduler = scheduler
        scheduler.backend = self.backend
        self.cuda_graphs = (self.device.type == "cuda") if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self._plans: dict[tuple, SamplingPlan] = {}
        self._graphs: dict[tuple, _CapturedLoop] = {}
        self._graph_pool = None  # one memory pool for every captured graph (created at the first capture)

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
        """The cached graph for ``shape``: the smallest one of this plan and image shape whose batch is at
        least ``shape[0]`` and at most ``GRAPH_REUSE_MAX_FACTOR`` times it, else a new capture."""
        n, image = shape[0], tuple(shape[1:])
        weights = _weights_signature(self.model)
        for key in [k for k, loop in self._graphs.items() if loop.weights != weights]:
            del self._graphs[key]  # the model's tensors were replaced (.to(), assign=True): capture again
        fits = [(cached[0], loop) for (p, cached), loop in self._graphs.items()
                if p is plan and cached[1:] == image and n <= cached[0] <= GRAPH_REUSE_MAX_FACTOR * n]
        if fits:
            return min(fits, key=lambda item: item[0])[1]
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        loop = _CapturedLoop(plan, self.model, tuple(shape), self.dtype, self.device, pool=self._graph_pool,
                             memory_format=self.memory_format)
        self._graphs[(plan, tuple(shape))] = loop
        return loop

    @property
    def graph_count(self) -> int:
        return len(self._graphs)

    @torch.no_grad()
    def sample(self, seeds: torch.Tensor, *, steps: int, eta: float = 0.0, init: torch.Tensor | None = None,
               strength: float = 1.0, image_shape=None, on_step=None) -> torch.Tensor:
        """Images [len(seeds), C, H, W] in the model's output range (about [-1, 1]).

        ``seeds``: one Philox seed per image (an int64 tensor, or a list of ints, e.g. ``image_seeds(s, range(n))``).
        ``init``: an image batch (1 or len(seeds) images) noised to ``strength`` and denoised from there.
        """
        _check_positive_int("steps", steps)
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        seeds = _as_seed_tensor(seeds).to(self.device)
        plan = self.plan(steps, eta)
        shape = tuple(image_shape or self.image_shape)
        init = check_init_image(init, shape)
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
        x = x.to(self.dtype).contiguous(memory_format=self.memory_format)
        if self.cuda_graphs:
            return self._graph(plan, x.shape).run(x, seeds, start, on_step)
        state = LoopState(x=x, seeds=seeds, step_index=torch.tensor(start, dtype=torch.int64, device=self.device))
        for _ in range(start, plan.steps):
            plan.step(self.model, state)
            if on_step:
                on_step()
        return state.x.contiguous()


def default_memory_format(device: torch.device, dtype: torch.dtype) -> torch.memory_format:
    """channels_last where it pays: cuDNN's float16/bfloat16 (tensor-core) convolutions on CUDA; NCHW elsewhere."""
    if torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return torch.channels_last
    return torch.contiguous_format


def _set_begin_index(scheduler, start: int) -> None:
    """Multistep schedulers (DPM-Solver) warm up from the first step taken: their table is rewritten in place."""
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)


def _as_seed_tensor(seeds) -> torch.Tensor:
    """``seeds`` (an integer tensor or a sequence of ints) as a non-empty int64 [N] tensor; ValueError otherwise."""
    if not isinstance(seeds, torch.Tensor):
        try:
            seeds = torch.tensor(list(seeds))  # no dtype: floats must stay floats here and be refused below
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise ValueError(f"seeds must be a 1-D integer tensor or a list of ints (int64), got {seeds!r}") from None
    if seeds.dim() != 1 or seeds.numel() == 0 or seeds.is_floating_point() or seeds.is_complex() \
            or seeds.dtype == torch.bool:
        raise ValueError(f"seeds must be a non-empty 1-D integer tensor, got {seeds.dtype} of shape {tuple(seeds.shape)}")
    return seeds.to(torch.int64)


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
    written: list[str]  # files written by this call (this process: PNGs, or npz shards)
    skipped: int  # images already on disk (resumed), among this process's share
    grid: str | None
    manifest: str | None = None  # the run manifest (out_dir/run.json)
    regenerated: list[str] = dataclasses.field(default_factory=list)  # unreadable images found and drawn again
    per_rank: list[dict] = dataclasses.field(default_factory=list)  # every process: images drawn, skipped, seconds


def _raise_if_not_finite(finite: torch.Tensor, indices, batch_number: int, num_batches: int) -> None:
    """``finite``: a host bool tensor, one entry per image of the batch (computed on the device, read once)."""
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
             model_source: str | None = None, output_format: str = "png", layout: str = "auto",
             ranks=None) -> GenerateResult:
    """Write ``num_images`` images (PNGs ``out_dir/000000.png`` ..., or npz shards) plus ``grid.png`` and
    ``run.json``.

    Before sampling: ``out_dir`` is created and proven writable, and its run manifest (``fastdiff.manifest``)
    is checked: a rerun with the same settings resumes (images already there, if readable, are kept), other
    settings raise ``RunMismatchError`` unless ``overwrite`` (which removes the old images first). A batch
    with NaN or infinite values raises ``NonFiniteOutputError`` and writes nothing. ``model_source`` (a path
    or a description of the weights) is recorded in the manifest. ``output_format`` and ``layout``: see ``fastdiff.output``; a
    background writer encodes and writes while the next batch samples.

    ``ranks`` (``fastdiff.distributed.Ranks``, under torchrun): this process draws its share of the indices;
    rank 0 prepares the folder before the others start and writes the grid and the manifest after all are done.
    """
    from . import output
    from .distributed import ABORT_FLAG, Ranks
    from .fileio import prepare_output_dir
    from .manifest import RunManifest

    ranks = ranks or Ranks()
    _check_positive_int("num_images", num_images)
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("steps", steps)
    check_seed(seed)
    output.check_format(output_format)
    output.resolve_layout(layout, num_images)
    image_shape = tuple(image_shape or sampler.image_shape)
    init = check_init_image(init, image_shape)
    first_step = sampler.plan(steps, eta).scheduler.img2img_start(strength) if init is not None else 0
    manifest = None
    with ranks.stage("preparing the output folder"):
        if ranks.is_main:
            prepare_output_dir(out_dir)
            manifest = RunManifest.for_sampling(sampler, seed=seed, steps=steps, eta=eta, image_shape=image_shape,
                                                init=init, strength=strength, num_images=num_images, model=model_source)
            output.start_run(out_dir, manifest, output_format, layout, num_images, overwrite)
            if os.path.lexists(os.path.join(out_dir, ABORT_FLAG)):
                os.unlink(os.path.join(out_dir, ABORT_FLAG))
    ranks.abort_flag = os.path.join(out_dir, ABORT_FLAG)
    report = {}
    with ranks.stage("sampling", report):
        store = output.ImageStore.for_run(out_dir, image_shape)
        mine = ranks.my_indices(range(num_images), batch_size)
        todo, broken = store.missing(mine)
        skipped = len(mine) - len(todo)
        if skipped:
            log.info("resuming: %d of %d images already in %s", skipped, len(mine), out_dir)
        batches = [todo[k:k + batch_size] for k in range(0, len(todo), batch_size)]
        steps_per_batch = max(steps - first_step, 0)
        bar = tqdm(total=len(batches) * steps_per_batch, unit="step", disable=not progress or not ranks.is_main,
                   desc=f"{len(todo)} images" + (f" (rank 0 of {ranks.world_size})" if ranks.distributed else ""))
        start = time.perf_counter()
        try:
            with output.BackgroundWriter(store) as writer:
                for number, indices in enumerate(batches):
                    if ranks.should_stop():
                        break
                    seeds = image_seeds(seed, indices)
                    out = sampler.sample(seeds, steps=steps, eta=eta, init=init, strength=strength,
                                         image_shape=image_shape, on_step=bar.update if progress else None)
                    writer.submit(out, indices, functools.partial(_raise_if_not_finite, indices=indices,
                                                                  batch_number=number, num_batches=len(batches)))
            written = writer.written
        finally:
            bar.close()
        report.update(rank=ranks.rank, images=len(todo), skipped=skipped, seconds=time.perf_counter() - start)
    per_rank = ranks.reports["sampling"]
    grid_path = os.path.join(out_dir, "grid.png") if grid else None
    with ranks.stage("writing the grid and the manifest"):
        if ranks.is_main:
            if grid:
                shown = min(num_images, output.GRID_MAX_IMAGES)
                pictures = store.load(range(shown))
                imageio.save_png_atomic(imageio.make_grid(pictures, ncols=math.ceil(math.sqrt(shown))), grid_path)
            drawn = sum(r["images"] for r in per_rank)
            seconds = max(r["seconds"] for r in per_rank)
            manifest.record(out_dir, world_size=ranks.world_size, images_per_rank=[r["images"] for r in per_rank],
                            images_per_second=round(drawn / seconds, 3) if drawn and seconds > 0 else None)
    return GenerateResult(written=written, skipped=skipped, grid=grid_path,
                          manifest=os.path.join(out_dir, "run.json"), regenerated=broken, per_rank=per_rank)
