"""One tolerance table and one comparison for every equivalence test in fastdiff.

Relative error is ||res - ref|| / ||ref|| against a reference computed upcast (float32 or float64).
NaN or inf in a place where the reference is finite never passes.
"""

from __future__ import annotations

import torch

# dtype of the result under test -> largest allowed relative (Frobenius) error against an upcast reference.
RTOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.5e-2,
}


def relative_error(res: torch.Tensor, ref: torch.Tensor) -> float:
    res64 = res.detach().to(torch.float64).cpu()
    ref64 = ref.detach().to(torch.float64).cpu()
    denom = ref64.norm().item()
    return (res64 - ref64).norm().item() / max(denom, 1e-30)


def assert_close(res: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None, rtol: float | None = None,
                 what: str = "result") -> None:
    """Fail with a readable report unless ``res`` matches ``ref`` to the tolerance of ``dtype``."""
    dtype = dtype or res.dtype
    rtol = RTOL[dtype] if rtol is None else rtol
    if tuple(res.shape) != tuple(ref.shape):
        raise AssertionError(f"{what}: shape {tuple(res.shape)} != reference shape {tuple(ref.shape)}")
    res64 = res.detach().to(torch.float64).cpu()
    ref64 = ref.detach().to(torch.float64).cpu()
    bad_res = ~torch.isfinite(res64)
    bad_ref = ~torch.isfinite(ref64)
    if (bad_res != bad_ref).any():
        idx = torch.nonzero(bad_res != bad_ref)[:5].tolist()
        raise AssertionError(
            f"{what}: NaN/inf mismatch at {int((bad_res != bad_ref).sum())} elements, first at {idx}"
        )
    finite = ~bad_ref
    err = relative_error(res64[finite], ref64[finite]) if finite.any() else 0.0
    if err <= rtol:
        return
    diff = (res64 - ref64).abs()
    scale = ref64.abs().max().item()
    elem_tol = rtol * max(scale, 1e-30) * 10
    n_bad = int((diff > elem_tol).sum())
    first = torch.nonzero(diff > elem_tol)[:5].tolist()
    raise AssertionError(
        f"{what}: relative error {err:.3e} > {rtol:.1e} for {dtype}; max abs diff {diff.max().item():.3e}; "
        f"{n_bad} of {diff.numel()} elements differ by more than {elem_tol:.2e}, first at {first}"
    )
