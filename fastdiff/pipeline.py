"""From a path on disk (or nothing: the embedded default) to a ready ``Sampler``."""

from __future__ import annotations

import json
import logging
import os
from importlib import resources

import torch

from .sampling import Sampler

log = logging.getLogger("fastdiff.pipeline")

DEFAULT_STEPS = {"ddim": 50}  # DDPM defaults to every training timestep
DEFAULT_STEPS.update({"dpmsolver++": 15, "sde-dpmsolver++": 15})
# what a DPM-Solver scheduler takes from the model's training config: the noise schedule and the prediction type
# (sampling choices such as timestep_spacing keep DPM-Solver's own defaults)
_DPM_TRAINED_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                     "prediction_type", "rescale_betas_zero_snr")


def default_model_dir() -> str:
    return str(resources.files("fastdiff.data").joinpath("default_model"))


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def scheduler_config_for(model_dir: str) -> dict:
    """The scheduler settings a model was trained with, as a diffusers-style dict ({} if unknown).

    fastdiff checkpoints carry them under "scheduler" in config.json; a diffusers pipeline keeps them in
    scheduler/scheduler_config.json beside its unet/ folder.
    """
    config_path = os.path.join(model_dir, "config.json")
    if os.path.isfile(config_path):
        stored = _read_json(config_path).get("scheduler")
        if isinstance(stored, dict):
            return stored
    for candidate in (os.path.join(model_dir, "scheduler_config.json"),
                      os.path.join(os.path.dirname(os.path.abspath(model_dir)), "scheduler", "scheduler_config.json")):
        if os.path.isfile(candidate):
            return _read_json(candidate)
    return {}


def load_model(path: str | None, device="cpu", dtype=torch.float32):
    """(UNet, scheduler config dict, description). ``path=None`` means the embedded default model."""
    from .checkpoint import load_checkpoint

    if path is None:
        path = default_model_dir()
        if not os.path.isfile(os.path.join(path, "model.safetensors")):
            raise FileNotFoundError(f"the embedded default model is missing from the installation ({path})")
        description = "embedded default model (digits, trained by fastdiff train)"
    else:
        if not os.path.exists(path):
            raise FileNotFoundError(f"model path does not exist: {path}")
        description = path
    model = load_checkpoint(path, device=device, dtype=dtype)
    return model, scheduler_config_for(path), description


def make_scheduler_for(name: str, trained_config: dict, backend=None, **options):
    """A ``name`` ("ddpm", "ddim", "dpmsolver++" or "sde-dpmsolver++") scheduler with the noise schedule the model was
    trained with; ``options`` (DPM-Solver only): constructor settings such as solver_order, use_karras_sigmas."""
    from .schedulers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    if name in ("dpmsolver++", "sde-dpmsolver++"):
        trained = {k: v for k, v in trained_config.items() if k in _DPM_TRAINED_KEYS}
        return DPMSolverMultistepScheduler(**trained, **options, algorithm_type=name, backend=backend)
    if options:
        raise ValueError(f"{sorted(options)} apply to the DPM-Solver schedulers only, not {name!r}")
    cls = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}.get(name)
    if cls is None:
        raise ValueError(f"unknown scheduler {name!r}; choose ddpm or ddim")
    shared = {k: v for k, v in trained_config.items() if not k.startswith("_")}
    scheduler = cls.from_diffusers_config(shared)
    scheduler.backend = backend
    return scheduler


def build_sampler(model_path: str | None, scheduler: str = "ddim", device="cpu", dtype=torch.float32,
                  backend=None, cuda_graphs=None, scheduler_options: dict | None = None) -> tuple[Sampler, str]:
    model, trained_config, description = load_model(model_path, device=device, dtype=dtype)
    sched = make_scheduler_for(scheduler, trained_config, backend=backend, **(scheduler_options or {}))
    return Sampler(model, sched, device=device, dtype=dtype, backend=backend, cuda_graphs=cuda_graphs), description


def default_steps(scheduler_name: str, sampler: Sampler) -> int:
    return DEFAULT_STEPS.get(scheduler_name, sampler.scheduler.num_train_timesteps)
