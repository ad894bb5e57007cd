"""The UNet: diffusers' ``UNet2DModel`` (positional time embedding, ``DownBlock2D``/``AttnDownBlock2D`` and
``UpBlock2D``/``AttnUpBlock2D`` levels, ``UNetMidBlock2D``) computed through ``fastdiff.ops``.

Module and parameter names mirror diffusers (``down_blocks.1.attentions.0.to_q.weight``), so a diffusers
state dict loads as it is (see ``fastdiff/diffusers_compat.py``). Every GroupNorm runs ``ops.group_norm``
(the ResBlock's second norm fuses the time-embedding add and the SiLU) and every attention core runs
``ops.attention``; ``UNet.set_backend`` picks the implementation per model.

Structure (L levels, ``c[i] = block_out_channels[i]``)::

    t -> sinusoidal(c[0]) -> Linear -> SiLU -> Linear = emb          x -> conv_in (3x3) -> h
    down level i:  layers_per_block x (ResBlock [+ Attention]),  then a stride-2 conv (not the last level)
    mid:           ResBlock, [Attention], ResBlock
    up level i:    (layers_per_block + 1) x (concat skip, ResBlock [+ Attention]), then nearest x2 + conv
    out:           GroupNorm + SiLU -> conv_out (3x3)
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops

# diffusers block names for a level without / with attention.
DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class UNetConfig:
    """Hyperparameters of a UNet; the defaults are the DDPM CIFAR-10 model (Ho et al., 2020), 35.7M parameters.

    Field names follow diffusers' ``UNet2DModel``; ``attention_levels`` replaces its block-type lists.
    """

    in_channels: int = 3  # channels of the input image
    out_channels: int = 3  # channels of the prediction
    sample_size: int | tuple[int, int] | None = 32  # training image size (int or (height, width)); metadata only
    block_out_channels: tuple[int, ...] = (128, 256, 256, 256)  # channels of each level, shallowest first
    layers_per_block: int = 2  # ResBlocks per down level (an up level has one more)
    attention_levels: tuple[bool, ...] = (False, True, False, False)  # self-attention after each ResBlock of level i
    up_attention_levels: tuple[bool, ...] | None = None  # attention of the up path per level; None = attention_levels
    mid_block: bool = True  # the middle ResBlock-Attention-ResBlock (diffusers' mid_block_type None turns it off)
    mid_attention: bool = True  # attention in the middle block (diffusers' add_attention)
    norm_num_groups: int = 32  # GroupNorm groups everywhere; must divide every channel count
    attn_norm_num_groups: int | None = None  # groups of the middle attention's norm; None = norm_num_groups
    norm_eps: float = 1e-6  # GroupNorm epsilon (diffusers' default is 1e-5; DDPM checkpoints use 1e-6)
    attention_head_dim: int | None = None  # channels per head; None = one head over all channels of the block
    flip_sin_to_cos: bool = False  # time embedding order: cos, sin (True) or sin, cos (False)
    freq_shift: float = 1  # frequencies exp(-ln(10000) * k / (half - freq_shift)), k < half = c[0] // 2
    dropout: float = 0.0  # dropout inside each ResBlock (active in train() mode only)
    downsample_padding: int = 0  # padding of the stride-2 conv; 0 pads one row and column at the bottom right
    center_input_sample: bool = False  # feed 2 * x - 1 instead of x
    time_embedding_dim: int | None = None  # width of the time-embedding MLP; None = 4 * block_out_channels[0]
    mid_block_scale_factor: float = 1.0  # the middle block's ResBlocks and attention divide their output by this
    resnet_time_scale_shift: str = "default"  # only "default" (time embedding added before norm2) is supported

    def __post_init__(self):
        # JSON gives lists: store tuples so configs compare and hash by value.
        for name in ("block_out_channels", "attention_levels", "up_attention_levels", "sample_size"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self.validate()

    # ------------------------------------------------------------------ derived values
    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def up_attention(self) -> tuple[bool, ...]:
        """Attention of the up path per level (index = level, shallowest first)."""
        return self.attention_levels if self.up_attention_levels is None else self.up_attention_levels

    @property
    def downsample_factor(self) -> int:
        """Height and width of an input must be multiples of this."""
        return 2 ** (self.num_levels - 1)

    def attention_heads(self, channels: int) -> tuple[int, int]:
        """(heads, head_dim) of an attention block over ``channels`` channels, as diffusers computes them."""
        head_dim = channels if self.attention_head_dim is None else self.attention_head_dim
        return channels // head_dim, head_dim

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError naming the first field that cannot build a UNet."""
        for name in ("in_channels", "out_channels", "layers_per_block", "norm_num_groups"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"UNetConfig.{name} must be a positive int, got {v!r}")
        chans = self.block_out_channels
        if not isinstance(chans, tuple) or len(chans) == 0:
            raise ValueError(f"UNetConfig.block_out_channels must be a non-empty tuple of ints, got {chans!r}")
        if not all(_is_int(c) and c >= 1 for c in chans):
            raise ValueError(f"UNetConfig.block_out_channels must hold positive ints, got {chans!r}")
        for name in ("attention_levels", "up_attention_levels"):
            levels = getattr(self, name)
            if levels is None and name == "up_attention_levels":
                continue
            if not isinstance(levels, tuple) or not all(isinstance(a, bool) for a in levels):
                raise ValueError(f"UNetConfig.{name} must be a tuple of bools, got {levels!r}")
            if len(levels) != len(chans):
                raise ValueError(f"UNetConfig.{name} has {len(levels)} entries for {len(chans)} levels "
                                 f"(block_out_channels={chans})")
        for name in ("mid_block", "mid_attention", "flip_sin_to_cos", "center_input_sample"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"UNetConfig.{name} must be a bool, got {getattr(self, name)!r}")
        g = self.norm_num_groups
        for c in sorted(set(chans)):
            if c % g:
                raise ValueError(f"UNetConfig.norm_num_groups={g} does not divide {c} channels "
                                 f"(block_out_channels={chans})")
        if self.attn_norm_num_groups is not None:
            ga = self.attn_norm_num_groups
            if not _is_int(ga) or ga < 1:
                raise ValueError(f"UNetConfig.attn_norm_num_groups must be a positive int or None, got {ga!r}")
            if self.mid_block and self.mid_attention and chans[-1] % ga:
                raise ValueError(f"UNetConfig.attn_norm_num_groups={ga} does not divide the middle block's "
                                 f"{chans[-1]} channels")
        if not _is_number(self.norm_eps) or not self.norm_eps > 0:
            raise ValueError(f"UNetConfig.norm_eps must be a positive number, got {self.norm_eps!r}")
        d = self.attention_head_dim
        if d is not None:
            if not _is_int(d) or d < 1:
                raise ValueError(f"UNetConfig.attention_head_dim must be a positive int or None, got {d!r}")
            attended = [c for c, a, u in zip(chans, self.attention_levels, self.up_attention) if a or u]
            if self.mid_block and self.mid_attention:
                attended.append(chans[-1])
            if attended and d > min(attended):
                raise ValueError(f"UNetConfig.attention_head_dim={d} exceeds the {min(attended)} channels of an "
                                 f"attention block (no head would fit)")
        half = chans[0] // 2
        if not _is_number(self.freq_shift):
            raise ValueError(f"UNetConfig.freq_shift must be a number, got {self.freq_shift!r}")
        if half < 1 or half == self.freq_shift:
            raise ValueError(f"UNetConfig: the time embedding needs block_out_channels[0] // 2 ({half}) >= 1 and "
                             f"different from freq_shift ({self.freq_shift})")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not _is_int(self.downsample_padding) or self.downsample_padding < 0:
            raise ValueError(f"UNetConfig.downsample_padding must be an int >= 0, got {self.downsample_padding!r}")
        ted = self.time_embedding_dim
        if ted is not None and (not _is_int(ted) or ted < 1):
            raise ValueError(f"UNetConfig.time_embedding_dim must be a positive int or None, got {ted!r}")
        if not _is_number(self.mid_block_scale_factor) or self.mid_block_scale_factor == 0:
            raise ValueError(f"UNetConfig.mid_block_scale_factor must be a non-zero number, "
                             f"got {self.mid_block_scale_factor!r}")
        if self.resnet_time_scale_shift != "default":
            raise ValueError(f"UNetConfig.resnet_time_scale_shift={self.resnet_time_scale_shift!r} is not supported; "
                             f"only 'default' (time embedding added before the second GroupNorm)")
        size = self.sample_size
        if size is not None:
            sizes = (size, size) if _is_int(size) else size
            if not (isinstance(sizes, tuple) and len(sizes) == 2 and all(_is_int(s) and s >= 1 for s in sizes)):
                raise ValueError(f"UNetConfig.sample_size must be a positive int, a (height, width) pair or None, "
                                 f"got {size!r}")
            if any(s % self.downsample_factor for s in sizes):
                raise ValueError(f"UNetConfig.sample_size={size} is not a multiple of {self.downsample_factor} "
                                 f"(2 ** (levels - 1) for {self.num_levels} levels)")

    # ------------------------------------------------------------------ constructors and serialisation
    @classmethod
    def classic(cls, n_channels: int = 64, ch_mults=(1, 2, 2, 4), is_attn=(False, False, True, True),
                n_blocks: int = 2, image_channels: int = 3, image_size: int = 32, **overrides) -> "UNetConfig":
        """The classic (n_channels, ch_mults, is_attn, n_blocks) parameterisation: level i has
        ``ch_mults[i] * n_channels`` channels (not compounded) and attention where ``is_attn[i]``."""
        if not _is_int(n_channels) or n_channels < 1:
            raise ValueError(f"n_channels must be a positive int, got {n_channels!r}")
        fields = dict(
            in_channels=image_channels,
            out_channels=image_channels,
            sample_size=image_size,
            block_out_channels=tuple(int(m) * n_channels for m in ch_mults),
            layers_per_block=n_blocks,
            attention_levels=tuple(bool(a) for a in is_attn),
        )
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"UNetConfig.classic: unknown fields {sorted(unknown)}")
        fields.update(overrides)
        return cls(**fields)

    def to_dict(self) -> dict:
        """JSON-safe dict (tuples become lists)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        """Inverse of ``to_dict``; missing fields take their defaults, unknown fields are an error."""
        if not isinstance(d, dict):
            raise ValueError(f"a UNet config must be a JSON object, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown UNetConfig fields: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_diffusers_config(cls, d: dict) -> "UNetConfig":
        """From a diffusers ``UNet2DModel`` config (its config.json as a dict); diffusers' defaults fill gaps."""
        from .diffusers_compat import config_from_diffusers

        return config_from_diffusers(d)

    def to_diffusers_config(self) -> dict:
        """The diffusers ``UNet2DModel`` config building the same network (``UNet2DModel.from_config(...)``)."""
        from .diffusers_compat import config_to_diffusers

        return config_to_diffusers(self)


