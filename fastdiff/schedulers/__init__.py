"""DDPM, DDIM and multistep DPM-Solver(++) schedulers, diffusers-compatible, stepping through one fused update op.

``set_timesteps`` computes every coefficient on the host in float64 and stores device buffers
(``.timesteps``, ``.coeffs`` [steps, 11] in ``fastdiff.ops.STEP_COEFFS`` order, ``.noise_streams``);
``step`` is diffusers' (a timestep, ``torch.Generator`` noise, a ``SchedulerOutput``), ``step_at`` fastdiff's
capturable one (a step index, an int or a device tensor, and per-image Philox noise; no host sync).
The classes follow diffusers' scheduler protocol (``Cls(**kwargs)``, ``from_config``, ``.config``, ``len()``,
``order``, ``scale_model_input``, ``add_noise``, ``save_pretrained`` / ``from_pretrained``), see protocol.py.
"""

from __future__ import annotations

from .ddim import DDIMConfig, DDIMScheduler
from .ddpm import DDPMConfig, DDPMScheduler
from .dpm_solver import DPMSolverConfig, DPMSolverMultistepScheduler
from .protocol import SchedulerConfig, SchedulerOutput

__all__ = ["DDPMScheduler", "DDIMScheduler", "DDPMConfig", "DDIMConfig", "SchedulerConfig", "SchedulerOutput",
           "SCHEDULERS", "make_scheduler", "scheduler_from_diffusers_config"]
__all__ += ["DPMSolverMultistepScheduler", "DPMSolverConfig"]

SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}
SCHEDULERS["dpmsolver++"] = DPMSolverMultistepScheduler
_BY_DIFFUSERS_NAME = {cls.diffusers_class_name: cls for cls in SCHEDULERS.values()}


def make_scheduler(name: str, **config):
    """A scheduler by name ("ddpm" or "ddim") with constructor keyword arguments."""
    cls = SCHEDULERS.get(name)
    if cls is None:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    return cls(**config)


def scheduler_from_diffusers_config(config: dict, default: str = "ddpm", backend=None):
    """A scheduler from a diffusers config dict; the class comes from "_class_name", else ``default``."""
    name = config.get("_class_name")
    if name is None:
        cls = SCHEDULERS.get(default)
        if cls is None:
            raise ValueError(f"unknown scheduler {default!r}; choose one of {sorted(SCHEDULERS)}")
    else:
        cls = _BY_DIFFUSERS_NAME.get(name)
        if cls is None:
            raise ValueError(f"scheduler class {name!r} is not supported; supported: {sorted(_BY_DIFFUSERS_NAME)}")
    return cls.from_diffusers_config(config, backend=backend)
