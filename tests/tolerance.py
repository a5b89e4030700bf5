"""The accuracy rule of STYLE.md, in one place.

err(kernel vs float64 reference) <= factor x err(same-precision PyTorch reference vs float64
reference) + floor x max(1, max |reference|), with factor 2 for outputs and 3 for gradients.
Errors are max-abs over the finite entries; non-finite entries must match exactly (lse = -inf
where a query sees no key), and a NaN anywhere fails.

The floor is a few units of rounding of one element, so it scales with the elements' size
where they exceed 1: a gradient summed over a GQA group of 8 heads is ~3x larger than one
head's, and its rounding with it (seen on an H100: float32 D = 128 dk, kernel error 2.1e-5
against a fixed floor of 1e-5 at |dk| ~ 5, the same 3-5x of the same-precision error that a
single head shows).
"""

from __future__ import annotations

import torch

OUTPUT_FACTOR = 2.0
GRAD_FACTOR = 3.0


def _max_abs(a: torch.Tensor, b: torch.Tensor, finite: torch.Tensor) -> float:
    if not finite.any():
        return 0.0
    return (a.double()[finite] - b.double()[finite]).abs().max().item()


def assert_close_to_reference(actual, gold, same_precision, *, factor=OUTPUT_FACTOR,
                              floor=1e-5, name="output"):
    """``gold`` is the float64 reference, ``same_precision`` the reference in actual's dtype."""
    assert actual.shape == gold.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(gold.shape)}"
    assert not torch.isnan(actual).any(), f"{name}: kernel produced NaN"
    assert not torch.isnan(gold).any(), f"{name}: reference produced NaN (test bug)"
    finite = torch.isfinite(gold)
    mismatch = torch.isfinite(actual.double()) != finite
    assert not mismatch.any(), f"{name}: {int(mismatch.sum())} entries differ in finiteness"
    infinite = ~finite
    assert torch.equal(actual.double()[infinite], gold[infinite]), f"{name}: infinities differ"
    err = _max_abs(actual, gold, finite)
    baseline = _max_abs(same_precision, gold, finite)
    scaled_floor = floor * max(1.0, gold[finite].abs().max().item() if finite.any() else 0.0)
    bound = factor * baseline + scaled_floor
    assert err <= bound, (
        f"{name}: max abs error {err:.3g} > {factor} x {baseline:.3g} (same-precision "
        f"reference) + {scaled_floor:.3g} (floor {floor:g} x max(1, max |reference|))"
    )
