"""``fastdiff.accelerate(pipe)``: a diffusers pipeline's denoiser and VAE on fastdiff's ops, in place.

See ``fastdiff/diffusers/modules.py`` for what runs on fastdiff and ``graphs.py`` for the CUDA graphs. The
pipeline stays the same object with the same components, parameters, call signature and outputs.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch

from fastdiff import ops

from . import graphs
from .modules import PatchReport, patch_model

log = logging.getLogger("fastdiff.diffusers")

# diffusers scheduler class -> fastdiff's class of the same algorithm (looked up on ``fastdiff`` at call time)
FASTDIFF_SCHEDULERS = {
    "DDPMScheduler": "DDPMScheduler",
    "DDIMScheduler": "DDIMScheduler",
    "DPMSolverMultistepScheduler": "DPMSolverMultistepScheduler",
}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass
class AccelerationState:
    """What ``accelerate`` did to one pipeline (``pipe._fastdiff``)."""

    backend: str
    cuda_graphs: bool | None
    reports: list[PatchReport]
    scheduler: str  # what happened to the scheduler, in words
    loops: dict = dataclasses.field(default_factory=dict)  # captured denoising steps (DDPM/DDIM pipelines)
    pool: object = None
    signature: tuple | None = None
    step_loop_off_cuda: bool = False  # run the DDPM/DDIM step loop eagerly off CUDA (checks the loop on the CPU)

    def __deepcopy__(self, memo):
        """A copied pipeline captures its own loops: graphs are not copied."""
        return dataclasses.replace(self, reports=copy.deepcopy(self.reports, memo), loops={}, pool=None,
                                   signature=None)

    def summary(self) -> str:
        return "; ".join([r.summary() for r in self.reports] + [f"scheduler: {self.scheduler}"])

    def step_loop(self, pipe, shape, dtype, device, steps: int, eta: float, clipped: bool, ddim: bool):
        """The captured denoising step for this call's settings (captured on first use, kept for the next)."""
        signature = graphs.parameter_signature(pipe.unet)
        if signature != self.signature:
            self.loops.clear()
            self.pool = None
            self.signature = signature
        scheduler = pipe.scheduler
        key = (tuple(shape), dtype, device, steps, eta, clipped, id(scheduler), repr(scheduler.config))
        loop = self.loops.get(key)
        if loop is None:
            if ddim:
                scheduler.set_timesteps(steps, device=device, eta=eta, use_clipped_model_output=clipped)
            else:
                scheduler.set_timesteps(steps, device=device)
            if self.pool is None and torch.device(device).type == "cuda":
                self.pool = torch.cuda.graph_pool_handle()
            forward = pipe.unet.forward
            eager = forward.eager_forward if isinstance(forward, graphs.GraphedForward) else forward
            loop = graphs.StepLoop(eager, scheduler, shape, dtype, device, self.pool)
            self.loops[key] = loop
        return loop


