"""Attention backends agree with the reference; auto falls back when a backend raises."""

import pytest
import torch

from fastdiff import attention as attn
from fastdiff.ops import reference
from fastdiff.testing import assert_close


@pytest.mark.parametrize("shape", [(1, 1, 7, 8), (2, 4, 16, 32), (3, 2, 33, 16), (2, 8, 64, 4)],
                         ids=["one-head-odd-tokens", "4-heads", "33-tokens", "head-dim-4"])
@pytest.mark.parametrize("backend", ["sdpa", "auto"])
def test_backends_match_reference(shape, backend):
    q, k, v = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
    ref = reference.attention(q, k, v).double()
    q32, k32, v32 = (t.float() for t in (q, k, v))
    out = attn.attention(q32, k32, v32, backend=backend)
    assert out.shape == shape and out.dtype == torch.float32
    assert_close(out, ref, torch.float32, what=f"{backend} attention")


def test_reference_is_softmax_attention():
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64) for _ in range(3))
    weights = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)  # sqrt(head_dim 4) = 2
    assert_close(reference.attention(q, k, v), weights @ v, torch.float64)


def test_xformers_tested_where_it_runs():
    problem = attn.backend_problem("xformers", torch.empty(1, 1, 1, 8, device="cuda" if torch.cuda.is_available() else "cpu"))
    if problem:
        pytest.skip(f"xformers cannot run here: {problem}")
    q, k, v = (torch.randn(2, 4, 40, 32, device="cuda", dtype=torch.float16) for _ in range(3))
    assert_close(attn.attention(q, k, v, backend="xformers"), reference.attention(q.float(), k.float(), v.float()),
                 torch.float16)


def test_explicit_unavailable_backend_raises():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="xformers"):
        attn.attention(q, q, q, backend="xformers")
    with pytest.raises(ValueError, match="not one of"):
        attn.attention(q, q, q, backend="flash")


def test_auto_falls_back_when_a_backend_raises(monkeypatch):
    def broken(q, k, v):
        raise RuntimeError("kernel refused this shape")

    monkeypatch.setitem(attn._IMPLS, "sdpa", broken)
    monkeypatch.setattr(attn, "_broken", {})
    monkeypatch.setattr(attn, "_chosen", {})
    q, k, v = (torch.randn(2, 2, 9, 8) for _ in range(3))
    out = attn.attention(q, k, v, backend="auto")
    assert_close(out, reference.attention(q, k, v), torch.float32)
    report = attn.chosen_backends()
    assert report["chosen"] == {"cpu float32": "reference"}
    assert "kernel refused this shape" in next(iter(report["failed"].values()))


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="batch, heads, tokens, head_dim"):
        attn.attention(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="do not match"):
        attn.attention(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4))