# ---------------------------------------------------------------------------------------------- stacked parameters
def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class StackedParameters:
    """Parameters of several modules (equal shapes but for dim 0) stored back to back in one tensor, so one
    kernel (a GEMM) reads them all while every module keeps its own ``nn.Parameter`` and state-dict key.

    The parameters ARE views of the stack (``stack[o:o + rows]``), never copies made once: a change made in
    place to one of them (an optimizer step, a LoRA merge, ``load_state_dict``) is in the stack at once, and
    in every CUDA graph that reads it. Replacing a parameter's tensor (``.to()``, ``load_state_dict(assign=
    True)``, ``deepcopy``, ``p.data = t``) breaks the sharing: ``tie()`` restores it (the UNet calls it after
    each of those), and until then ``tensor()`` concatenates the parameters afresh on every call, so a stale
    stack is never read.
    """

    def __init__(self, members: list[tuple[nn.Module, str]]):
        self.members = members  # (module, parameter name), in stacking order
        self.stack: torch.Tensor | None = None
        self._addresses: list[int] = []  # data_ptr of each parameter when tied
        self.tie()

    def parameters(self) -> list[nn.Parameter]:
        return [module._parameters[name] for module, name in self.members]  # (nn.Module.__getattr__ is slow)

    def is_tied(self, params: list | None = None) -> bool:
        """Whether every parameter still sits at its place in ``self.stack`` (host metadata only, cheap enough for
        every forward). While the stack lives its memory cannot be handed to another tensor, so an address match
        means a view of it."""
        params = self.parameters() if params is None else params
        return self.stack is not None and [p.data_ptr() for p in params] == self._addresses

    def tie(self) -> None:
        """Make the parameters views of one stack again (copying their current values) unless they are."""
        if self.is_tied():
            return
        params = self.parameters()
        stack = _consecutive_span(params)  # already back to back (share_memory_(), a stacked source): adopt it
        if stack is None:
            with torch.no_grad():
                stack = torch.cat([p.detach() for p in params])
            offset = 0
            for p in params:  # .data keeps each Parameter object (optimizers and hooks hold them)
                p.data = stack[offset:offset + p.shape[0]]
                offset += p.shape[0]
        self.stack = stack
        self._addresses = [p.data_ptr() for p in params]

    def tensor(self) -> torch.Tensor:
        """The stacked parameters for a forward pass: the shared stack itself when no gradient is needed and
        the views are intact, else a concatenation (differentiable, and always current)."""
        params = self.parameters()
        if torch.compiler.is_compiling():  # traced code reads the parameters; the compiler fuses the copy
            return torch.cat(params)
        if (torch.is_grad_enabled() and any(p.requires_grad for p in params)) or not self.is_tied(params):
            return torch.cat(params)
        return self.stack


