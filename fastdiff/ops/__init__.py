"""Every op the UNet and the samplers run, in one place.

Each op validates its input once, then runs either the Triton kernel (``kernels/``) or the reference
(``fastdiff/ops/reference.py``) as chosen by ``fastdiff.ops.backend.use_triton``.
"""

from __future__ import annotations

import torch

from . import reference
from .backend import BACKENDS, check_backend, fallback_counts, use_triton
from .noise import INITIAL_NOISE_STREAM, gaussian_noise_reference, step_stream
from .reference import N_STEP_COEFFS, STEP_COEFFS

__all__ = [
    "BACKENDS",
    "STEP_COEFFS",
    "N_STEP_COEFFS",
    "INITIAL_NOISE_STREAM",
    "step_stream",
    "check_backend",
    "fallback_counts",
    "group_norm",
    "update_step",
    "ddpm_step",
    "ddim_step",
    "gaussian_noise",
    "attention",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernels():
    from fastdiff import kernels  # imported lazily: Triton is optional at import time

    return kernels


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES and t.dtype != torch.float64:
        raise TypeError(f"{name} has dtype {t.dtype}; expected float32, float16 or bfloat16")


def _check_step_inputs(op: str, sample, model_output, coeffs, n_cols: int, noise, seeds, noise_streams) -> None:
    """The checks a sampler step (``update_step``, ``dpm_solver_step``) makes of its inputs, errors prefixed ``op``."""
    _check_float("sample", sample)
    _check_float("model_output", model_output)
    if model_output.shape != sample.shape:
        raise ValueError(f"{op}: model_output shape {tuple(model_output.shape)} != sample shape "
                         f"{tuple(sample.shape)}")
    if coeffs.dim() != 2 or coeffs.shape[1] != n_cols:
        raise ValueError(f"{op}: coeffs must be [steps, {n_cols}], got {tuple(coeffs.shape)}")
    if coeffs.device != sample.device:
        raise ValueError(f"{op}: coeffs on {coeffs.device}, sample on {sample.device}")
    if noise is not None and noise.shape != sample.shape:
        raise ValueError(f"{op}: noise shape {tuple(noise.shape)} != sample shape {tuple(sample.shape)}")
    if noise is None and seeds is not None:
        if seeds.dim() != 1 or seeds.shape[0] != sample.shape[0]:
            raise ValueError(f"{op}: need one seed per image ({sample.shape[0]}), got shape {tuple(seeds.shape)}")
        if noise_streams is None:
            raise ValueError(f"{op}: seeds given without noise_streams")


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, add=None, silu=False, backend=None):
    """``[silu](GroupNorm(x + add))``: GroupNorm over ``num_groups`` groups of x's channels.

    x: [N, C, *spatial] (NCHW contiguous or channels_last); weight, bias: [C] or None; add: [N, C] or
    [N, C, 1, 1], added to x before the statistics (a ResBlock's time embedding); statistics in float32.
    """
    _check_float("x", x)
    if x.dim() < 2:
        raise ValueError(f"group_norm expects x of shape [N, C, ...], got {tuple(x.shape)}")
    n, c = x.shape[:2]
    if not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if c % num_groups:
        raise ValueError(f"group_norm: {num_groups} groups do not divide {c} channels")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (c,):
            raise ValueError(f"group_norm: {name} has shape {tuple(p.shape)}, expected ({c},)")
    if add is not None:
        _check_float("add", add)
        if add.numel() != n * c or add.shape[:2] != (n, c):
            raise ValueError(f"group_norm: add has shape {tuple(add.shape)}, expected ({n}, {c}) or ({n}, {c}, 1, 1)")
        if add.device != x.device:
            raise ValueError(f"group_norm: add is on {add.device}, x on {x.device}")
    backend = check_backend(backend)
    if backend != "reference":
        problem = None
        if backend == "triton" or x.is_cuda:
            problem = _kernels().group_norm_problem(x, weight, bias, add)
        if use_triton("group_norm", backend, x, problem):
            return _kernels().group_norm(x, num_groups, weight, bias, eps, add=add, silu=silu)
    return reference.group_norm(x, num_groups, weight, bias, eps, add=add, silu=silu)


def update_step(sample, model_output, coeffs, step_index, *, clip_range=None, noise=None, seeds=None,
                noise_streams=None, backend=None, out=None):
    """One fused sampler update x_t -> x_{t-1} (see ``reference.STEP_COEFFS`` for the math).

    sample, model_output: [N, C, H, W] of one dtype and layout; coeffs: float32 [S, N_STEP_COEFFS] on the sample's
    device; step_index: int or integer device tensor; noise: a tensor like sample, or ``seeds`` (int64
    [N]) with ``noise_streams`` (int [S]) for in-kernel Philox noise, or neither (deterministic step).
    ``out``: where to write x_{t-1} (a tensor like sample; ``sample`` itself updates it in place).
    """
    _check_step_inputs("update step", sample, model_output, coeffs, N_STEP_COEFFS, noise, seeds, noise_streams)
    if out is not None and (out.shape != sample.shape or out.dtype != sample.dtype or out.device != sample.device):
        raise ValueError(f"update step: out must be like sample ({sample.dtype} {tuple(sample.shape)} on "
                         f"{sample.device}), got {out.dtype} {tuple(out.shape)} on {out.device}")
    backend = check_backend(backend)
    if backend != "reference":
        problem = None
        if backend == "triton" or sample.is_cuda:
            problem = _kernels().update_step_problem(sample, model_output, noise)
        if use_triton("update_step", backend, sample, problem):
            return _kernels().update_step(sample, model_output, coeffs, step_index, clip_range=clip_range,
                                          noise=noise, seeds=seeds, noise_streams=noise_streams, out=out)
    result = reference.update_step(sample, model_output, coeffs, step_index, clip_range=clip_range, noise=noise,
                                   seeds=seeds, noise_streams=noise_streams)
    return result if out is None else out.copy_(result)


