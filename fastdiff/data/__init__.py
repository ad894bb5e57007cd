"""Training data for fastdiff, and the folder that holds the shipped weights.

Two data sets, both returned as float32 tensors [N, C, S, S] scaled to [-1, 1]:

* ``digits``: scikit-learn's ``load_digits`` (1797 greyscale 8x8 images, 17 grey levels 0..16), upsampled
  bilinearly to ``image_size`` (16 by default, up to 32), with a fixed stratified train / held-out split
  drawn from ``seed`` (the same seed always gives the same split).
* a folder of images (PNG, JPEG, BMP, WebP, ...) read with Pillow, centre-cropped to a square and resized.

This module also locates the files shipped next to it (``default_model/``, the digit classifier).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL_DIR = os.path.join(DATA_DIR, "default_model")

DIGITS_GREY_LEVELS = 16  # load_digits pixels are integers 0..16
DIGITS_NATIVE_SIZE = 8
DIGITS_HELDOUT_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
SAMPLE_NAME = re.compile(r"\d{6,}\.png")  # the numbered images fastdiff sample writes
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class ImageSet:
    """Images [N, C, S, S] float32 in [-1, 1]; labels int64 [N] or None (folders have no labels)."""

    images: torch.Tensor
    labels: torch.Tensor | None
    name: str

    def __len__(self) -> int:
        return self.images.shape[0]


def _check_size(image_size: int) -> None:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or not 4 <= image_size <= 1024:
        raise ValueError(f"image_size must be an int in [4, 1024], got {image_size!r}")


def digits_split_indices(seed: int = DIGITS_SPLIT_SEED, heldout_fraction: float = DIGITS_HELDOUT_FRACTION,
                         labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, held-out) indices into ``load_digits``: per class, a ``heldout_fraction`` share
    (rounded) chosen by a permutation seeded with ``seed``. The same seed always gives the same split."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must lie in (0, 1), got {heldout_fraction}")
    if labels is None:
        labels = _load_digits_raw()[1]
    rng = np.random.RandomState(seed)
    heldout = []
    for cls in range(10):
        idx = np.flatnonzero(labels == cls)
        n_held = int(round(heldout_fraction * len(idx)))
        heldout.append(rng.permutation(idx)[:n_held])
    heldout = np.sort(np.concatenate(heldout))
    train = np.setdiff1d(np.arange(len(labels)), heldout)
    return train, heldout


def _load_digits_raw() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # scikit-learn is the optional "train" extra
        raise ImportError("the digits data set needs scikit-learn: pip install 'fastdiff[train]'") from err
    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def upsample_digits(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Grey levels 0..16 at 8x8 [N, 8, 8] -> [N, 1, S, S] in [-1, 1] (bilinear, half-pixel centres)."""
    x = images.float().unsqueeze(1) / DIGITS_GREY_LEVELS * 2.0 - 1.0
    if image_size != x.shape[-1]:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x.clamp_(-1.0, 1.0).contiguous()


def load_digits(split: str = "train", image_size: int = 16, seed: int = DIGITS_SPLIT_SEED,
                heldout_fraction: float = DIGITS_HELDOUT_FRACTION) -> ImageSet:
    """The scikit-learn digits as [N, 1, image_size, image_size] in [-1, 1] with labels.

    split: "train" (80%, 1438 images with the defaults), "heldout" (20%, 359 images) or "all" (1797).
    """
    _check_size(image_size)
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    raw, labels = _load_digits_raw()
    if split != "all":
        train, heldout = digits_split_indices(seed, heldout_fraction, labels)
        idx = train if split == "train" else heldout
        raw, labels = raw[idx], labels[idx]
    images = upsample_digits(torch.from_numpy(raw), image_size)
    return ImageSet(images, torch.from_numpy(labels), f"digits-{split}")


def list_images(folder: str) -> list[str]:
    """Sorted paths of the image files directly inside ``folder`` (by extension).

    In a folder ``fastdiff sample`` wrote (numbered PNGs), its ``grid.png`` (a picture of all the others) is
    left out.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder {folder!r} does not exist")
    names = sorted(n for n in os.listdir(folder)
                   if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, n)))
    if "grid.png" in names and any(SAMPLE_NAME.fullmatch(n) for n in names):
        names.remove("grid.png")
    return [os.path.join(folder, n) for n in names]


def load_image(path: str, image_size: int, channels: int) -> torch.Tensor:
    """One image file -> [channels, S, S] in [-1, 1]: centre-cropped to a square, resized (bicubic)."""
    from PIL import Image

    mode = {1: "L", 3: "RGB"}[channels]
    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            w, h = im.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            im = im.crop((left, top, left + side, top + side))
            if side != image_size:
                im = im.resize((image_size, image_size), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.float32)
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read image {path!r}: {str(err).splitlines()[0] if str(err) else err!r}") from None
    x = torch.from_numpy(arr.copy()) / 255.0 * 2.0 - 1.0
    return x.unsqueeze(0) if channels == 1 else x.permute(2, 0, 1).contiguous()


def load_image_folder(folder: str, image_size: int = 32, channels: int | None = None) -> ImageSet:
    """Every image directly inside ``folder`` as [N, C, S, S] in [-1, 1] (labels None).

    channels: 1 (greyscale) or 3 (RGB); None picks 1 when every image is greyscale, else 3.
    """
    _check_size(image_size)
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    paths = list_images(folder)
    if not paths:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {folder!r}")
    if channels is None:
        from PIL import Image

        grey = True
        for p in paths:
            try:
                with Image.open(p) as im:
                    grey &= im.mode in ("1", "L", "I", "I;16", "F")
            except (OSError, SyntaxError, ValueError) as err:
                reason = str(err).splitlines()[0] if str(err) else repr(err)
                raise ValueError(f"cannot read image {p!r}: {reason}") from None
        channels = 1 if grey else 3
    images = torch.stack([load_image(p, image_size, channels) for p in paths])
    return ImageSet(images, None, f"folder:{os.path.basename(os.path.normpath(folder))}")


def load_dataset(data: str, image_size: int, split: str = "train", seed: int = DIGITS_SPLIT_SEED,
                 channels: int | None = None) -> ImageSet:
    """``"digits"`` (the given split) or a path to a folder of images (all of them)."""
    if data == "digits":
        return load_digits(split, image_size, seed)
    if not os.path.isdir(data):
        raise FileNotFoundError(f"--data must be 'digits' or an existing folder of images, got {data!r}")
    return load_image_folder(data, image_size, channels)
