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


def make_scheduler_for(name: str, trained_config: dict, backend=None):
    """A ``name`` ("ddpm" or "ddim") scheduler with the noise schedule the model was trained with."""
    from .schedulers import DDIMScheduler, DDPMScheduler

    cls = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}.get(name)
    if cls is None:
        raise ValueError(f"unknown scheduler {name!r}; choose ddpm or ddim")
    shared = {k: v for k, v in trained_config.items() if not k.startswith("_")}
    scheduler = cls.from_diffusers_config(shared)
    scheduler.backend = backend
    return scheduler


def build_sampler(model_path: str | None, scheduler: str = "ddim", device="cpu", dtype=torch.float32,
                  backend=None, cuda_graphs=None) -> tuple[Sampler, str]:
    model, trained_config, description = load_model(model_path, device=device, dtype=dtype)
    sched = make_scheduler_for(scheduler, trained_config, backend=backend)
    return Sampler(model, sched, device=device, dtype=dtype, backend=backend, cuda_graphs=cuda_graphs), description


def default_steps(scheduler_name: str, sampler: Sampler) -> int:
    return DEFAULT_STEPS.get(scheduler_name, sampler.scheduler.num_train_timesteps)
