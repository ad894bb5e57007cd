"""Attention over [batch, heads, tokens, head_dim] with interchangeable backends.

Backends, fastest first: ``xformers`` (memory-efficient attention, optional extra), ``sdpa``
(``torch.nn.functional.scaled_dot_product_attention``) and ``reference`` (plain math in float32,
``fastdiff.ops.reference.attention``). All use scale 1/sqrt(head_dim) and no mask.

``auto`` takes the first backend that is available for the tensors' device and dtype; a backend
that raises is marked broken for that (device type, dtype) and the next one is tried, so the
absence or failure of xformers is never an error. ``chosen_backends()`` reports what ``auto`` picked
and why anything was skipped (``fastdiff info`` and the benchmarks print it).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from .ops import reference

log = logging.getLogger("fastdiff.attention")

ATTENTION_BACKENDS = ("auto", "xformers", "sdpa", "reference")
_AUTO_ORDER = ("xformers", "sdpa", "reference")
_broken: dict[tuple[str, str, torch.dtype], str] = {}
_chosen: dict[tuple[str, torch.dtype], str] = {}


@functools.lru_cache(maxsize=None)
def xformers_problem() -> str | None:
    """None when xformers' memory-efficient attention imports, else why not."""
    try:
        import xformers.ops  # noqa: F401
    except Exception as exc:  # an absent or broken optional extra is a reason, not an error
        return f"xformers not usable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


def backend_problem(name: str, q: torch.Tensor) -> str | None:
    """Why backend ``name`` cannot run on q's device and dtype, or None."""
    if name == "xformers":
        if not q.is_cuda:
            return "xformers needs CUDA tensors"
        return xformers_problem()
    return None  # sdpa and reference run on every device and float dtype


def _xformers(q, k, v):
    import xformers.ops as xops

    # xformers takes [batch, tokens, heads, head_dim].
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


_IMPLS = {"xformers": _xformers, "sdpa": _sdpa, "reference": reference.attention}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v; q, k, v: [batch, heads, tokens, head_dim] of one dtype and device."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects [batch, heads, tokens, head_dim]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError("attention: q, k and v must share dtype and device")
    backend = backend or "auto"
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {ATTENTION_BACKENDS}")
    if backend != "auto":
        problem = backend_problem(backend, q)
        if problem:
            raise ValueError(f"attention backend {backend!r} cannot run here: {problem}")
        return _IMPLS[backend](q, k, v)
    for name in _AUTO_ORDER:
        key = (name, q.device.type, q.dtype)
        problem = backend_problem(name, q) or _broken.get(key)
        if problem:
            continue
        if name == "reference":
            _chosen[(q.device.type, q.dtype)] = name
            return reference.attention(q, k, v)
        try:
            out = _IMPLS[name](q, k, v)
        except Exception as exc:  # a failing optional backend falls through to the next one
            _broken[key] = f"{name} raised {type(exc).__name__}: {exc}"
            log.debug("attention: %s failed, falling back: %s", name, exc)
            continue
        if _chosen.get((q.device.type, q.dtype)) != name:
            log.debug("attention: auto chose %s for %s %s", name, q.device.type, q.dtype)
        _chosen[(q.device.type, q.dtype)] = name
        return out
    raise AssertionError("unreachable: the reference backend always runs")


def chosen_backends() -> dict:
    """{"device dtype": backend} that ``auto`` used in this process, plus the reasons for skips."""
    chosen = {f"{dev} {str(dt).replace('torch.', '')}": name for (dev, dt), name in _chosen.items()}
    skipped = {f"{name} on {dev} {str(dt).replace('torch.', '')}": why for (name, dev, dt), why in _broken.items()}
    return {"chosen": chosen, "failed": skipped}


def availability(device: torch.device | str = "cpu") -> dict[str, str]:
    """{backend: "available" or the reason it is not} for a device."""
    device = torch.device(device)
    xformers = xformers_problem() if device.type == "cuda" else "xformers needs CUDA tensors"
    return {"xformers": xformers or "available", "sdpa": "available", "reference": "available"}