def _consecutive_span(params: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensor made of ``params`` if they already lie back to back, in order, in one storage; else None."""
    first = params[0]
    if first.device.type == "meta":
        return None
    storage, offset, rest = first.untyped_storage().data_ptr(), first.storage_offset(), first.shape[1:]
    for p in params:
        if (p.dtype != first.dtype or p.device != first.device or p.shape[1:] != rest or not p.is_contiguous()
                or p.untyped_storage().data_ptr() != storage or p.storage_offset() != offset):
            return None
        offset += p.numel()
    rows = sum(p.shape[0] for p in params)
    strides = tuple(math.prod(rest[i + 1:]) for i in range(len(rest)))
    return first.detach().as_strided((rows, *rest), (math.prod(rest), *strides), first.storage_offset())


def stacked_parameter_groups(module: nn.Module) -> list[StackedParameters]:
    """Every ``StackedParameters`` held by ``module`` or its submodules."""
    return [v for m in module.modules() for v in vars(m).values() if isinstance(v, StackedParameters)]


# ---------------------------------------------------------------------------------------------- blocks
class GroupNorm(nn.Module):
    """``[silu](GroupNorm(x + add))`` through ``fastdiff.ops.group_norm``; parameters named like nn.GroupNorm."""

    def __init__(self, num_groups: int, num_channels: int, eps: float):
        super().__init__()
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.backend: str | None = None  # op backend; None = FASTDIFF_BACKEND (see UNet.set_backend)

    def forward(self, x, add=None, silu=False):
        return ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, add=add, silu=silu,
                              backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}"


class ResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D ("default" time embedding): with e = silu(emb),

    out = (shortcut(x) + conv2(dropout(silu(norm2(conv1(silu(norm1(x))) + time_emb_proj(e)))))) / output_scale

    ``forward(x, temb)`` takes ``temb = time_emb_proj(e)`` already computed: the UNet projects e for every
    ResBlock in one GEMM (``UNet.time_projections``); ``self.time_emb_proj`` holds this block's weights.
    """

    def __init__(self, in_channels, out_channels, temb_channels, groups, eps, dropout, output_scale_factor=1.0):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = GroupNorm(groups, out_channels, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.output_scale_factor = output_scale_factor
        self.temb_index: int | None = None  # this block's entry in UNet.time_projections (set by the UNet)

    def forward(self, x, temb):
        h = self.norm1(x, silu=True)
        h = self.conv1(h)
        h = self.norm2(h, add=temb, silu=True)  # fused: silu(GroupNorm(h + temb)); temb may be a strided slice
        h = self.dropout(h)
        h = self.conv2(h)
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = skip + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Attention(nn.Module):
    """diffusers' spatial self-attention block (``Attention`` with a group norm and a residual):

    out = (x + to_out(MHA(to_q(n), to_k(n), to_v(n)))) / rescale,  n = GroupNorm(x) over the H*W tokens.
    """

    def __init__(self, channels, heads, head_dim, groups, eps, rescale_output_factor=1.0):
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        inner = heads * head_dim  # diffusers: equals channels when head_dim divides it
        self.group_norm = GroupNorm(groups, channels, eps)
        self.to_q = nn.Linear(channels, inner)
        self.to_k = nn.Linear(channels, inner)
        self.to_v = nn.Linear(channels, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, channels)])  # ModuleList keeps diffusers' "to_out.0" name
        self.rescale_output_factor = rescale_output_factor
        self.attention_backend: str | None = None  # ops.attention backend; None = its default
        # to_q, to_k and to_v as views of one [3 * inner, channels] weight (and bias): one GEMM projects all three
        self.qkv_weight = StackedParameters([(self.to_q, "weight"), (self.to_k, "weight"), (self.to_v, "weight")])
        self.qkv_bias = StackedParameters([(self.to_q, "bias"), (self.to_k, "bias"), (self.to_v, "bias")])

    def forward(self, x):
        n, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # [n, h*w, c] (contiguous for channels_last x)
        # one GEMM with its bias fused: [n*h*w, c] (a view for channels_last x or a batch of 1) -> [n*h*w, 3 * inner]
        qkv = F.linear(tokens.reshape(n * h * w, c), self.qkv_weight.tensor(), self.qkv_bias.tensor())
        # -> three [n, heads, h*w, head_dim] views
        q, k, v = qkv.view(n, h * w, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        a = ops.attention(q, k, v, backend=self.attention_backend)
        a = a.transpose(1, 2).reshape(n, h * w, self.heads * self.head_dim)
        y = self.to_out[0](a).transpose(1, 2).reshape(n, c, h, w)
        out = x + y  # x first: the sum keeps x's memory format
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out


class Downsample(nn.Module):
    """Stride-2 3x3 conv; with padding 0 the input is first padded by one row and column at the bottom right."""

    def __init__(self, channels, padding):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        if x.numel() * 4 > 2**31:  # PyTorch's channels_last nearest-upsample kernel fails past 2**31 outputs
            x = x.contiguous()
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    """One down level: diffusers' DownBlock2D (attention=False) or AttnDownBlock2D (attention=True)."""

    def __init__(self, cfg: UNetConfig, in_channels, out_channels, attention, add_downsample):
        super().__init__()
        temb = cfg.time_embed_dim
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, temb, g, eps, cfg.dropout)
            for i in range(cfg.layers_per_block)
        )
        heads, head_dim = cfg.attention_heads(out_channels)
        self.attentions = nn.ModuleList(
            Attention(out_channels, heads, head_dim, g, eps) for _ in range(cfg.layers_per_block)
        ) if attention else None
        self.downsamplers = (nn.ModuleList([Downsample(out_channels, cfg.downsample_padding)])
                             if add_downsample else None)

    def forward(self, h, temb: tuple, skips: list):
        """Runs the level, appending every skip connection the up path will consume to ``skips``.

        ``temb``: every ResBlock's time-embedding projection (``UNet.time_projections``), by ``temb_index``."""
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb[resnet.temb_index])
            if self.attentions is not None:
                h = self.attentions[i](h)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h


