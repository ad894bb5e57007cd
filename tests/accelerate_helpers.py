"""Tiny random diffusers components for the ``fastdiff.accelerate`` tests (built here, no hub access)."""

from __future__ import annotations

import json
import os
import random
import string

import torch


def perturb_zero_parameters(model: torch.nn.Module, generator: torch.Generator, scale: float = 0.2) -> None:
    """Fill parameters that are exactly zero (zero-initialised output layers) with random values, so the
    network's output depends on every layer."""
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * scale)


def random_unet2d_config(i: int) -> dict:
    """A small random UNet2DModel config seeded by ``i``: levels, attention levels, head dims and groups vary."""
    rng = random.Random(7000 + i)
    levels = rng.randint(1, 3)
    groups = rng.choice([1, 2, 4, 8])
    base = max(groups, 4) * rng.choice([1, 2])
    chans = [base * rng.choice([1, 2]) for _ in range(levels)]
    attn = [rng.random() < 0.6 for _ in range(levels)]
    head_dim = rng.choice([None, groups if groups > 1 else 2, min(chans)])
    size = 2 ** (levels - 1) * rng.choice([2, 3])
    return dict(
        sample_size=size,
        in_channels=rng.choice([1, 3]),
        out_channels=None,  # set below to in_channels: a DDPM/DDIM pipeline denoises its own sample
        block_out_channels=chans,
        layers_per_block=rng.randint(1, 2),
        down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        mid_block_type="UNetMidBlock2D" if rng.random() < 0.8 else None,
        add_attention=rng.random() < 0.7,
        norm_num_groups=groups,
        attention_head_dim=head_dim,
        norm_eps=rng.choice([1e-5, 1e-6]),
        flip_sin_to_cos=rng.random() < 0.5,
        freq_shift=rng.choice([0, 1]),
    )


def tiny_unet2d(config: dict, seed: int):
    from diffusers import UNet2DModel

    config = dict(config)
    config["out_channels"] = config["in_channels"]
    torch.manual_seed(seed)
    unet = UNet2DModel(**config).eval()
    perturb_zero_parameters(unet, torch.Generator().manual_seed(seed))
    return unet


def write_clip_vocabulary(folder: str) -> tuple[str, str]:
    """A CLIP BPE vocabulary (lower-case letters, digits, punctuation, a few merges): vocab.json, merges.txt."""
    chars = list(string.ascii_lowercase + string.digits + ".,!?'-")
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    tokens += ["th", "the</w>", "in", "ing</w>", "at", "at</w>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    with open(vocab_path, "w") as f:
        json.dump(vocab, f)
    with open(merges_path, "w") as f:
        f.write("#version: 0.2\nt h\nth e</w>\ni n\nin g</w>\na t\na t</w>\n")
    return vocab_path, merges_path


def tiny_sd_components(folder: str, seed: int = 0, cross_attention_dim: int = 32, max_length: int = 12,
                       unet_in_channels: int = 4):
    """UNet2DConditionModel + AutoencoderKL (2 levels of 32/64 channels, 8 groups), CLIP text model and tokenizer.

    ``unet_in_channels``: 4 (text-to-image, img2img) or 9 (inpainting: latents, mask, masked-image latents)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=unet_in_channels, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8, cross_attention_dim=cross_attention_dim, attention_head_dim=(2, 4),
    ).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=16,
    ).eval()
    vocab, merges = write_clip_vocabulary(folder)
    tokenizer = CLIPTokenizer(vocab, merges, model_max_length=max_length)
    text_config = CLIPTextConfig(vocab_size=len(tokenizer.get_vocab()), hidden_size=cross_attention_dim,
                                 intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                 max_position_embeddings=max_length, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    text_encoder = CLIPTextModel(text_config).eval()
    for model in (unet, vae, text_encoder):
        perturb_zero_parameters(model, gen)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, image_encoder=None)


class HostReadGuard:
    """A TorchDispatchMode that fails on every aten op reading a device value back to the host (GUIDE.md):
    ``.item()``, ``bool(t)``, indexing with a 0-dim tensor, ``nonzero``, ``equal``. It sees the C++ path too."""

    FORBIDDEN = ("_local_scalar_dense", "is_nonzero", "nonzero", "equal", "item")

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        forbidden = self.FORBIDDEN

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if name in forbidden:
                    raise AssertionError(f"host read inside the step: aten.{name}")
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)
