"""CUDA graphs for diffusers models and pipelines accelerated by ``fastdiff.accelerate``.

Two pieces, both reading the model's parameters in place (a graph records their addresses: a weight changed
in place, or a LoRA fused into it, is seen by the next replay; a parameter *replaced*, as ``.to()`` or loading
an adapter does, changes the parameter signature and drops every graph, which are then captured again):

- ``GraphedForward``: a denoiser's forward captured once per input signature (batch including the
  classifier-free-guidance doubling, latent shape, text length, dtypes and the structure of the extra inputs),
  all graphs of one model in one memory pool, a graph never replayed for another batch size. Inputs are
  copied into the graph's static buffers before each replay, the output is cloned out (in the sample's memory
  layout, eager calls too: fastdiff's fused scheduler update takes one layout).
- ``StepLoop``: the whole denoising step of a DDPM/DDIM pipeline (UNet forward + fastdiff's fused scheduler
  update) as one graph replayed once per step. The timestep and the coefficients are read on the device from
  the step counter; the step's Gaussian noise is drawn outside the graph exactly as diffusers draws it
  (``randn_tensor`` with the caller's generator, in the same order) and copied into a static buffer, so the
  same generator gives the same images as the eager pipeline.
"""

from __future__ import annotations

import copy
import logging
import numbers

import torch
from torch.utils import _pytree as pytree

log = logging.getLogger("fastdiff.diffusers")

_SCALARS = (type(None), bool, int, float, str)


def parameter_signature(model: torch.nn.Module) -> tuple:
    """Addresses, dtypes and devices of every parameter and buffer: changes when one is replaced."""
    return tuple((t.data_ptr(), t.dtype, t.device) for t in (*model.parameters(), *model.buffers()))


