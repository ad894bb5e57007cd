"""Conversion between fastdiff's UNet and diffusers' ``UNet2DModel``: configs and state dicts, both ways.

fastdiff names its modules as diffusers does, so today's diffusers keys map one to one. Older diffusers
checkpoints name the attention projections ``query``/``key``/``value``/``proj_attn``; they are renamed to
``to_q``/``to_k``/``to_v``/``to_out.0`` on the way in, as diffusers itself does when loading them.

diffusers is needed only by ``to_diffusers_model``; everything else works on plain dicts and tensors.
"""

from __future__ import annotations

import warnings

import torch

from .unet import DOWN_BLOCK_TYPES, UP_BLOCK_TYPES, UNet, UNetConfig

# UNet2DModel.__init__ defaults of diffusers 0.42.1: a config.json omits keys left at their default, so
# these (not UNetConfig's defaults) fill the gaps. tests/test_unet.py checks them against diffusers.
DIFFUSERS_DEFAULTS = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}

# Old attention parameter names -> today's (diffusers' _from_deprecated_attn_block conversion).
_DEPRECATED_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _block_type(name, allowed: tuple[str, str], what: str) -> bool:
    """True for the attention variant of ``allowed``; diffusers strips a "UNetRes" prefix first."""
    if isinstance(name, str) and name.startswith("UNetRes"):
        name = name[len("UNetRes"):]
    if name not in allowed:
        raise ValueError(f"unsupported diffusers {what} {name!r}; fastdiff supports {' and '.join(allowed)}")
    return name == allowed[1]


def config_from_diffusers(d: dict) -> UNetConfig:
    """UNetConfig from a diffusers UNet2DModel config dict; ValueError naming anything fastdiff cannot express."""
    if not isinstance(d, dict):
        raise ValueError(f"a diffusers config must be a dict, got {type(d).__name__}")
    if "_class_name" in d and d["_class_name"] != "UNet2DModel":
        raise ValueError(f"config is for diffusers {d['_class_name']!r}; fastdiff converts only UNet2DModel")
    unknown = sorted(k for k in d if not k.startswith("_") and k not in DIFFUSERS_DEFAULTS)
    if unknown:
        warnings.warn(f"ignoring diffusers config keys fastdiff does not know: {unknown}", stacklevel=3)
    c = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in d.items() if k in DIFFUSERS_DEFAULTS}}

    if c["time_embedding_type"] != "positional":
        raise ValueError(f"unsupported time_embedding_type {c['time_embedding_type']!r}; "
                         f"fastdiff supports 'positional'")
    if c["class_embed_type"] is not None or c["num_class_embeds"] is not None:
        raise ValueError("class-conditional UNet2DModel (class_embed_type / num_class_embeds) is not supported")
    if c["act_fn"] not in ("silu", "swish"):
        raise ValueError(f"unsupported act_fn {c['act_fn']!r}; fastdiff supports 'silu'")
    if c["mid_block_type"] not in ("UNetMidBlock2D", None):
        raise ValueError(f"unsupported mid_block_type {c['mid_block_type']!r}; fastdiff supports 'UNetMidBlock2D' "
                         f"or None")

    down, up, chans = list(c["down_block_types"]), list(c["up_block_types"]), list(c["block_out_channels"])
    if not (len(down) == len(up) == len(chans)):
        raise ValueError(f"diffusers config has {len(down)} down blocks, {len(up)} up blocks and "
                         f"{len(chans)} block_out_channels; they must match")
    attention = tuple(_block_type(b, DOWN_BLOCK_TYPES, "down block type") for b in down)
    # up_block_types run deepest first: up block j serves level L - 1 - j.
    up_attention = tuple(_block_type(b, UP_BLOCK_TYPES, "up block type") for b in reversed(up))
    # downsample_type / upsample_type only reach the attention blocks (DownBlock2D/UpBlock2D always use convs).
    levels = len(chans)
    if c["downsample_type"] not in (None, "conv") and any(attention[:-1]):
        raise ValueError(f"unsupported downsample_type {c['downsample_type']!r}; fastdiff supports 'conv'")
    if c["upsample_type"] not in (None, "conv") and any(up_attention[1:levels]):
        raise ValueError(f"unsupported upsample_type {c['upsample_type']!r}; fastdiff supports 'conv'")

    sample_size = c["sample_size"]
    if isinstance(sample_size, list):
        sample_size = tuple(sample_size)
    return UNetConfig(
        in_channels=c["in_channels"],
        out_channels=c["out_channels"],
        sample_size=sample_size,
        block_out_channels=tuple(chans),
        layers_per_block=c["layers_per_block"],
        attention_levels=attention,
        up_attention_levels=None if up_attention == attention else up_attention,
        mid_block=c["mid_block_type"] is not None,
        mid_attention=bool(c["add_attention"]),
        norm_num_groups=c["norm_num_groups"],
        attn_norm_num_groups=c["attn_norm_num_groups"],
        norm_eps=c["norm_eps"],
        attention_head_dim=c["attention_head_dim"],
        flip_sin_to_cos=c["flip_sin_to_cos"],
        freq_shift=c["freq_shift"],
        dropout=c["dropout"],
        downsample_padding=c["downsample_padding"],
        center_input_sample=c["center_input_sample"],
        time_embedding_dim=c["time_embedding_dim"],
        mid_block_scale_factor=c["mid_block_scale_factor"],
        resnet_time_scale_shift=c["resnet_time_scale_shift"],
    )


