"""Small helpers shared by the kernel launchers: layouts, dtypes, block sizes. No Triton import here."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT32_MAX = 2**31 - 1

# Memory layouts a kernel can address. "nchw": contiguous [N, C, *spatial] (any rank >= 2);
# "channels_last": a 4-D tensor stored as (n, h, w, c). A tensor that is both (size-1 dims) counts as nchw,
# as in fastdiff.ops.reference.
NCHW = "nchw"
CHANNELS_LAST = "channels_last"


def layout_of(t: torch.Tensor) -> str | None:
    """``"nchw"``, ``"channels_last"`` or None when the kernels cannot address ``t``'s memory."""
    if t.is_contiguous():
        return NCHW
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return CHANNELS_LAST
    return None


def memory_format(layout: str) -> torch.memory_format:
    return torch.channels_last if layout == CHANNELS_LAST else torch.contiguous_format


def dtype_problem(name: str, t: torch.Tensor) -> str | None:
    if t.dtype not in FLOAT_DTYPES:
        return f"{name} has dtype {t.dtype}; the Triton kernel takes float32, float16 or bfloat16"
    return None


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def prev_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n).bit_length() - 1)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def warps_for(elements: int, per_thread: int = 16, max_warps: int = 8) -> int:
    """Warps for a block of ``elements`` so each thread holds about ``per_thread`` values (power of 2)."""
    return max(1, min(max_warps, prev_pow2(max(1, elements // (32 * per_thread)))))


def check_out(out: torch.Tensor | None, shape, dtype, device, layout: str, what: str) -> None:
    """Validate a caller-supplied output buffer."""
    if out is None:
        return
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(f"{what}: out must be {tuple(shape)} {dtype} on {device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if layout_of(out) != layout:
        raise ValueError(f"{what}: out must have the {layout} layout of the input")


def group_norm_problem(x, weight, bias, add) -> str | None:
    """Why the group-norm kernels cannot take this input (None when they can)."""
    problem = dtype_problem("x", x)
    if problem:
        return problem
    if x.dim() < 2:
        return f"x must be [N, C, ...], got shape {tuple(x.shape)}"
    if layout_of(x) is None:
        return "x is neither NCHW-contiguous nor channels_last (4-D)"
    for name, t in (("weight", weight), ("bias", bias), ("add", add)):
        if t is None:
            continue
        problem = dtype_problem(name, t)
        if problem:
            return problem
        if t.device != x.device:
            return f"{name} is on {t.device}, x on {x.device}"
    if x.shape[0] and x[0].numel() > INT32_MAX:
        return "more than 2**31 - 1 elements per sample"
    return None


def update_step_problem(sample, model_output, noise) -> str | None:
    """Why the update-step kernel cannot take these tensors (None when it can)."""
    tensors = [("sample", sample), ("model_output", model_output)] + ([("noise", noise)] if noise is not None else [])
    for name, t in tensors:
        problem = dtype_problem(name, t)
        if problem:
            return problem
        if t.device != sample.device:
            return f"{name} is on {t.device}, sample on {sample.device}"
        if tuple(t.shape) != tuple(sample.shape):
            return f"{name} has shape {tuple(t.shape)}, sample {tuple(sample.shape)}"
    if sample.dim() < 2:
        return f"sample must be [N, ...] with at least 2 dims, got {tuple(sample.shape)}"
    layouts = {name: layout_of(t) for name, t in tensors}
    if layouts["sample"] is None:
        return "sample is neither NCHW-contiguous nor channels_last"
    for name, lay in layouts.items():
        if lay != layouts["sample"]:
            return f"{name} layout ({lay or 'strided'}) differs from sample layout ({layouts['sample']})"
    if sample.numel() and sample[0].numel() > INT32_MAX:
        return "more than 2**31 - 1 elements per image"
    return None


def dpm_solver_step_problem(sample, model_output, history, noise, threshold) -> str | None:
    """Why the DPM-Solver step kernel cannot take these tensors (None when it can)."""
    if threshold is not None:
        return "dynamic thresholding (a per-sample quantile) runs in the reference only"
    problem = update_step_problem(sample, model_output, noise)
    if problem:
        return problem
    if history.dtype != sample.dtype or history.device != sample.device:
        return f"history is {history.dtype} on {history.device}, sample {sample.dtype} on {sample.device}"
    if any(layout_of(history[k]) != layout_of(sample) for k in range(history.shape[0])):
        return "history slots must have the sample's layout"
    if history.shape[0] > 1 and history.stride(0) != sample.numel():
        return "history slots must be consecutive in memory"
    if history.numel() > INT32_MAX * 2:
        return "history too large"
    return None