def _layout_of(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _match_sample(output, sample: torch.Tensor, copy_always: bool):
    """``output`` with every tensor shaped like ``sample`` in sample's memory layout (a copy where it differs, or
    always with ``copy_always``: a graph's static output must not be handed out). diffusers' convolutions may
    return a channels_last prediction for an NCHW sample; fastdiff's fused scheduler update wants one layout."""
    fmt = _layout_of(sample)

    def fix(t):
        if not isinstance(t, torch.Tensor):
            return t
        if t.shape == sample.shape and not t.is_contiguous(memory_format=fmt):
            return t.clone(memory_format=fmt)
        return t.clone() if copy_always else t

    return pytree.tree_map(fix, output)


def _capture(graph: torch.cuda.CUDAGraph, pool, device, fn, reset=None, warmup: int = 2):
    """Run ``fn`` ``warmup`` times on a side stream (lazy init, autotuning), then capture it into ``graph``.

    ``reset`` runs before each of those runs, outside the graph (it is not recorded).
    """
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            if reset:
                reset()
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    if reset:
        reset()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return out


class _Graph:
    def __init__(self, graph, static_leaves, output):
        self.graph, self.static_leaves, self.output = graph, static_leaves, output


class GraphedForward:
    """A model's forward replayed from CUDA graphs keyed by the input signature; eager where it cannot be.

    Eager (diffusers' own forward) when: ``enabled`` is False, the sample is not a CUDA tensor, gradients are on,
    the model is in training mode, torch.compile is tracing, a CUDA graph is already being captured (the caller's
    own), or an argument is neither a tensor nor a plain scalar (callbacks, objects; scalars such as
    ``cross_attention_kwargs={"scale": ...}`` are fine: they become part of the key).
    """

    def __init__(self, model: torch.nn.Module, eager_forward, enabled: bool | None = None):
        self.model = model
        self.eager_forward = eager_forward  # diffusers' forward bound to the model
        self.enabled = enabled  # None: on for CUDA inputs
        self.graphs: dict = {}
        self.pool = None
        self.signature = None
        self.captures = 0
        self.replays = 0

    def __deepcopy__(self, memo):
        """A copy of the model gets its own, empty graph cache (graphs belong to one set of parameters)."""
        return GraphedForward(copy.deepcopy(self.model, memo), copy.deepcopy(self.eager_forward, memo), self.enabled)

    def reset(self) -> None:
        self.graphs.clear()
        self.pool = None
        self.signature = None

    def _key(self, args, kwargs, device):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key = [repr(spec)]
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                if leaf.device != device and leaf.numel() != 1:
                    return None, None
                key.append(("tensor", tuple(leaf.shape), leaf.dtype))
            elif isinstance(leaf, _SCALARS):
                key.append(("scalar", type(leaf), leaf))
            else:
                return None, None
        return tuple(key), leaves

    def __call__(self, sample, timestep, *args, **kwargs):
        model = self.model
        if not isinstance(sample, torch.Tensor):
            return self.eager_forward(sample, timestep, *args, **kwargs)
        if (self.enabled is False or not sample.is_cuda or torch.is_grad_enabled() or model.training
                or torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing()):
            return _match_sample(self.eager_forward(sample, timestep, *args, **kwargs), sample, False)
        if isinstance(timestep, numbers.Number) and not isinstance(timestep, bool):
            # diffusers turns a Python timestep into a one-element tensor; doing it here keeps one graph for all steps
            dtype = torch.float64 if isinstance(timestep, float) else torch.int64
            timestep = torch.tensor([timestep], dtype=dtype)
        call_args = (sample, timestep, *args)
        key, leaves = self._key(call_args, kwargs, sample.device)
        if key is None:
            return _match_sample(self.eager_forward(sample, timestep, *args, **kwargs), sample, False)
        signature = parameter_signature(model)
        if signature != self.signature:
            if self.graphs:
                log.info("%s: parameters were replaced; dropping %d CUDA graphs", type(model).__name__,
                         len(self.graphs))
            self.reset()
            self.signature = signature
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture_graph(leaves, call_args, kwargs, sample.device)
            self.graphs[key] = entry
        for static, leaf in zip(entry.static_leaves, leaves):
            if isinstance(static, torch.Tensor):
                static.copy_(leaf)
        entry.graph.replay()
        self.replays += 1
        return _match_sample(entry.output, sample, True)

    def _capture_graph(self, leaves, call_args, kwargs, device) -> _Graph:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        static_leaves = [leaf.detach().to(device).clone() if isinstance(leaf, torch.Tensor) else leaf
                         for leaf in leaves]
        _, spec = pytree.tree_flatten((call_args, kwargs))
        static_args, static_kwargs = pytree.tree_unflatten(static_leaves, spec)
        graph = torch.cuda.CUDAGraph()
        output = _capture(graph, self.pool, device, lambda: self.eager_forward(*static_args, **static_kwargs))
        self.captures += 1
        log.info("%s: captured a CUDA graph for inputs %s", type(self.model).__name__,
                 [tuple(t.shape) for t in static_leaves if isinstance(t, torch.Tensor)])
        return _Graph(graph, static_leaves, output)


class StepLoop:
    """The denoising step x_t -> x_{t-1} of a DDPM/DDIM pipeline (UNet + fastdiff's update) as one CUDA graph.

    ``scheduler``: a fastdiff scheduler with its timesteps set on the device (this object keeps a copy);
    ``unet_forward(x, t)``: diffusers' eager forward returning an output with ``.sample``. On a CUDA device the
    step is captured and replayed; elsewhere the very same ``step`` runs eagerly (how the CPU tests check it).
    """

    def __init__(self, unet_forward, scheduler, shape, dtype, device, pool):
        self.scheduler = copy.deepcopy(scheduler)
        self.steps = len(self.scheduler.timesteps)
        self.x = torch.zeros(shape, dtype=dtype, device=device)
        self.noise = torch.zeros(shape, dtype=dtype, device=device)
        self.step_index = torch.zeros((), dtype=torch.int64, device=device)
        self.unet_forward = unet_forward
        self.graph = None
        if torch.device(device).type == "cuda":
            # warm-up and capture run step 0 on scratch data; run() sets the real state before the first replay
            self.graph = torch.cuda.CUDAGraph()
            _capture(self.graph, pool, device, self.step, reset=self.step_index.zero_)
        self.replays = 0

    def step(self):
        """One step at ``self.step_index``; capturable: the timestep is gathered on the device, nothing syncs."""
        t = self.scheduler.timesteps.index_select(0, self.step_index.reshape(1))
        model_output = _match_sample(self.unet_forward(self.x, t).sample, self.x, False)
        new = self.scheduler.step_at(model_output, self.step_index, self.x, noise=self.noise)
        self.x.copy_(new)
        self.step_index.add_(1)
        return self.x

    def run(self, x: torch.Tensor, draw_noise, progress=None) -> torch.Tensor:
        """Denoise ``x`` through every step; ``draw_noise(i)`` returns step i's noise (or None: no draw)."""
        self.x.copy_(x)
        self.step_index.zero_()
        for i in (progress or iter)(range(self.steps)):
            noise = draw_noise(i)
            if noise is not None:
                self.noise.copy_(noise)
            else:
                self.noise.zero_()
            if self.graph is None:
                self.step()
            else:
                self.graph.replay()
                self.replays += 1
        return self.x.clone()