def config_to_diffusers(cfg: UNetConfig) -> dict:
    """The diffusers UNet2DModel config (JSON-safe) that builds the same network as ``cfg``."""
    size = cfg.sample_size
    return {
        "_class_name": "UNet2DModel",
        "sample_size": list(size) if isinstance(size, tuple) else size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "center_input_sample": cfg.center_input_sample,
        "time_embedding_type": "positional",
        "time_embedding_dim": cfg.time_embedding_dim,
        "freq_shift": cfg.freq_shift,
        "flip_sin_to_cos": cfg.flip_sin_to_cos,
        "down_block_types": [DOWN_BLOCK_TYPES[a] for a in cfg.attention_levels],
        "mid_block_type": "UNetMidBlock2D" if cfg.mid_block else None,
        "up_block_types": [UP_BLOCK_TYPES[a] for a in reversed(cfg.up_attention)],
        "block_out_channels": list(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block,
        "mid_block_scale_factor": cfg.mid_block_scale_factor,
        "downsample_padding": cfg.downsample_padding,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": cfg.dropout,
        "act_fn": "silu",
        "attention_head_dim": cfg.attention_head_dim,
        "norm_num_groups": cfg.norm_num_groups,
        "attn_norm_num_groups": cfg.attn_norm_num_groups,
        "norm_eps": cfg.norm_eps,
        "resnet_time_scale_shift": "default",
        "add_attention": cfg.mid_attention,
        "class_embed_type": None,
        "num_class_embeds": None,
    }


def state_dict_from_diffusers(sd: dict) -> dict:
    """diffusers UNet2DModel state dict -> fastdiff UNet state dict (same tensors; old attention names renamed)."""
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        # ...attentions.<i>.<old name>.<weight|bias>
        if len(parts) >= 4 and parts[-4] == "attentions" and parts[-2] in _DEPRECATED_ATTENTION_NAMES:
            key = ".".join(parts[:-2] + [_DEPRECATED_ATTENTION_NAMES[parts[-2]], parts[-1]])
        out[key] = value
    return out


def state_dict_to_diffusers(sd: dict) -> dict:
    """fastdiff UNet state dict -> diffusers UNet2DModel state dict (the names are the same)."""
    return dict(sd)


def unet_from_diffusers_model(model) -> UNet:
    """A fastdiff UNet equal to a diffusers UNet2DModel instance: same device and dtype, weights copied, eval mode."""
    if type(model).__name__ != "UNet2DModel" or not hasattr(model, "config") or not hasattr(model, "state_dict"):
        raise TypeError(f"expected a diffusers UNet2DModel or a directory path, got {type(model).__name__}")
    from .checkpoint import unet_from_state_dict

    config = config_from_diffusers(dict(model.config))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return unet_from_state_dict(config, state_dict_from_diffusers(state), source=f"diffusers {type(model).__name__}")


def to_diffusers_model(model: UNet):
    """A diffusers UNet2DModel with ``model``'s configuration and a copy of its weights (needs diffusers)."""
    from diffusers import UNet2DModel

    config = {k: v for k, v in model.config.to_diffusers_config().items() if not k.startswith("_")}
    with torch.device("meta"):
        out = UNet2DModel(**config)
    state = {k: v.detach().clone() for k, v in model.to_diffusers_state_dict().items()}
    out.load_state_dict(state, strict=True, assign=True)
    return out.eval()
