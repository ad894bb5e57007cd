"""Gaussian noise from ``torch.Generator`` objects, drawn exactly as diffusers' ``randn_tensor`` draws it.

The same generator (or list of generators) gives the same numbers as in a diffusers pipeline, so a fastdiff
scheduler inside a diffusers loop reproduces its images. fastdiff's own sampler does not use this: it draws
per-image Philox noise (``fastdiff/ops/noise.py``).
"""

from __future__ import annotations

import torch


def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None) -> torch.Tensor:
    """Standard normal noise of ``shape`` on ``device`` (default CPU), with diffusers' rules for ``generator``:

    * a generator on the CPU for a tensor elsewhere draws on the CPU, then moves the result;
      a generator on another accelerator than ``device`` is an error;
    * a list of generators draws sample ``i`` (a ``[1, *shape[1:]]`` slice) from ``generator[i]``;
      a list of one behaves like that generator alone;
    * ``None`` draws from torch's global generator of ``device``.
    """
    shape = tuple(shape)
    device = torch.device("cpu") if device is None else torch.device(device)
    layout = layout or torch.strided
    generators = list(generator) if isinstance(generator, (list, tuple)) else None
    if generators is not None:
        if not generators:
            raise ValueError("randn_tensor: the list of generators is empty")
        if len(generators) == 1:
            generator, generators = generators[0], None
    first = generators[0] if generators is not None else generator
    draw_device = device
    if first is not None and first.device.type != device.type:
        if first.device.type != "cpu":
            raise ValueError(f"Cannot generate a {device} tensor from a generator of type {first.device.type}.")
        draw_device = torch.device("cpu")
    if generators is None:
        return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype, layout=layout).to(device)
    batch = shape[0]
    if len(generators) < batch:
        raise ValueError(f"randn_tensor: {len(generators)} generators for a batch of {batch}; pass one per sample")
    one = (1,) + shape[1:]
    parts = [torch.randn(one, generator=generators[i], device=draw_device, dtype=dtype, layout=layout)
             for i in range(batch)]
    return torch.cat(parts, dim=0).to(device)
