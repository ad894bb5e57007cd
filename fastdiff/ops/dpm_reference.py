"""Reference (plain PyTorch) DPM-Solver multistep update: the specification ``kernels/dpm_solver_kernels.py`` meets.

One row of a DPM coefficient table (``DPM_COEFFS``, built by ``fastdiff.schedulers.DPMSolverMultistepScheduler``)
turns every variant of the multistep update (DPM-Solver / DPM-Solver++, ODE / SDE, order 1 to 3, midpoint / heun,
warm-up and final lower-order steps) into one linear map. With x = x_t, m = the model output, z = standard normal
noise and D_{-1}, D_{-2} the converted model outputs of the previous two steps (the history):

    x0   = x0_from_x * x + x0_from_m * m                 (then dynamic thresholding, when asked for)
    D    = d_from_x * x + d_from_m * m + d_from_x0 * x0   (D = x0 for DPM-Solver++, eps for DPM-Solver)
    prev = prev_from_x * x + prev_from_d0 * D + prev_from_d1 * D_{-1} + prev_from_d2 * D_{-2} + noise_std * z

The history is a ring of K = solver_order slots, ``history[k]`` shaped like the sample: step ``i`` reads
D_{-1} = history[(i - 1) % K] and D_{-2} = history[(i - 2) % K] and writes D to history[i % K]. A history term whose
coefficient is 0 is never used, so stale or uninitialised slots cannot leak into a lower-order step.
"""

from __future__ import annotations

import torch

from .noise import gaussian_noise_reference
from .reference import _is_channels_last, _table_row, _wide

DPM_COEFFS = (
    "x0_from_x",
    "x0_from_m",
    "d_from_x",
    "d_from_m",
    "d_from_x0",
    "prev_from_x",
    "prev_from_d0",
    "prev_from_d1",
    "prev_from_d2",
    "noise_std",
)
N_DPM_COEFFS = len(DPM_COEFFS)
MAX_HISTORY = 3


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Saharia et al., 2022, sec. 2.3): s = the ``ratio`` quantile of |x0| per sample,
    clamped to [1, max_value]; x0 is clipped to [-s, s] and divided by s. Computed in x0's dtype (float32/64)."""
    n = x0.shape[0]
    flat = x0.reshape(n, -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1.0, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape)


def history_slots(step_index, k: int, device) -> torch.Tensor:
    """Ring slots (i % K, (i - 1) % K, (i - 2) % K) of step i as an int64 tensor, computed on the device."""
    offsets = torch.tensor([0, -1, -2], dtype=torch.int64, device=device)
    if isinstance(step_index, torch.Tensor):
        return torch.remainder(step_index.reshape(1).to(device=device, dtype=torch.int64) + offsets, k)
    return torch.remainder(int(step_index) + offsets, k)


def dpm_solver_step(sample, model_output, history, coeffs, step_index, *, threshold=None, noise=None, seeds=None,
                    noise_streams=None):
    """One multistep DPM-Solver update from row ``step_index`` of ``coeffs`` (see the module docstring).

    Returns x_{t-1} in the sample's dtype and layout and writes D into ``history[step_index % K]`` (in place).
    ``threshold``: None or (ratio, max_value) for dynamic thresholding of x0. Noise: ``noise`` like sample,
    else Philox noise from ``seeds`` and ``noise_streams[step_index]``, else none.
    """
    x = _wide(sample)
    m = _wide(model_output)
    row = _table_row(coeffs, step_index).to(x.dtype)
    x0_x, x0_m, d_x, d_m, d_x0, p_x, p_d0, p_d1, p_d2, noise_std = row.unbind(0)
    x0 = x0_x * x + x0_m * m
    if threshold is not None:
        x0 = dynamic_threshold(x0, *threshold)
    d = d_x * x + d_m * m + d_x0 * x0
    slots = history_slots(step_index, history.shape[0], history.device)
    older = _wide(history.index_select(0, slots[1:]))  # D_{-1}, D_{-2} before this step's write
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    prev = p_x * x + p_d0 * d
    prev = prev + torch.where(p_d1 != 0, p_d1 * older[0], zero)
    prev = prev + torch.where(p_d2 != 0, p_d2 * older[1], zero)
    if noise is None and seeds is not None:
        noise = gaussian_noise_reference(seeds, _table_row(noise_streams, step_index), sample.shape[1:],
                                         dtype=torch.float32)
    if noise is not None:
        prev = prev + noise_std * noise.to(x.dtype)
    history.index_copy_(0, slots[:1], d.to(history.dtype).unsqueeze(0))
    fmt = torch.channels_last if _is_channels_last(sample) else torch.contiguous_format
    return prev.to(sample.dtype).contiguous(memory_format=fmt)
