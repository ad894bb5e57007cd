"""diffusers' modules running on fastdiff's ops, patched in place.

Like Liger-Kernel's ``monkey_patch.py``: a new ``forward`` is bound to each matching module instance
(``module.__dict__["forward"]``) and attention goes through diffusers' own attention-processor interface, so
the module tree, its parameter objects and its state dict stay diffusers' (``save_pretrained``, LoRA loading
and fusing, ``.to()`` work as before, and a weight changed in place is seen by the next call).

What is patched:

- every ``torch.nn.GroupNorm`` (the entry norm of each ``Transformer2DModel``, the VAE attention's norm, the
  output norms) runs ``fastdiff.ops.group_norm``;
- every ``ResnetBlock2D`` runs GroupNorm+SiLU fused for ``norm1`` and, with ``time_embedding_norm="default"``,
  the time-embedding add fused into ``norm2``'s statistics (``ops.group_norm(h, add=temb, silu=True)``);
  ``"scale_shift"`` runs the plain ``ops.group_norm`` and applies scale and shift as diffusers does; a
  non-SiLU activation is applied after an unfused ``ops.group_norm``;
- every ``Attention`` whose processor is diffusers' default (``AttnProcessor2_0`` / ``AttnProcessor``) gets a
  ``FastdiffAttnProcessor``: the q/k/v/out projections stay diffusers' modules, the core runs
  ``fastdiff.ops.attention`` (self and cross, any query/key lengths and head counts); with an attention mask
  it runs ``scaled_dot_product_attention`` with diffusers' prepared mask, exactly as ``AttnProcessor2_0``.

Anything else (other resnet classes, custom or LoRA-specific processors, attention with added key/value
projections) is left as it is and named in the ``PatchReport`` (logged at INFO).
"""

from __future__ import annotations

import collections
import dataclasses
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdiff import ops

log = logging.getLogger("fastdiff.diffusers")

_BACKEND_ATTR = "_fastdiff_backend"


def attention_backend(backend: str) -> str:
    """The ``fastdiff.ops.attention`` backend for an ops backend: the reference stays the reference."""
    return "reference" if backend == "reference" else "auto"


def _norm(module: nn.GroupNorm, x: torch.Tensor, backend: str, *, add=None, silu=False) -> torch.Tensor:
    """``module`` (a GroupNorm) applied to x through ``ops.group_norm``, with its own parameters."""
    if x.dim() != 4 and not x.is_contiguous():  # [N, C, L] views (an attention's transposed tokens)
        x = x.contiguous()
    return ops.group_norm(x, module.num_groups, module.weight, module.bias, module.eps, add=add, silu=silu,
                          backend=backend)


# ---------------------------------------------------------------------------------------------- forwards


def group_norm_forward(self: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """``torch.nn.GroupNorm.forward`` through ``fastdiff.ops.group_norm``."""
    return _norm(self, x, getattr(self, _BACKEND_ATTR))


def _time_add(temb, h: torch.Tensor):
    """temb as the [N, C] add of a fused GroupNorm, or None when its shape needs diffusers' broadcasting."""
    if temb is None:
        return None
    n, c = h.shape[:2]
    flat = temb.reshape(temb.shape[0], -1) if temb.dim() == 4 and temb.shape[2:] == (1, 1) else temb
    if flat.dim() != 2 or flat.shape[1] != c or flat.shape[0] not in (1, n):
        return None
    return flat.expand(n, c)


def resnet_block_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None, *args, **kwargs):
    """``diffusers.models.resnet.ResnetBlock2D.forward`` with fastdiff's fused GroupNorm(+time add)+SiLU.

    Same math as diffusers: h = act(norm1(x)) -> [up/down] -> conv1 -> act(norm2(h + proj(act(temb)))) ->
    dropout -> conv2, output (shortcut(x) + h) / output_scale_factor.
    """
    backend = getattr(self, _BACKEND_ATTR)
    fuse_silu = isinstance(self.nonlinearity, nn.SiLU)

    def norm_act(norm, h, add=None):
        h = _norm(norm, h, backend, add=add, silu=fuse_silu)
        return h if fuse_silu else self.nonlinearity(h)

    hidden_states = norm_act(self.norm1, input_tensor)
    if self.upsample is not None:
        if hidden_states.shape[0] >= 64:  # as diffusers (upsample_nearest_nhwc and large batches)
            input_tensor = input_tensor.contiguous()
            hidden_states = hidden_states.contiguous()
        input_tensor = self.upsample(input_tensor)
        hidden_states = self.upsample(hidden_states)
    elif self.downsample is not None:
        input_tensor = self.downsample(input_tensor)
        hidden_states = self.downsample(hidden_states)
    hidden_states = self.conv1(hidden_states)

    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)[:, :, None, None]

    if self.time_embedding_norm == "default":
        add = _time_add(temb, hidden_states)
        if temb is not None and add is None:  # an unusual temb shape: diffusers' broadcasting add, then the norm
            hidden_states = hidden_states + temb
        hidden_states = norm_act(self.norm2, hidden_states, add=add)
    elif self.time_embedding_norm == "scale_shift":
        if temb is None:
            raise ValueError(f" `temb` should not be None when `time_embedding_norm` is {self.time_embedding_norm}")
        time_scale, time_shift = torch.chunk(temb, 2, dim=1)
        hidden_states = _norm(self.norm2, hidden_states, backend)
        hidden_states = self.nonlinearity(hidden_states * (1 + time_scale) + time_shift)
    else:
        hidden_states = norm_act(self.norm2, hidden_states)

    hidden_states = self.dropout(hidden_states)
    hidden_states = self.conv2(hidden_states)
    if self.conv_shortcut is not None:
        if self.training:
            input_tensor = input_tensor.contiguous()
        input_tensor = self.conv_shortcut(input_tensor)
    return (input_tensor + hidden_states) / self.output_scale_factor


