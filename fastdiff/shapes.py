"""Every block's output shape for a UNet configuration, traced through the real model on the meta device.

The meta device carries shapes and dtypes but no data, so tracing a 512x512 model allocates nothing and
takes milliseconds. Meta tensors cannot run Triton, so tracing forces the reference backends.
"""

from __future__ import annotations

import torch

from .unet import Attention, Downsample, ResnetBlock, TimestepEmbedding, UNet, UNetConfig, Upsample

_TRACED = (TimestepEmbedding, ResnetBlock, Attention, Downsample, Upsample)
_TRACED_NAMES = ("conv_in", "conv_norm_out", "conv_out")


def _image_hw(config: UNetConfig, image_size) -> tuple[int, int]:
    size = config.sample_size if image_size is None else image_size
    if size is None:
        raise ValueError("the config has no sample_size; pass image_size")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    f = config.downsample_factor
    if h % f or w % f:
        raise ValueError(f"image size {h}x{w} is not a multiple of {f} "
                         f"(2 ** (levels - 1) for {config.num_levels} levels)")
    return h, w


def _meta_model(config: UNetConfig) -> UNet:
    with torch.device("meta"):
        model = UNet(config)
    return model.eval().set_backend("reference")


def trace_shapes(config: UNetConfig, batch_size: int = 1, image_size=None) -> list[tuple[str, tuple]]:
    """[(module name, output shape)] in execution order: time embedding, conv_in, every ResBlock, attention,
    downsample and upsample of the down, middle and up blocks, conv_norm_out, conv_out.

    ``image_size``: int or (height, width); defaults to ``config.sample_size``.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    h, w = _image_hw(config, image_size)
    model = _meta_model(config)
    rows: list[tuple[str, tuple]] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, _TRACED) or name in _TRACED_NAMES:
            handles.append(module.register_forward_hook(
                lambda mod, args, out, name=name: rows.append((name, tuple(out.shape)))))
    try:
        x = torch.empty(batch_size, config.in_channels, h, w, device="meta")
        with torch.no_grad():
            model(x, torch.empty(batch_size, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return rows


def flops_per_image(config: UNetConfig, image_size=None) -> int:
    """Floating-point operations of one forward pass for one image (a multiply-add counts 2), counted by
    ``torch.utils.flop_counter`` on the meta device (convolutions, linear layers and attention matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    h, w = _image_hw(config, image_size)
    model = _meta_model(config)
    x = torch.empty(1, config.in_channels, h, w, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, torch.empty(1, device="meta"))
    return counter.get_total_flops()


def format_shapes(rows: list[tuple[str, tuple]], config: UNetConfig | None = None) -> str:
    """A readable table of ``trace_shapes`` rows; with ``config``, each row's parameters and the totals."""
    params = {}
    if config is not None:
        model = _meta_model(config)
        modules = dict(model.named_modules())
        params = {name: sum(p.numel() for p in modules[name].parameters()) for name, _ in rows if name in modules}
    width = max([len("block")] + [len(name) for name, _ in rows])
    shape_width = max([len("output shape")] + [len(str(shape)) for _, shape in rows])
    header = f"{'block':<{width}}  {'output shape':<{shape_width}}" + ("  parameters" if params else "")
    lines = [header, "-" * len(header)]
    for name, shape in rows:
        line = f"{name:<{width}}  {str(shape):<{shape_width}}"
        if params:
            line += f"  {params.get(name, 0):>10,}"
        lines.append(line.rstrip())
    if config is not None:
        total = sum(p.numel() for p in model.parameters())
        lines.append("-" * len(header))
        lines.append(f"total parameters: {total:,} ({total / 1e6:.2f}M)")
        try:
            size = tuple(rows[-1][1][2:]) if rows else None  # conv_out: the traced image size
            flops = flops_per_image(config, image_size=size)
            lines.append(f"forward FLOPs per image: {flops / 1e9:,.2f} G (multiply-add = 2, attention included)")
        except Exception as exc:  # a counter problem must not hide the table
            lines.append(f"forward FLOPs per image: not counted ({type(exc).__name__})")
    return "\n".join(lines)
