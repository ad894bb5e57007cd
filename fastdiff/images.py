"""Image input and output: tensors in [-1, 1] to PNG files, written atomically."""

from __future__ import annotations

import logging
import math
import os

import numpy as np
import torch
from PIL import Image

from .fileio import atomic_write

log = logging.getLogger("fastdiff.images")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] floats in [-1, 1] -> uint8 [N, H, W, C] (C = 1 squeezed later for greyscale)."""
    x = images.detach().float().cpu().clamp(-1, 1)
    x = ((x + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def _pil(image: np.ndarray) -> Image.Image:
    if image.shape[-1] == 1:
        return Image.fromarray(image[..., 0], mode="L")
    if image.shape[-1] in (3, 4):
        return Image.fromarray(image)
    raise ValueError(f"cannot write an image with {image.shape[-1]} channels as PNG (1, 3 or 4 only)")


def save_png_atomic(image: Image.Image, path: str) -> None:
    """Write ``image`` as a PNG through a temporary file in the same folder and an atomic rename."""
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def image_path(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, f"{index:06d}.png")


def save_images(images: torch.Tensor, out_dir: str, indices) -> list[str]:
    """One PNG per image, named by its global index."""
    paths = []
    for image, index in zip(to_uint8(images), indices):
        path = image_path(out_dir, int(index))
        save_png_atomic(_pil(image), path)
        paths.append(path)
    return paths


GRID_MIN_CELL = 64  # pixels: smaller images are enlarged (nearest neighbour) in the grid so people can see them


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> Image.Image:
    """uint8 [N, H, W, C] -> one grid picture, ``ncols`` wide (default: square); tiny images enlarged."""
    scale = max(1, GRID_MIN_CELL // max(images.shape[1:3]))
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.zeros((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, ncols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = image
    return _pil(grid)


def load_png_folder(out_dir: str, indices) -> np.ndarray:
    """The numbered PNGs of ``indices`` as uint8 [N, H, W, C]; ValueError naming a file that cannot be read."""
    pictures = []
    for i in indices:
        path = image_path(out_dir, int(i))
        try:
            with Image.open(path) as im:
                pictures.append(_as_hwc(np.asarray(im)))
        except (OSError, SyntaxError, ValueError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(f"cannot read {path} ({reason})") from None
    shapes = {p.shape for p in pictures}
    if len(shapes) > 1:
        raise ValueError(f"the images in {out_dir} differ in size or channels ({sorted(shapes)}); cannot make a grid")
    return np.stack(pictures)


def is_sample_png(path: str, shape) -> bool:
    """Whether ``path`` is a whole PNG of ``shape`` (C, H, W) as ``save_images`` writes it (chunk CRCs checked)."""
    channels, height, width = shape
    modes = {1: ("L",), 3: ("RGB",), 4: ("RGBA",)}.get(channels, ())
    try:
        with Image.open(path) as im:
            if im.format != "PNG" or im.size != (width, height) or im.mode not in modes:
                return False
            im.verify()
        return True
    except (OSError, SyntaxError, ValueError):
        return False


def _as_hwc(a: np.ndarray) -> np.ndarray:
    return a[..., None] if a.ndim == 2 else a


def load_image(path: str, channels: int, size: tuple[int, int], warn: bool = True) -> torch.Tensor:
    """Read an image file as a [1, C, H, W] float tensor in [-1, 1], resized to ``size`` (H, W).

    With ``warn``, a picture of another aspect ratio (stretched) or another channel count (converted) is
    logged as a warning rather than changed without a word.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"init image not found: {path}")
    target_mode = "L" if channels == 1 else "RGB"
    try:
        with Image.open(path) as im:
            width, height = im.size
            source_channels = 3 if im.mode == "P" else len(im.getbands())
            im = im.convert(target_mode)
            im = im.resize((size[1], size[0]), Image.BICUBIC)
            a = np.asarray(im, dtype=np.float32)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"cannot read init image {path}: {exc}") from None
    if warn and width * size[0] != height * size[1]:
        log.warning("init image %s is %dx%d, stretched to the model's %dx%d (another aspect ratio); "
                    "crop it first to keep its proportions", path, width, height, size[1], size[0])
    if warn and source_channels not in (channels, channels + 1):  # an alpha channel is simply dropped
        log.warning("init image %s has %d channels, converted to the model's %d (%s)", path, source_channels,
                    channels, "greyscale" if channels == 1 else "RGB")
    a = _as_hwc(a)
    if a.shape[-1] != channels:
        raise ValueError(f"init image {path} has {a.shape[-1]} channels, the model takes {channels}")
    return torch.from_numpy(a).permute(2, 0, 1)[None] / 127.5 - 1.0