def ddpm_step(sample, model_output, coeffs, step_index, **kwargs):
    """DDPM ancestral step (Ho et al., 2020, eq. 6-7): prev = c1 x0 + c2 x_t + sigma z, via ``update_step``.

    ``coeffs`` comes from ``DDPMScheduler`` (eps and prev_from_eps columns are zero).
    """
    return update_step(sample, model_output, coeffs, step_index, **kwargs)


def ddim_step(sample, model_output, coeffs, step_index, **kwargs):
    """DDIM step (Song et al., 2021, eq. 12): prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s z.

    ``coeffs`` comes from ``DDIMScheduler``; runs through ``update_step``.
    """
    return update_step(sample, model_output, coeffs, step_index, **kwargs)


def gaussian_noise(seeds, stream, image_shape, *, dtype=torch.float32, backend=None):
    """Standard normal noise [len(seeds), *image_shape], image n a function of (seeds[n], stream) only."""
    backend = check_backend(backend)
    if backend != "reference" and len(image_shape) == 3:
        if use_triton("gaussian_noise", backend, seeds, None):
            return _kernels().gaussian_noise(seeds, stream, tuple(image_shape), dtype=dtype)
    return gaussian_noise_reference(seeds, stream, tuple(image_shape), dtype=dtype)


def attention(q, k, v, backend=None):
    """softmax(q k^T / sqrt(d)) v over [batch, heads, tokens, head_dim]; see ``fastdiff.attention``."""
    from fastdiff.attention import attention as _attention

    return _attention(q, k, v, backend=backend)


# ------------------------------------------------------------------------------------------------------------
# DPM-Solver multistep update (fastdiff/ops/dpm_reference.py, kernels/dpm_solver_kernels.py)
# ------------------------------------------------------------------------------------------------------------

from . import dpm_reference  # noqa: E402
from .dpm_reference import DPM_COEFFS, N_DPM_COEFFS  # noqa: E402

__all__ += ["dpm_solver_step", "DPM_COEFFS", "N_DPM_COEFFS"]


def dpm_solver_step(sample, model_output, history, coeffs, step_index, *, threshold=None, noise=None, seeds=None,
                    noise_streams=None, backend=None):
    """One fused DPM-Solver multistep update (see ``dpm_reference`` for the math); writes this step's converted
    model output into ``history`` (a ring of K slots, [K, *sample.shape]) and returns x_{t-1}.

    coeffs: float32 [S, 10] (``DPM_COEFFS``) on the sample's device; step_index: int or integer device tensor;
    threshold: None or (ratio, max_value) (dynamic thresholding: reference only); noise: like sample, or ``seeds``
    (int64 [N]) with ``noise_streams`` (int [S]) for in-kernel Philox noise, or neither.
    """
    _check_step_inputs("dpm_solver_step", sample, model_output, coeffs, N_DPM_COEFFS, noise, seeds, noise_streams)
    if not isinstance(history, torch.Tensor) or history.dim() != sample.dim() + 1 \
            or tuple(history.shape[1:]) != tuple(sample.shape) or not 1 <= history.shape[0] <= dpm_reference.MAX_HISTORY:
        raise ValueError(f"dpm_solver_step: history must be [K, *sample.shape] with 1 <= K <= 3, got "
                         f"{tuple(getattr(history, 'shape', ()))} for sample {tuple(sample.shape)}")
    if history.dtype != sample.dtype or history.device != sample.device:
        raise ValueError(f"dpm_solver_step: history is {history.dtype} on {history.device}, sample {sample.dtype} "
                         f"on {sample.device}")
    backend = check_backend(backend)
    if backend != "reference":
        problem = None
        if backend == "triton" or sample.is_cuda:
            problem = _kernels().dpm_solver_step_problem(sample, model_output, history, noise, threshold)
        if use_triton("dpm_solver_step", backend, sample, problem):
            return _kernels().dpm_solver_step(sample, model_output, history, coeffs, step_index, noise=noise,
                                              seeds=seeds, noise_streams=noise_streams)
    return dpm_reference.dpm_solver_step(sample, model_output, history, coeffs, step_index, threshold=threshold,
                                         noise=noise, seeds=seeds, noise_streams=noise_streams)