def _denoiser(pipe):
    """The pipeline's UNet, or TypeError naming what it holds instead."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    if isinstance(pipe, torch.nn.Module):
        raise TypeError(f"fastdiff.accelerate takes a diffusers pipeline, got the model {type(pipe).__name__}; "
                        f"use fastdiff.diffusers.patch_model(model) for a single model")
    unet = getattr(pipe, "unet", None)
    if isinstance(unet, (UNet2DModel, UNet2DConditionModel)):
        return unet
    held = [f"{name}={type(getattr(pipe, name)).__name__}" for name in ("unet", "transformer", "prior", "decoder")
            if getattr(pipe, name, None) is not None]
    raise TypeError(f"fastdiff.accelerate: {type(pipe).__name__} is not supported: its denoiser must be a diffusers "
                    f"UNet2DModel or UNet2DConditionModel in .unet; it has {', '.join(held) or 'no denoiser'}")


def _swap_scheduler(pipe, backend: str) -> str:
    """Put fastdiff's scheduler of the same algorithm in ``pipe.scheduler``; keep diffusers' where there is none."""
    import fastdiff

    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None:
        return "none"
    name = type(scheduler).__name__
    if type(scheduler).__module__.startswith("fastdiff"):
        if hasattr(scheduler, "backend"):
            scheduler.backend = backend
        return f"fastdiff's {name}"
    target = getattr(fastdiff, FASTDIFF_SCHEDULERS.get(name, ""), None)
    if target is None:
        why = f"kept diffusers' {name} (fastdiff has no implementation of it)"
    elif not hasattr(target, "from_config"):
        why = f"kept diffusers' {name} (fastdiff's {target.__name__} lacks diffusers' scheduler protocol)"
    else:
        try:
            new = target.from_config(scheduler.config)
        except (TypeError, ValueError) as exc:
            why = f"kept diffusers' {name} (its config is not supported by fastdiff: {exc})"
        else:
            if hasattr(new, "backend"):
                new.backend = backend
            pipe.scheduler = new
            return f"fastdiff's {target.__name__}"
    log.info("fastdiff.accelerate: %s", why)
    return why


def _save_pretrained(self, *args, **kwargs):
    """diffusers' ``save_pretrained`` with fastdiff's scheduler saved as diffusers' class of the same algorithm and
    config (diffusers saves only its own scheduler classes), so the folder loads back with plain diffusers."""
    scheduler = getattr(self, "scheduler", None)
    save = type(self).save_pretrained.__get__(self, type(self))
    if scheduler is None or not type(scheduler).__module__.startswith("fastdiff"):
        return save(*args, **kwargs)
    import diffusers

    name = getattr(scheduler, "diffusers_class_name", type(scheduler).__name__)
    self.scheduler = getattr(diffusers, name).from_config(dict(scheduler.config))
    try:
        return save(*args, **kwargs)
    finally:
        self.scheduler = scheduler


_save_pretrained._fastdiff_patch = True


def _graph_forward(model, cuda_graphs) -> None:
    """Route ``model``'s forward through ``GraphedForward`` (once; accelerating again updates the setting)."""
    current = model.__dict__.get("forward")
    if isinstance(current, graphs.GraphedForward):
        current.enabled = cuda_graphs
        current.reset()
        return
    model.__dict__["forward"] = graphs.GraphedForward(model, model.forward, enabled=cuda_graphs)


def accelerate(pipe, *, backend: str = "auto", cuda_graphs: bool | None = None, dtype: torch.dtype | None = None):
    """Run ``pipe``'s UNet (and VAE) on fastdiff's ops and kernels, in place; returns ``pipe``.

    backend: "auto" (Triton on CUDA, the reference elsewhere), "triton" or "reference" (see ``fastdiff.ops``).
    cuda_graphs: None = on for CUDA inputs, True = the same but an error without CUDA, False = never.
    dtype: cast the pipeline to this dtype first (``pipe.to(dtype=...)``); None keeps it.

    DDPM/DDIM/DPM-Solver++ schedulers become fastdiff's (built ``from_config`` of the pipeline's); any other
    is kept and logged. Raises TypeError for a pipeline without a UNet2DModel/UNet2DConditionModel denoiser.
    """
    backend = ops.check_backend(backend)
    if cuda_graphs not in (None, True, False):
        raise TypeError(f"cuda_graphs must be None, True or False, got {cuda_graphs!r}")
    if cuda_graphs is True and not torch.cuda.is_available():
        raise ValueError("cuda_graphs=True needs a CUDA device; none is available (use None or False)")
    if dtype is not None and dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {[str(d) for d in _FLOAT_DTYPES]}, got {dtype!r}")
    unet = _denoiser(pipe)
    if dtype is not None:
        if callable(getattr(pipe, "to", None)):
            pipe.to(dtype=dtype)
        else:  # a plain object holding the components
            for model in (unet, getattr(pipe, "vae", None)):
                if isinstance(model, torch.nn.Module):
                    model.to(dtype=dtype)

    from diffusers import AutoencoderKL

    from .pipelines import ACCELERATED_CLASSES

    reports = [patch_model(unet, backend)]
    vae = getattr(pipe, "vae", None)
    if isinstance(vae, AutoencoderKL):
        reports.append(patch_model(vae, backend))
    elif vae is not None:
        log.info("fastdiff.accelerate: left the VAE %s as it is (only AutoencoderKL is patched)", type(vae).__name__)
    scheduler = _swap_scheduler(pipe, backend)
    _graph_forward(unet, cuda_graphs)
    if callable(getattr(type(pipe), "save_pretrained", None)):
        pipe.__dict__["save_pretrained"] = _save_pretrained.__get__(pipe, type(pipe))
    accelerated = ACCELERATED_CLASSES.get(type(pipe))
    if accelerated is not None:
        pipe.__class__ = accelerated
    pipe._fastdiff = AccelerationState(backend=backend, cuda_graphs=cuda_graphs, reports=reports, scheduler=scheduler)
    log.info("fastdiff.accelerate: %s", pipe._fastdiff.summary())
    return pipe
