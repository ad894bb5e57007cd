"""Tiny checkpoints for CLI tests: a ~10k-parameter UNet that samples 8x8 images in milliseconds."""

import torch

from fastdiff.checkpoint import save_checkpoint
from fastdiff.unet import UNet, UNetConfig

TINY_SCHEDULER = {"num_train_timesteps": 100, "beta_schedule": "linear", "prediction_type": "epsilon"}


def tiny_unet(seed: int = 0, channels: int = 3, size: int = 8) -> UNet:
    """Random weights, the zero-initialised output layers perturbed so the images depend on the network."""
    torch.manual_seed(seed)
    config = UNetConfig.classic(n_channels=8, ch_mults=(1, 2), is_attn=(False, True), n_blocks=1,
                                image_channels=channels, image_size=size, norm_num_groups=4)
    model = UNet(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def save_tiny_checkpoint(directory, seed: int = 0, channels: int = 3, size: int = 8, model: UNet | None = None):
    save_checkpoint(model or tiny_unet(seed, channels, size), directory, extra_metadata={"scheduler": TINY_SCHEDULER})
    return directory
