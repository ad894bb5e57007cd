"""Plain PyTorch reference implementations: the specification of every op fastdiff runs.

Each function computes in float32 (float64 for float64 input: an upcast reference for tests) and
returns the input's dtype and memory format. Triton kernels in ``kernels/`` are tested against these functions, and the benchmarks
use them as the "torch eager" peer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .noise import gaussian_noise_reference

# Columns of an update-step coefficient table (one row per sampling step). With x = x_t,
# m = the model output and z = standard Gaussian noise, every DDPM and DDIM variant is
#   x0   = clip((x0_from_x * x + x0_from_m * m) * x0_scale)            (clip only if clip_range is set)
#   eps  = (eps_from_x * x + eps_from_m * m + eps_from_x0 * x0) * eps_scale
#   prev = prev_from_x0 * x0 + prev_from_eps * eps + prev_from_x * x + noise_std * z
# evaluated left to right, each product and sum rounded once. The scales keep diffusers' order of operations:
# x0 = (x - sqrt(1 - a) m) / sqrt(a) subtracts before it scales. Folding 1 / sqrt(a) into the first two
# columns instead (an affine form with coefficients ~2e4 at a = 2.4e-9) rounds the two terms before they
# cancel and loses four decimal digits at the noisiest step of a cosine schedule. A scale (1 / sqrt(a) rounded
# once from float64) costs one multiply where an IEEE division costs about ten instructions and registers;
# its extra half ulp is no more than diffusers' own rounding of sqrt(a) in float32.
STEP_COEFFS = (
    "x0_from_x",
    "x0_from_m",
    "x0_scale",
    "eps_from_x",
    "eps_from_m",
    "eps_from_x0",
    "eps_scale",
    "prev_from_x0",
    "prev_from_eps",
    "prev_from_x",
    "noise_std",
)
N_STEP_COEFFS = len(STEP_COEFFS)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """t in its compute dtype: float64 stays float64, everything else becomes float32."""
    return t if t.dtype == torch.float64 else t.float()


def group_norm(x, num_groups, weight, bias, eps=1e-5, *, add=None, silu=False):
    """y = [silu](GroupNorm(x + add)), statistics over each (sample, group) in float32."""
    n, c = x.shape[:2]
    h = _wide(x)
    if add is not None:
        h = h + _wide(add).reshape(n, c, *([1] * (x.dim() - 2)))
    y = F.group_norm(
        h,
        num_groups,
        None if weight is None else weight.to(h.dtype),
        None if bias is None else bias.to(h.dtype),
        eps,
    )
    if silu:
        y = F.silu(y)
    fmt = torch.channels_last if x.dim() == 4 and _is_channels_last(x) else torch.contiguous_format
    return y.to(x.dtype).contiguous(memory_format=fmt)


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _table_row(table: torch.Tensor, index) -> torch.Tensor:
    """table[index] for an int or an integer tensor index. A tensor index is gathered on the device:
    indexing with a 0-dim tensor would read it back to the host (a sync, and an error in CUDA-graph capture)."""
    if isinstance(index, torch.Tensor):
        return table.index_select(0, index.reshape(1))[0]
    return table[index]


def update_step(
    sample,
    model_output,
    coeffs,
    step_index,
    *,
    clip_range=None,
    noise=None,
    seeds=None,
    noise_streams=None,
):
    """One DDPM/DDIM update x_t -> x_{t-1} from row ``step_index`` of ``coeffs`` (see STEP_COEFFS).

    ``step_index`` may be a Python int or an integer device tensor (read on the device, never synced).
    Noise: ``noise`` if given, else Philox noise from ``seeds`` and ``noise_streams[step_index]``, else none.
    """
    x = _wide(sample)
    m = _wide(model_output)
    row = _table_row(coeffs, step_index).to(x.dtype)
    (x0_x, x0_m, x0_scale, eps_x, eps_m, eps_x0, eps_scale, prev_x0, prev_eps, prev_x, noise_std) = row.unbind(0)
    x0 = (x0_x * x + x0_m * m) * x0_scale
    if clip_range is not None:
        x0 = x0.clamp(-clip_range, clip_range)
    eps = (eps_x * x + eps_m * m + eps_x0 * x0) * eps_scale
    prev = prev_x0 * x0 + prev_eps * eps + prev_x * x
    if noise is None and seeds is not None:
        noise = gaussian_noise_reference(seeds, _table_row(noise_streams, step_index), sample.shape[1:],
                                         dtype=torch.float32)
    if noise is not None:
        prev = prev + noise_std * noise.to(x.dtype)
    fmt = torch.channels_last if _is_channels_last(sample) else torch.contiguous_format
    return prev.to(sample.dtype).contiguous(memory_format=fmt)


def attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v over [batch, heads, tokens, head_dim], computed in float32."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(_wide(q), _wide(k).transpose(-1, -2)) * scale
    return torch.matmul(scores.softmax(dim=-1), _wide(v)).to(q.dtype)
