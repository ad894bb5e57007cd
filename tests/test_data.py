"""The digits data set (shapes, range, split) and the folder-of-images data set."""

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.data import (digits_split_indices, load_dataset, load_digits, load_image_folder,
                           upsample_digits)

pytest.importorskip("sklearn")


def test_digits_shapes_range_and_labels():
    train = load_digits("train", 16)
    held = load_digits("heldout", 16)
    assert train.images.shape == (1438, 1, 16, 16) and held.images.shape == (359, 1, 16, 16)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    for s in (train, held):
        assert s.images.min().item() == -1.0 and s.images.max().item() == 1.0
        assert torch.isfinite(s.images).all()
        counts = torch.bincount(s.labels, minlength=10)
        assert len(counts) == 10 and counts.min() > 0  # every class in both splits (stratified)
    # stratified: each class's held-out share is 20% to within rounding
    full = torch.bincount(load_digits("all", 8).labels, minlength=10)
    assert (torch.bincount(held.labels, minlength=10) - 0.2 * full).abs().max() <= 0.5


def test_digits_at_native_size_are_the_raw_grey_levels():
    from sklearn.datasets import load_digits as sk_digits

    raw = sk_digits().images
    x = load_digits("all", 8).images
    expected = torch.from_numpy(raw).float().unsqueeze(1) / 16 * 2 - 1
    assert torch.equal(x, expected)


@pytest.mark.parametrize("size", [16, 24, 32])
def test_digits_upsampled_sizes_keep_content(size):
    x = load_digits("heldout", size).images
    assert x.shape[-2:] == (size, size)
    # downsampling back to 8x8 recovers the original closely (bilinear up, area down)
    back = torch.nn.functional.interpolate(x, size=(8, 8), mode="area")
    ref = load_digits("heldout", 8).images
    assert (back - ref).abs().mean() < 0.15


def test_split_is_deterministic_disjoint_and_covering():
    a_train, a_held = digits_split_indices(seed=0)
    b_train, b_held = digits_split_indices(seed=0)
    assert np.array_equal(a_train, b_train) and np.array_equal(a_held, b_held)
    assert len(np.intersect1d(a_train, a_held)) == 0
    assert np.array_equal(np.sort(np.concatenate([a_train, a_held])), np.arange(1797))
    c_train, c_held = digits_split_indices(seed=1)
    assert not np.array_equal(a_held, c_held)
    # the split seed changes which images are held out, not how many
    assert len(c_held) == len(a_held)


def test_upsample_shape_and_range():
    raw = torch.randint(0, 17, (5, 8, 8)).float()
    y = upsample_digits(raw, 16)
    assert y.shape == (5, 1, 16, 16) and y.min() >= -1 and y.max() <= 1


@pytest.mark.parametrize("bad", [dict(split="test"), dict(image_size=2), dict(image_size=16.0),
                                 dict(heldout_fraction=1.0)])
def test_digits_bad_arguments(bad):
    with pytest.raises(ValueError):
        load_digits(**bad)


def _write(path, array, mode):
    Image.fromarray(array, mode=mode).save(path)


def test_folder_dataset(tmp_path):
    rng = np.random.default_rng()
    grey = rng.integers(0, 256, (20, 20), dtype=np.uint8)
    _write(tmp_path / "a.png", grey, "L")
    _write(tmp_path / "b.png", np.full((12, 30), 255, np.uint8), "L")  # non-square: centre crop
    _write(tmp_path / "c.png", np.zeros((16, 16), np.uint8), "L")
    (tmp_path / "notes.txt").write_text("not an image")
    s = load_image_folder(str(tmp_path), image_size=16)
    assert s.images.shape == (3, 1, 16, 16) and s.labels is None
    assert s.images.dtype == torch.float32
    assert torch.all(s.images[1] == 1.0) and torch.all(s.images[2] == -1.0)  # 255 -> 1, 0 -> -1
    assert s.images.min() >= -1 and s.images.max() <= 1
    # an image already at the target size is read exactly
    exact = load_image_folder(str(tmp_path), image_size=20).images[0, 0]
    assert torch.allclose(exact, torch.from_numpy(grey).float() / 255 * 2 - 1)


def test_folder_dataset_rgb_and_channel_choice(tmp_path):
    rng = np.random.default_rng()
    _write(tmp_path / "rgb.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB")
    _write(tmp_path / "grey.png", rng.integers(0, 256, (8, 8), dtype=np.uint8), "L")
    assert load_image_folder(str(tmp_path), 8).images.shape == (2, 3, 8, 8)  # any colour image -> RGB
    assert load_image_folder(str(tmp_path), 8, channels=1).images.shape == (2, 1, 8, 8)
    assert load_dataset(str(tmp_path), 8).images.shape == (2, 3, 8, 8)


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no image files"):
        load_image_folder(str(tmp_path), 16)
    with pytest.raises(FileNotFoundError):
        load_image_folder(str(tmp_path / "missing"), 16)
    with pytest.raises(FileNotFoundError, match="digits"):
        load_dataset(str(tmp_path / "missing"), 16)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read"):
        load_image_folder(str(tmp_path), 16, channels=1)


def test_sample_folder_grid_is_not_training_data(tmp_path):
    from fastdiff.images import make_grid, save_images, save_png_atomic, to_uint8

    images = torch.rand(3, 1, 8, 8) * 2 - 1
    save_images(images, str(tmp_path), range(3))
    save_png_atomic(make_grid(to_uint8(images)), str(tmp_path / "grid.png"))
    data = load_image_folder(str(tmp_path), 8)
    assert data.images.shape == (3, 1, 8, 8)
    # a user's own grid.png, in a folder that is not a sample folder, is data like any other image
    (tmp_path / "000000.png").rename(tmp_path / "a.png")
    (tmp_path / "000001.png").rename(tmp_path / "b.png")
    (tmp_path / "000002.png").rename(tmp_path / "c.png")
    assert load_image_folder(str(tmp_path), 8).images.shape == (4, 1, 8, 8)


def test_folder_with_a_file_that_is_not_an_image_names_it(tmp_path):
    from fastdiff.images import save_images

    save_images(torch.rand(2, 3, 8, 8) * 2 - 1, str(tmp_path), range(2))
    (tmp_path / "zz.png").write_text("notes, not a picture")
    for channels in (None, 3):  # the channel probe and the loader both name it
        with pytest.raises(ValueError, match=r"cannot read image '.*zz\.png'"):
            load_image_folder(str(tmp_path), 8, channels=channels)