group_norm_forward._fastdiff_patch = True
resnet_block_forward._fastdiff_patch = True


class FastdiffAttnProcessor:
    """A diffusers attention processor whose attention core is ``fastdiff.ops.attention``.

    Semantics of diffusers' ``AttnProcessor2_0``: spatial norm, group norm (run by ``fastdiff.ops.group_norm`` on
    the 4-D input, the same statistics), cross-attention norm, q/k norms, residual connection and
    ``rescale_output_factor``; softmax scale 1/sqrt(head_dim) as SDPA's default. With an attention mask the core
    is ``scaled_dot_product_attention`` over diffusers' prepared mask.
    """

    def __init__(self, backend: str = "auto"):
        self.backend = ops.check_backend(backend)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            if attn.group_norm is not None:  # statistics over (C/G, H, W) equal those over (C/G, H*W)
                hidden_states = _norm(attn.group_norm, hidden_states, self.backend)
            hidden_states = hidden_states.reshape(batch_size, channel, height * width).transpose(1, 2)
        elif attn.group_norm is not None:
            hidden_states = _norm(attn.group_norm, hidden_states.transpose(1, 2), self.backend).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if attention_mask is None:
            hidden_states = ops.attention(query, key, value, backend=attention_backend(self.backend))
        else:
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


# ---------------------------------------------------------------------------------------------- patching


@dataclasses.dataclass
class PatchReport:
    """What ``patch_model`` did to one model."""

    model: str
    patched: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # kind -> modules
    left: dict = dataclasses.field(default_factory=dict)  # module name -> why it runs diffusers' own code

    def summary(self) -> str:
        done = ", ".join(f"{n} {k}" for k, n in sorted(self.patched.items())) or "nothing"
        text = f"{self.model}: {done} on fastdiff"
        if self.left:
            text += f"; left as diffusers' ({len(self.left)}): " + "; ".join(
                f"{name}: {why}" for name, why in list(self.left.items())[:8])
        return text


def _bind(module: nn.Module, fn, backend: str) -> None:
    setattr(module, _BACKEND_ATTR, backend)
    module.__dict__["forward"] = fn.__get__(module, type(module))


def is_patched(module: nn.Module) -> bool:
    fwd = module.__dict__.get("forward")
    return getattr(getattr(fwd, "__func__", None), "_fastdiff_patch", False)


def _attention_problem(attn) -> str | None:
    """Why ``attn`` keeps its processor (None when FastdiffAttnProcessor can take over)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    proc = attn.processor
    if not isinstance(proc, (AttnProcessor2_0, AttnProcessor, FastdiffAttnProcessor)):
        return f"processor {type(proc).__name__} is not diffusers' default"
    if getattr(attn, "add_k_proj", None) is not None:
        return "added key/value projections"
    head_dim = attn.inner_dim // attn.heads
    if isinstance(proc, AttnProcessor) and abs(attn.scale - head_dim ** -0.5) > 1e-12 * attn.scale:
        return f"softmax scale {attn.scale} is not 1/sqrt({head_dim})"
    return None


def patch_model(model: nn.Module, backend: str = "auto") -> PatchReport:
    """Patch ``model``'s GroupNorms, ResnetBlock2Ds and attention processors in place (idempotent)."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    backend = ops.check_backend(backend)
    report = PatchReport(type(model).__name__)
    for name, module in model.named_modules():
        kind = type(module)
        if kind is nn.GroupNorm:
            if not module.affine:
                report.left[name] = "GroupNorm without affine parameters"
                continue
            _bind(module, group_norm_forward, backend)
            report.patched["GroupNorm"] += 1
        elif kind is ResnetBlock2D:
            _bind(module, resnet_block_forward, backend)
            report.patched["ResnetBlock2D"] += 1
        elif isinstance(module, Attention):
            problem = _attention_problem(module)
            if problem:
                report.left[name] = problem
                continue
            module.set_processor(FastdiffAttnProcessor(backend))
            report.patched["Attention"] += 1
        elif "Resnet" in kind.__name__ and kind.__module__.startswith("diffusers"):
            report.left[name] = f"{kind.__name__} has no fastdiff forward"
    log.info("%s", report.summary())
    return report


def unpatch_model(model: nn.Module) -> None:
    """Undo ``patch_model``: diffusers' own forwards and the default attention processor again."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    for module in model.modules():
        if is_patched(module):
            del module.__dict__["forward"]
            delattr(module, _BACKEND_ATTR)
        elif isinstance(module, Attention) and isinstance(module.processor, FastdiffAttnProcessor):
            module.set_processor(AttnProcessor2_0())
