"""Triton kernels of fastdiff (installed as ``fastdiff.kernels``).

Importing this package does not import Triton; each launcher imports its kernel module on first use.
Launchers validate their input and raise ``ValueError`` on what they cannot do; the ``*_problem``
predicates say, without launching (and without Triton), why an input is unsupported (None when it is supported).

* ``group_norm`` (kernels/group_norm_kernels.py): y = [silu](GroupNorm(x + add)), single-pass or split statistics.
* ``update_step`` and ``gaussian_noise`` (kernels/update_step_kernels.py): the fused DDPM/DDIM step with in-kernel
  Philox noise, and that noise on its own.
* ``dpm_solver_step`` (kernels/dpm_solver_kernels.py): the fused DPM-Solver multistep update (history in a ring of
  device buffers, in-kernel Philox noise for the SDE variants).
* ``kernels/compile_check.py``: compiles every variant for sm_80/sm_90 without a GPU and reports resources.
"""

from __future__ import annotations

import importlib

from ._common import dpm_solver_step_problem, group_norm_problem, update_step_problem

__all__ = ["group_norm_problem", "group_norm", "update_step_problem", "update_step", "gaussian_noise"]
__all__ += ["dpm_solver_step_problem", "dpm_solver_step"]


def _module(name: str):
    return importlib.import_module(f"{__name__}.{name}")


def group_norm(x, num_groups, weight, bias, eps=1e-5, *, add=None, silu=False, out=None, plan=None):
    """y = [silu](GroupNorm(x + add)); see ``kernels/group_norm_kernels.py``."""
    return _module("group_norm_kernels").group_norm(x, num_groups, weight, bias, eps, add=add, silu=silu, out=out, plan=plan)


def update_step(sample, model_output, coeffs, step_index, *, clip_range=None, noise=None, seeds=None,
                noise_streams=None, out=None):
    """Fused update step x_t -> x_{t-1}; see ``kernels/update_step_kernels.py``."""
    return _module("update_step_kernels").update_step(sample, model_output, coeffs, step_index, clip_range=clip_range,
                                              noise=noise, seeds=seeds, noise_streams=noise_streams, out=out)


def gaussian_noise(seeds, stream, image_shape, *, dtype=None, out=None):
    """Philox standard normal noise [len(seeds), *image_shape]; see ``kernels/update_step_kernels.py``."""
    import torch

    return _module("update_step_kernels").gaussian_noise(seeds, stream, image_shape,
                                                 dtype=torch.float32 if dtype is None else dtype, out=out)


def dpm_solver_step(sample, model_output, history, coeffs, step_index, *, noise=None, seeds=None, noise_streams=None,
                    out=None):
    """Fused DPM-Solver multistep update; see ``kernels/dpm_solver_kernels.py``."""
    return _module("dpm_solver_kernels").dpm_solver_step(sample, model_output, history, coeffs, step_index, noise=noise,
                                                         seeds=seeds, noise_streams=noise_streams, out=out)
