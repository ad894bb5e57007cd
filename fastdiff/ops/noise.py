"""Counter-based Gaussian noise: the specification every backend reproduces.

Noise for image ``n`` is a pure function of ``(seed[n], stream, element index)``, so an image's noise
does not depend on the batch it is drawn in, on the block size of a kernel, or on the order of launches,
and it can be drawn inside a captured CUDA graph without any generator state.

Mapping (identical in ``kernels/update_step_kernels.py``):

* key ``(k0, k1) = (seed & 0xffffffff, seed >> 32)`` (seed taken as an unsigned 64-bit value);
* counter ``(c0, c1, c2, c3) = (e // 4, stream, 0, 0)`` where ``e`` is the element's logical NCHW index
  inside its image, so memory layout does not change the noise;
* Philox-4x32-10 (Salmon et al., 2011; same rounds and constants as ``triton.language.random``) gives
  four 32-bit words ``r0..r3``;
* uniforms ``u = ((r >> 8) + 0.5) * 2**-24`` lie strictly inside (0, 1), exact in float32;
* Box-Muller: ``rad = sqrt(-2 ln u0)``, ``n0 = rad cos(2 pi u1)``, ``n1 = rad sin(2 pi u1)``, and the same on
  ``(u2, u3)`` for ``n2, n3``; element ``e`` takes ``n[e % 4]``.

Streams: ``INITIAL_NOISE_STREAM`` (0) for the starting latent x_T (and the noise of image-to-image),
``step_stream(t) = t + 1`` for the update step that leaves timestep ``t``.
"""

from __future__ import annotations

import math

import torch

INITIAL_NOISE_STREAM = 0
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF


def step_stream(timestep: int) -> int:
    """Philox stream of the noise added by the update step that leaves ``timestep``."""
    return int(timestep) + 1


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # int64 products of two 32-bit values wrap modulo 2**64; the bit pattern is the unsigned product,
    # so masking recovers both halves exactly.
    prod = b * a
    return (prod >> 32) & _MASK32, prod & _MASK32


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = PHILOX_ROUNDS):
    """Philox-4x32 on int64 tensors holding unsigned 32-bit values (broadcasting)."""
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _MASK32
        k1 = (k1 + PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def _uniform(r: torch.Tensor) -> torch.Tensor:
    return ((r >> 8).to(torch.float32) + 0.5) * (2.0**-24)


def gaussian_noise_reference(
    seeds: torch.Tensor, stream, image_shape, *, dtype=torch.float32
) -> torch.Tensor:
    """Noise of shape ``[len(seeds), *image_shape]`` in NCHW order, drawn by the mapping above.

    ``seeds`` is an int64 tensor, one seed per image; ``stream`` an int or an integer tensor (a device
    scalar is fine: nothing is read back to the host).
    """
    if seeds.dim() != 1:
        raise ValueError(f"seeds must be a 1-D tensor of per-image seeds, got shape {tuple(seeds.shape)}")
    device = seeds.device
    numel = math.prod(image_shape)
    n_counters = (numel + 3) // 4
    seeds = seeds.to(torch.int64)
    k0 = (seeds & _MASK32).view(-1, 1)
    k1 = ((seeds >> 32) & _MASK32).view(-1, 1)
    c0 = torch.arange(n_counters, device=device, dtype=torch.int64).view(1, -1)
    if isinstance(stream, torch.Tensor):
        c1 = (stream.to(device=device, dtype=torch.int64) & _MASK32).reshape(1, 1)
    else:
        c1 = torch.full((1, 1), int(stream) & _MASK32, device=device, dtype=torch.int64)
    zero = torch.zeros((1, 1), device=device, dtype=torch.int64)
    r0, r1, r2, r3 = philox4x32(c0, c1, zero, zero, k0, k1)
    rad01 = torch.sqrt(-2.0 * torch.log(_uniform(r0)))
    rad23 = torch.sqrt(-2.0 * torch.log(_uniform(r2)))
    ang01 = (2.0 * math.pi) * _uniform(r1)
    ang23 = (2.0 * math.pi) * _uniform(r3)
    n = torch.stack(
        (rad01 * torch.cos(ang01), rad01 * torch.sin(ang01), rad23 * torch.cos(ang23), rad23 * torch.sin(ang23)),
        dim=-1,
    )
    n = n.reshape(seeds.shape[0], n_counters * 4)[:, :numel]
    return n.reshape(seeds.shape[0], *image_shape).to(dtype)
