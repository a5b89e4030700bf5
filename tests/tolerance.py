"""The accuracy rule of STYLE.md, in one place.

err(kernel vs float64 reference) <= factor x err(same-precision PyTorch reference vs float64
reference) + floor, with factor 2 for outputs and 3 for gradients. Errors are max-abs over the
finite entries; non-finite entries must match exactly (lse = -inf where a query sees no key),
and a NaN anywhere fails.
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
    bound = factor * baseline + floor
    assert err <= bound, (
        f"{name}: max abs error {err:.3g} > {factor} x {baseline:.3g} (same-precision "
        f"reference) + {floor:g}"
    )