class MidBlock(nn.Module):
    """diffusers' UNetMidBlock2D: ResBlock, optional attention, ResBlock, all scaled by mid_block_scale_factor."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        c = cfg.block_out_channels[-1]
        temb, g, eps, scale = cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps, cfg.mid_block_scale_factor
        self.resnets = nn.ModuleList(ResnetBlock(c, c, temb, g, eps, cfg.dropout, scale) for _ in range(2))
        heads, head_dim = cfg.attention_heads(c)
        attn_groups = cfg.attn_norm_num_groups or g
        self.attentions = nn.ModuleList(
            [Attention(c, heads, head_dim, attn_groups, eps, scale)]
        ) if cfg.mid_attention else None

    def forward(self, h, temb: tuple):
        h = self.resnets[0](h, temb[self.resnets[0].temb_index])
        if self.attentions is not None:
            h = self.attentions[0](h)
        return self.resnets[1](h, temb[self.resnets[1].temb_index])


class UpBlock(nn.Module):
    """One up level: diffusers' UpBlock2D (attention=False) or AttnUpBlock2D (attention=True).

    ResBlock j takes the previous output concatenated with a skip connection: ``skip_channels[j]`` channels.
    """

    def __init__(self, cfg: UNetConfig, prev_channels, out_channels, skip_channels, attention, add_upsample):
        super().__init__()
        temb, g, eps = cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(
            ResnetBlock((prev_channels if j == 0 else out_channels) + s, out_channels, temb, g, eps, cfg.dropout)
            for j, s in enumerate(skip_channels)
        )
        heads, head_dim = cfg.attention_heads(out_channels)
        self.attentions = nn.ModuleList(
            Attention(out_channels, heads, head_dim, g, eps) for _ in skip_channels
        ) if attention else None
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if add_upsample else None

    def forward(self, h, temb: tuple, skips: list):
        """Runs the level, popping one skip connection per ResBlock from the end of ``skips``."""
        for j, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), temb[resnet.temb_index])
            if self.attentions is not None:
                h = self.attentions[j](h)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h)
        return h


class TimestepEmbedding(nn.Module):
    """The time-embedding MLP: linear_2(silu(linear_1(sinusoidal(t))))."""

    def __init__(self, in_dim, dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


def timestep_frequencies(dim: int, freq_shift: float, device) -> torch.Tensor:
    """float32 [dim // 2]: freqs_k = exp(-ln(10000) * k / (dim // 2 - freq_shift)), in diffusers' operation order."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=device)
    return torch.exp(exponent / (half - freq_shift))


def sinusoidal_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                         freqs: torch.Tensor | None = None) -> torch.Tensor:
    """[N] timesteps -> [N, dim] float32 (Ho et al., 2020; diffusers' ``get_timestep_embedding``).

    freqs_k = exp(-ln(10000) * k / (half - freq_shift)), k < half = dim // 2; embedding [sin(t f), cos(t f)]
    (or [cos, sin] with flip_sin_to_cos), zero-padded to ``dim`` when dim is odd. Computed in the same
    float32 operation order as diffusers so the two agree to rounding. ``freqs``: ``timestep_frequencies``
    computed beforehand (the UNet keeps them per device), else computed here.
    """
    freqs = timestep_frequencies(dim, freq_shift, t.device) if freqs is None else freqs
    args = t.float()[:, None] * freqs[None, :]
    parts = (torch.cos(args), torch.sin(args)) if flip_sin_to_cos else (torch.sin(args), torch.cos(args))
    emb = torch.cat(parts, dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


# ---------------------------------------------------------------------------------------------- model
class UNet(nn.Module):
    """diffusers' UNet2DModel (positional time embedding, no class conditioning) on fastdiff's ops.

    ``model(x, t)``: x [N, in_channels, H, W] (H, W multiples of 2 ** (levels - 1); NCHW or channels_last),
    t an int, a float, a 0-dim tensor or an [N] (or [1]) tensor of timesteps; returns [N, out_channels, H, W].
    """

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        cfg = UNetConfig() if config is None else config
        if not isinstance(cfg, UNetConfig):
            raise TypeError(f"UNet expects a UNetConfig, got {type(cfg).__name__}")
        cfg.validate()
        self.config = cfg
        chans = cfg.block_out_channels
        levels = cfg.num_levels
        self.backend: str | None = None  # op backend of every GroupNorm (set_backend); None = FASTDIFF_BACKEND
        self.attention_backend: str | None = None  # backend of every attention core; None = its default

        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chans[0], cfg.time_embed_dim)

        self.down_blocks = nn.ModuleList()
        skip_channels = [chans[0]]  # channels of each skip connection, in the order they are pushed
        prev = chans[0]
        for i, c in enumerate(chans):
            last = i == levels - 1
            self.down_blocks.append(DownBlock(cfg, prev, c, cfg.attention_levels[i], add_downsample=not last))
            skip_channels += [c] * (cfg.layers_per_block + (0 if last else 1))
            prev = c

        self.mid_block = MidBlock(cfg) if cfg.mid_block else None

        self.up_blocks = nn.ModuleList()
        for i in reversed(range(levels)):
            n = cfg.layers_per_block + 1
            skips = [skip_channels.pop() for _ in range(n)]
            self.up_blocks.append(UpBlock(cfg, prev, chans[i], skips, cfg.up_attention[i], add_upsample=i > 0))
            prev = chans[i]

        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, chans[0], cfg.norm_eps)
        self.conv_out = nn.Conv2d(chans[0], cfg.out_channels, 3, padding=1)

        # Every ResBlock's time_emb_proj as views of one [sum of out_channels, time_embed_dim] weight (and bias):
        # one GEMM per forward projects the embedding for all of them (time_projections).
        self._frequency_cache: dict[torch.device, torch.Tensor] = {}
        self._resnets = [m for m in self.modules() if isinstance(m, ResnetBlock)]
        for i, resnet in enumerate(self._resnets):
            resnet.temb_index = i
        self._temb_sizes = [r.time_emb_proj.out_features for r in self._resnets]
        self.temb_weight = StackedParameters([(r.time_emb_proj, "weight") for r in self._resnets])
        self.temb_bias = StackedParameters([(r.time_emb_proj, "bias") for r in self._resnets])

    # ------------------------------------------------------------------ forward
    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError unless x is [N, in_channels, H, W] with H and W multiples of 2 ** (levels - 1)."""
        cfg = self.config
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"UNet input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"UNet input must be [batch, {cfg.in_channels}, height, width], "
                             f"got shape {tuple(x.shape)}")
        if x.shape[1] != cfg.in_channels:
            raise ValueError(f"UNet input has {x.shape[1]} channels, the model expects {cfg.in_channels} "
                             f"(shape {tuple(x.shape)})")
        f = cfg.downsample_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"UNet input size {x.shape[2]}x{x.shape[3]} is not a multiple of {f} "
                             f"(2 ** (levels - 1) for {cfg.num_levels} levels)")
        if not x.is_floating_point():
            raise ValueError(f"UNet input must be floating point, got {x.dtype}")

    def _batch_timesteps(self, t, batch: int, device) -> torch.Tensor:
        """t as an [batch] tensor on ``device`` (a Python number is filled on the device, never copied)."""
        if isinstance(t, bool) or not isinstance(t, (int, float, torch.Tensor)):
            raise TypeError(f"timestep must be an int, a float or a tensor, got {type(t).__name__}")
        if not isinstance(t, torch.Tensor):
            # diffusers turns a Python float into a long tensor (truncating it); fastdiff keeps the fraction.
            return torch.full((batch,), float(t), dtype=torch.float32, device=device)
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"timestep tensor must be integer or floating point, got {t.dtype}")
        if t.dim() == 0:
            t = t.reshape(1)
        if t.dim() != 1 or t.shape[0] not in (1, batch):
            raise ValueError(f"timestep tensor must be 0-dim, [1] or [batch={batch}], got shape {tuple(t.shape)}")
        return t.to(device, non_blocking=True).expand(batch)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        self.check_input(x)
        cfg = self.config
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        t = self._batch_timesteps(t, x.shape[0], x.device)
        t_emb = sinusoidal_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift,
                                     self._frequencies(t.device))
        emb = self.time_embedding(t_emb.to(self.conv_in.weight.dtype))
        temb = self.time_projections(F.silu(emb))

        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h = block(h, temb, skips)
        if self.mid_block is not None:
            h = self.mid_block(h, temb)
        for block in self.up_blocks:
            h = block(h, temb, skips)
        h = self.conv_norm_out(h, silu=True)
        return self.conv_out(h)

    def _frequencies(self, device) -> torch.Tensor:
        """The time embedding's frequencies on ``device``, computed once per device (4 launches fewer a step).
        Never cached inside a CUDA-graph capture: a tensor made there holds data only once the graph replays."""
        if torch.compiler.is_compiling():  # a constant to the compiler
            return timestep_frequencies(self.config.block_out_channels[0], self.config.freq_shift, device)
        freqs = self._frequency_cache.get(device)
        if freqs is None:
            freqs = timestep_frequencies(self.config.block_out_channels[0], self.config.freq_shift, device)
            if not _capturing():
                self._frequency_cache[device] = freqs
        return freqs

    def time_projections(self, emb_silu: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """time_emb_proj(silu(emb)) of every ResBlock (ResBlock r's at ``r.temb_index``), from one GEMM over the
        stacked weights; each a [N, out_channels] column slice of the [N, sum of out_channels] result."""
        projected = F.linear(emb_silu, self.temb_weight.tensor(), self.temb_bias.tensor())
        return projected.split(self._temb_sizes, dim=1)

    # ------------------------------------------------------------------ stacked parameters
    def tie_stacked_parameters(self) -> "UNet":
        """Make the stacked parameters (ResBlocks' time_emb_proj, attention Q/K/V) views of their stacks again
        after their tensors were replaced; a no-op when they are. Called after ``.to()``/``_apply``,
        ``load_state_dict`` and copying; call it after assigning ``param.data`` yourself."""
        for group in stacked_parameter_groups(self):
            group.tie()
        return self

    def _apply(self, fn, *args, **kwargs):
        # .to(), .half(), .cuda(), to_empty() give each parameter a tensor of its own: stack them again
        out = super()._apply(fn, *args, **kwargs)
        self.tie_stacked_parameters()
        self._frequency_cache.clear()
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # assign=True replaces the parameters by the given tensors; copying in place keeps the stacks as they are
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.tie_stacked_parameters()
        return result

    def __setstate__(self, state):
        # copy.deepcopy: every parameter arrives as a separate clone
        super().__setstate__(state)
        self.tie_stacked_parameters()

    # ------------------------------------------------------------------ backends and info
    def set_backend(self, name: str | None, attention: str | None = None) -> "UNet":
        """Choose the op backend ("reference", "triton", "auto" or None = FASTDIFF_BACKEND) for every GroupNorm,
        and the attention backend: ``attention`` if given, else "reference" for "reference" and "auto" otherwise
        (None for None)."""
        if name is not None:
            ops.check_backend(name)
        if attention is None and name is not None:
            attention = "reference" if name == "reference" else "auto"
        self.backend = name
        self.attention_backend = attention
        for m in self.modules():
            if isinstance(m, GroupNorm):
                m.backend = name
            elif isinstance(m, Attention):
                m.attention_backend = attention
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_image(self, image_size=None) -> int:
        """FLOPs (multiply-add = 2) of one forward pass for one image, counted on the meta device."""
        from .shapes import flops_per_image

        return flops_per_image(self.config, image_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    # ------------------------------------------------------------------ diffusers interop
    @classmethod
    def from_diffusers(cls, obj_or_dir) -> "UNet":
        """From a diffusers ``UNet2DModel`` instance (same device and dtype, weights copied) or a directory holding
        its config.json and diffusion_pytorch_model.safetensors (pickle .bin files are refused). In eval mode."""
        if isinstance(obj_or_dir, (str, os.PathLike)):
            from .checkpoint import load_diffusers_directory

            return load_diffusers_directory(obj_or_dir)
        from .diffusers_compat import unet_from_diffusers_model

        return unet_from_diffusers_model(obj_or_dir)

    def to_diffusers_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict with diffusers' UNet2DModel key names (for ``UNet2DModel.from_config(to_diffusers_config())``)."""
        from .diffusers_compat import state_dict_to_diffusers

        return state_dict_to_diffusers(self.state_dict())
